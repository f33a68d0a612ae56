import json
import re

import pytest

from soup.data import build_datasets
from soup.data.dataset import ASSETS_DIR, resolve_data_path
from soup.data.tokenize import IGNORE_INDEX
from soup.errors import ConfigError, DataError


def chat_row(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def chatml_length(user, answer):
    """Byte-tokenizer length of one ChatML exchange: 1 token per byte plus 4 special markers
    (<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n)."""
    return len(f"user\n{user}\nassistant\n{answer}\n".encode()) + 4


def trained(example):
    return sum(label != IGNORE_INDEX for label in example["labels"])


def test_sft_builds_masked_examples_and_reports_counts(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl([chat_row("hi", "hello")] * 3)
    splits = build_datasets(data_config(train_file=str(path)), byte_tokenizer, "sft", seed=0)
    assert splits.val is None and len(splits.train) == 3
    example = splits.train[0]
    assert len(example["input_ids"]) == len(example["labels"]) == chatml_length("hi", "hello")
    # "hello" + <|im_end|> + "\n"
    assert trained(example) == 5 + 1 + 1
    report = splits.report
    assert (report.rows_read, report.rows_used, report.rows_truncated, report.rows_dropped) == (3, 3, 0, 0)
    assert report.tokens == 3 * chatml_length("hi", "hello") and report.trained_tokens == 3 * 7
    assert report.max_example_tokens == chatml_length("hi", "hello") and report.format == "chatml"
    assert "3 used" in report.summary() and "21 trained" in report.summary()
    assert splits.chat_template is not None


def test_pretrain_reads_txt_documents(byte_tokenizer, tmp_path, data_config):
    path = tmp_path / "docs.txt"
    path.write_text("One.\nTwo two.\n")
    splits = build_datasets(data_config(train_file=str(path)), byte_tokenizer, "pretrain", seed=0)
    assert [len(e["input_ids"]) for e in splits.train] == [4 + 2, 8 + 2]  # text + BOS + EOS
    assert all(e["labels"] == e["input_ids"] for e in splits.train)
    assert splits.chat_template is None


def test_plaintext_data_for_sft_names_task_pretrain(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl([{"text": "a document"}])
    with pytest.raises(DataError, match="task=pretrain"):
        build_datasets(data_config(train_file=str(path)), byte_tokenizer, "sft", seed=0)
    with pytest.raises(ConfigError, match="data.format=plaintext does not fit task=sft"):
        build_datasets(data_config(train_file=str(path), format="plaintext"), byte_tokenizer, "sft", seed=0)


def test_chat_data_for_pretrain_names_task_sft(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl([chat_row("a", "b")])
    with pytest.raises(DataError, match="task=sft"):
        build_datasets(data_config(train_file=str(path)), byte_tokenizer, "pretrain", seed=0)


def test_format_mismatch_on_a_later_row_names_file_and_line(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl([chat_row("a", "b"), chat_row("c", "d"), {"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: the row has no field 'messages'")):
        build_datasets(data_config(train_file=str(path)), byte_tokenizer, "sft", seed=0)


def overlong_rows():
    # Two short rows and two whose answer runs past max_length=40 (the answer starts inside it).
    short, long_ = chat_row("hi", "yo"), chat_row("hi", "z" * 60)
    assert chatml_length("hi", "yo") <= 40 < chatml_length("hi", "z" * 60)
    return [short, long_, short, long_]


def test_truncate_keeps_the_first_max_length_tokens_and_counts_them(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl(overlong_rows())
    splits = build_datasets(data_config(train_file=str(path), max_length=40), byte_tokenizer, "sft", seed=0)
    assert [len(e["input_ids"]) for e in splits.train] == [chatml_length("hi", "yo"), 40, chatml_length("hi", "yo"), 40]
    assert (splits.report.rows_used, splits.report.rows_truncated, splits.report.rows_dropped) == (4, 2, 0)
    assert splits.report.max_example_tokens == 40


def test_drop_removes_overlong_rows_and_counts_the_reason(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl(overlong_rows())
    cfg = data_config(train_file=str(path), max_length=40, overlong="drop")
    splits = build_datasets(cfg, byte_tokenizer, "sft", seed=0)
    assert len(splits.train) == 2
    report = splits.report
    assert (report.rows_used, report.rows_truncated, report.rows_dropped) == (2, 0, 2)
    assert report.dropped_reasons == {"overlong": 2}
    assert "2 dropped (overlong: 2)" in report.summary()


def test_a_row_truncated_to_zero_trainable_tokens_names_file_line_and_fix(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl([chat_row("hi", "yo"), chat_row("q" * 80, "yo")])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: no trainable tokens left")) as info:
        build_datasets(data_config(train_file=str(path), max_length=40), byte_tokenizer, "sft", seed=0)
    assert "raise data.max_length" in str(info.value) and "data.overlong=truncate_or_drop" in str(info.value)


def test_nothing_left_after_dropping_is_an_error_naming_the_file(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl([chat_row("q" * 80, "yo")])
    with pytest.raises(DataError, match=re.escape(f"{path}: no train rows left out of 1 (dropped: overlong: 1)")):
        build_datasets(data_config(train_file=str(path), max_length=40, overlong="drop"), byte_tokenizer, "sft", seed=0)


def numbered_rows(n):
    return [chat_row(f"q{i}", f"a{i}") for i in range(n)]


def user_texts(tokenizer, examples):
    return [tokenizer.decode(e["input_ids"]).split("user\n")[1].split("<|im_end|>")[0] for e in examples]


def test_val_split_is_deterministic_per_seed_and_has_the_asked_size(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl(numbered_rows(20))
    cfg = data_config(train_file=str(path), val_split=0.25)
    a = build_datasets(cfg, byte_tokenizer, "sft", seed=1)
    b = build_datasets(cfg, byte_tokenizer, "sft", seed=1)
    c = build_datasets(cfg, byte_tokenizer, "sft", seed=2)
    assert (len(a.train), len(a.val)) == (15, 5)
    assert user_texts(byte_tokenizer, a.val) == user_texts(byte_tokenizer, b.val)
    assert user_texts(byte_tokenizer, a.val) != user_texts(byte_tokenizer, c.val)
    assert sorted(user_texts(byte_tokenizer, a.train + a.val)) == sorted(f"q{i}" for i in range(20))
    assert (a.report.rows_read, a.report.rows_held_out, a.report.rows_used) == (20, 5, 15)
    assert a.val_report.rows_used == 5


def test_a_tiny_val_split_holds_out_at_least_one_row(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl(numbered_rows(5))
    splits = build_datasets(data_config(train_file=str(path), val_split=0.01), byte_tokenizer, "sft", seed=0)
    assert (len(splits.train), len(splits.val)) == (4, 1)


def test_val_file_and_val_split_together_is_a_config_error_naming_both(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl(numbered_rows(4))
    cfg = data_config(train_file=str(path), val_file=str(path), val_split=0.1)
    with pytest.raises(ConfigError, match=r"data\.val_file and data\.val_split=0\.1 are both set"):
        build_datasets(cfg, byte_tokenizer, "sft", seed=0)


def test_val_file_is_read_as_the_validation_split(byte_tokenizer, write_jsonl, data_config):
    train = write_jsonl(numbered_rows(4), "train.jsonl")
    val = write_jsonl([{"instruction": "v", "output": "w"}], "val.jsonl")
    splits = build_datasets(data_config(train_file=str(train), val_file=str(val)), byte_tokenizer, "sft", seed=0)
    assert len(splits.train) == 4 and len(splits.val) == 1
    assert splits.val_report.format == "alpaca" and splits.report.rows_held_out == 0


def test_max_rows_limits_the_rows_read(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl(numbered_rows(10))
    splits = build_datasets(data_config(train_file=str(path), max_rows=3), byte_tokenizer, "sft", seed=0)
    assert splits.report.rows_read == 3 and len(splits.train) == 3


def test_unknown_extension_and_empty_file_fail_through_build(byte_tokenizer, tmp_path, data_config):
    odd = tmp_path / "rows.tsv"
    odd.write_text("a\tb\n")
    with pytest.raises(DataError, match="unknown extension"):
        build_datasets(data_config(train_file=str(odd)), byte_tokenizer, "sft", seed=0)
    empty = tmp_path / "rows.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no rows"):
        build_datasets(data_config(train_file=str(empty)), byte_tokenizer, "sft", seed=0)


@pytest.mark.parametrize("flag, value, message", [
    ("overlong", "cut", "data.overlong='cut'"),
    ("format", "openai", "data.format='openai'"),
    ("val_split", 1.0, "outside [0, 1)"),
    ("max_length", 0, "data.max_length=0"),
])
def test_impossible_flags_are_config_errors(byte_tokenizer, write_jsonl, data_config, flag, value, message):
    path = write_jsonl(numbered_rows(2))
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_datasets(data_config(train_file=str(path), **{flag: value}), byte_tokenizer, "sft", seed=0)


def test_alpaca_csv_trains_only_on_the_output(byte_tokenizer, tmp_path, data_config):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,input,output\nAdd,1 and 2,3\n")
    splits = build_datasets(data_config(train_file=str(path)), byte_tokenizer, "sft", seed=0)
    example = splits.train[0]
    trained_ids = [t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX]
    assert byte_tokenizer.decode(trained_ids) == "3<|im_end|>\n"


# --- paths and the bundled demo ---------------------------------------------------


def test_pkg_prefix_names_a_bundled_file():
    assert resolve_data_path("pkg://demo/sft.jsonl", "data.train_file") == ASSETS_DIR / "demo" / "sft.jsonl"


def test_relative_paths_try_the_launch_dir_first_then_the_assets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("demo/sft.jsonl", "data.train_file") == ASSETS_DIR / "demo" / "sft.jsonl"
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "sft.jsonl").write_text("{}\n")
    assert resolve_data_path("demo/sft.jsonl", "data.train_file") == tmp_path / "demo" / "sft.jsonl"


def test_a_missing_relative_path_names_the_flag_and_both_places_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data\.train_file='nope\.jsonl': file not found \(also looked in .*assets"):
        resolve_data_path("nope.jsonl", "data.train_file")
    with pytest.raises(DataError, match="no such bundled file"):
        resolve_data_path("pkg://nope.jsonl", "data.train_file")


def test_bundled_demo_files_have_the_documented_rows():
    sft = [json.loads(line) for line in (ASSETS_DIR / "demo" / "sft.jsonl").read_text().splitlines()]
    pretrain = [json.loads(line) for line in (ASSETS_DIR / "demo" / "pretrain.jsonl").read_text().splitlines()]
    assert len(sft) == 400 and len(pretrain) == 300
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in sft) > 0
    assert any(r["messages"][0]["role"] == "system" for r in sft)


@pytest.mark.parametrize("task, rows", [("sft", 400), ("pretrain", 300)])
def test_data_demo_without_a_train_file_uses_the_tasks_demo_file(byte_tokenizer, data_config, task, rows):
    cfg = data_config(name="demo", max_length=256)
    splits = build_datasets(cfg, byte_tokenizer, task, seed=0)
    assert splits.report.rows_used == rows and splits.report.rows_truncated == 0


def test_tool_calling_rows_with_a_tools_list_build_and_train_on_the_call(byte_tokenizer, write_jsonl, data_config):
    row = {
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "Add 2 and 3."},
            {"role": "assistant", "tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
            {"role": "tool", "content": "TOOL SAYS 5"},
            {"role": "assistant", "content": "5"},
        ],
    }
    path = write_jsonl([row])
    splits = build_datasets(data_config(train_file=str(path)), byte_tokenizer, "sft", seed=0)
    example = splits.train[0]
    trained_text = byte_tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])
    assert splits.report.format == "tool_calling"
    assert trained_text == '\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n5<|im_end|>\n'


def test_sharegpt_file_builds(byte_tokenizer, write_jsonl, data_config):
    path = write_jsonl([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    splits = build_datasets(data_config(train_file=str(path)), byte_tokenizer, "sft", seed=0)
    assert splits.report.format == "sharegpt" and trained(splits.train[0]) == 2 + 2


def test_accepts_a_hydra_dictconfig(byte_tokenizer, write_jsonl):
    from omegaconf import OmegaConf

    from soup.config.schema import DataConfig

    path = write_jsonl(numbered_rows(3))
    cfg = OmegaConf.structured(DataConfig(name="file", train_file=str(path), chat_template="chatml"))
    assert len(build_datasets(cfg, byte_tokenizer, "sft", seed=0).train) == 3


def test_truncate_or_drop_truncates_and_drops_only_rows_left_with_nothing_to_train(
        byte_tokenizer, write_jsonl, data_config):
    # Row 2's prompt alone fills max_length (plain truncate stops on it, drop would also
    # drop row 3, which still trains 40 - prompt tokens after the cut).
    path = write_jsonl([chat_row("hi", "yo"), chat_row("q" * 80, "yo"), chat_row("hi", "z" * 60)])
    cfg = data_config(train_file=str(path), max_length=40, overlong="truncate_or_drop")
    splits = build_datasets(cfg, byte_tokenizer, "sft", seed=0)
    report = splits.report
    assert [len(e["input_ids"]) for e in splits.train] == [chatml_length("hi", "yo"), 40]
    assert (report.rows_used, report.rows_truncated, report.rows_dropped) == (2, 1, 1)
    assert report.dropped_reasons == {"nothing_to_train_after_truncation": 1}
