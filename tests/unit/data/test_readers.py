import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from soup.data.readers import SUPPORTED_EXTENSIONS, read_rows
from soup.errors import DataError


def test_jsonl_rows_carry_their_physical_line_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n   \n{"text": "three"}\n')
    rows = read_rows(path)
    assert [r.record["text"] for r in rows] == ["one", "two", "three"]
    assert [r.line for r in rows] == [1, 3, 5]
    assert rows[1].path == str(path) and rows[1].where == f"{path}:3"


def test_jsonl_max_rows_stops_early(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(10)))
    assert [r.record["text"] for r in read_rows(path, max_rows=3)] == ["0", "1", "2"]


def test_json_list_rows_are_numbered_by_item(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "x"}, {"text": "y"}], indent=2))
    rows = read_rows(path)
    assert [(r.record["text"], r.line, r.unit) for r in rows] == [("x", 1, "item"), ("y", 2, "item")]


def test_json_non_object_item_is_named_as_an_item(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "x"}, "oops"]))
    with pytest.raises(DataError, match=r"item 2: expected a JSON object, got str") as info:
        read_rows(path)
    assert info.value.line == 2 and info.value.path == str(path)


def test_json_whose_top_level_is_not_a_list_is_refused(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"text": "x"}))
    with pytest.raises(DataError, match="not a list of records"):
        read_rows(path)


def test_json_lines_saved_as_json_suggest_renaming(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"text": "x"}\n{"text": "y"}\n')
    with pytest.raises(DataError, match=r"rename the file to \.jsonl"):
        read_rows(path)


def test_csv_rows_carry_the_physical_line_they_start_on(tmp_path):
    path = tmp_path / "a.csv"
    # The second record's quoted field spans two lines, so the third starts on line 5.
    path.write_text('instruction,output\nsay hi,hi\n"say\nbye",bye\nsay yes,yes\n')
    rows = read_rows(path)
    assert [r.record for r in rows] == [
        {"instruction": "say hi", "output": "hi"},
        {"instruction": "say\nbye", "output": "bye"},
        {"instruction": "say yes", "output": "yes"},
    ]
    assert [r.line for r in rows] == [2, 3, 5]


def test_csv_row_with_the_wrong_number_of_fields_names_its_line(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("instruction,output\nsay hi,hi\nsay, bye,bye\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: 3 fields, but the header has 2")):
        read_rows(path)


def test_parquet_rows_are_numbered_from_one_and_keep_nested_messages(tmp_path):
    path = tmp_path / "a.parquet"
    records = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    pq.write_table(pa.Table.from_pylist(records), path)
    rows = read_rows(path)
    assert [r.record for r in rows] == records
    assert [(r.line, r.unit) for r in rows] == [(1, "row"), (2, "row")]
    assert len(read_rows(path, max_rows=1)) == 1


def test_txt_gives_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First doc.\n\nSecond doc.\n")
    rows = read_rows(path)
    assert [(r.record, r.line) for r in rows] == [({"text": "First doc."}, 1), ({"text": "Second doc."}, 3)]
    assert read_rows(path, text_field="body")[0].record == {"body": "First doc."}


def test_malformed_json_line_names_the_file_the_line_and_the_json_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: malformed JSON: Expecting ',' delimiter")) as info:
        read_rows(path)
    assert info.value.line == 3


def test_non_object_jsonl_row_names_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: expected a JSON object, got list")):
        read_rows(path)


@pytest.mark.parametrize("name, content", [("a.jsonl", "\n  \n"), ("a.txt", ""), ("a.json", "[]"), ("a.csv", "text\n")])
def test_a_file_without_records_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match="no rows"):
        read_rows(path)


def test_missing_file_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: file not found")):
        read_rows(tmp_path / "nope.jsonl")


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text("<rows/>")
    with pytest.raises(DataError, match=r"unknown extension '\.xml'") as info:
        read_rows(path)
    assert all(ext in str(info.value) for ext in SUPPORTED_EXTENSIONS)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: not valid UTF-8")):
        read_rows(path)
