"""Read a data file into rows that remember where they came from.

Every later error (a missing field, a row with nothing to train on) names the file
and the place in it, so each record travels as a Row with its path and position:

    .jsonl    one JSON object per line; position = physical line (blank lines skipped)
    .json     a top-level list of objects; position = 1-based item index ("item N")
    .csv      a header row, then one record per row; position = physical line
    .parquet  one record per table row; position = 1-based row index ("row N")
    .txt      one document per non-empty line -> {"text": line}; position = physical line
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from soup.errors import DataError

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")


@dataclass(frozen=True)
class Row:
    """One record of a data file and where it sits in that file.

    line: the physical line for .jsonl/.csv/.txt, the 1-based item index for .json
    and the 1-based row index for .parquet; `unit` says which, for messages.
    """

    record: dict[str, Any]
    path: str
    line: int
    unit: str = "line"

    @property
    def where(self) -> str:
        """`file.jsonl:12`, `file.json item 3` or `file.parquet row 7`."""
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} {self.unit} {self.line}"


def row_error(row: Row, message: str, fix: Optional[str] = None) -> DataError:
    """A DataError located at `row`, worded as a line, an item or a table row."""
    if row.unit == "line":
        return DataError(message, path=row.path, line=row.line, fix=fix)
    # DataError prints `path:line:`, which would misread as a line number for .json
    # items and parquet rows; put the unit in the text and keep .line for callers.
    err = DataError(f"{row.unit} {row.line}: {message}", path=row.path, fix=fix)
    err.line = row.line
    return err


def read_rows(path: str | Path, max_rows: Optional[int] = None, text_field: str = "text") -> list[Row]:
    """Read every record of `path` (or its first `max_rows`) as Rows.

    text_field: the key a .txt line is stored under, so plaintext data reads the
    same field whether it came from .txt or .jsonl.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            "file not found" if not path.exists() else "not a file",
            path=str(path),
            fix="check data.train_file / data.val_file (relative paths resolve against the launch directory).",
        )
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            f"unknown extension {path.suffix!r}",
            path=str(path),
            fix=f"convert the file to one of: {', '.join(SUPPORTED_EXTENSIONS)}.",
        )
    rows = reader(path, max_rows, text_field)
    if not rows:
        raise DataError("no rows", path=str(path),
                        fix="the file holds no records; fill it, or point data.train_file / data.val_file elsewhere.")
    return rows


def _decoded_lines(path: Path) -> list[tuple[int, str]]:
    """(physical line number, text) for each line; a bad byte is reported with its line."""
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            # utf-8-sig on the first line drops a BOM that some editors write.
            lines.append((number, raw.decode("utf-8-sig" if number == 1 else "utf-8")))
        except UnicodeDecodeError as exc:
            raise DataError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})", path=str(path), line=number,
                            fix="re-save the file as UTF-8.") from exc
    return lines


def _object_row(value: Any, path: Path, line: int, unit: str) -> Row:
    row = Row(record=value, path=str(path), line=line, unit=unit)
    if not isinstance(value, dict):
        raise row_error(row, f"expected a JSON object, got {type(value).__name__}",
                        fix="each record must be an object such as {\"messages\": [...]} or {\"text\": \"...\"}.")
    return row


def _read_jsonl(path: Path, max_rows: Optional[int], text_field: str) -> list[Row]:
    rows: list[Row] = []
    for number, text in _decoded_lines(path):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"malformed JSON: {exc.msg} (column {exc.colno})", path=str(path), line=number,
                            fix="each line of a .jsonl file must be one complete JSON object.") from exc
        rows.append(_object_row(value, path, number, "line"))
    return rows


def _read_json(path: Path, max_rows: Optional[int], text_field: str) -> list[Row]:
    text = "\n".join(line for _, line in _decoded_lines(path))
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fix = "fix the JSON syntax."
        if exc.msg == "Extra data":
            fix = "this looks like one object per line: rename the file to .jsonl."
        raise DataError(f"malformed JSON: {exc.msg}", path=str(path), line=exc.lineno, fix=fix) from exc
    if not isinstance(value, list):
        raise DataError(f"the top level is a {type(value).__name__}, not a list of records", path=str(path),
                        fix="wrap the records in a list: [{...}, {...}] (or write one object per line as .jsonl).")
    items = value if max_rows is None else value[:max_rows]
    return [_object_row(item, path, index, "item") for index, item in enumerate(items, start=1)]


def _read_csv(path: Path, max_rows: Optional[int], text_field: str) -> list[Row]:
    text = "\n".join(line for _, line in _decoded_lines(path))
    reader = csv.reader(io.StringIO(text))
    header: Optional[list[str]] = None
    rows: list[Row] = []
    start = 1  # a quoted field may span lines, so a record starts after the previous one ended
    for fields in reader:
        line, start = start, reader.line_num + 1
        if not fields or all(not f.strip() for f in fields):
            continue
        if header is None:
            header = fields
            continue
        if max_rows is not None and len(rows) >= max_rows:
            break
        if len(fields) != len(header):
            raise DataError(f"{len(fields)} fields, but the header has {len(header)}", path=str(path), line=line,
                            fix="quote fields that contain commas or newlines.")
        rows.append(Row(record=dict(zip(header, fields)), path=str(path), line=line))
    return rows


def _read_parquet(path: Path, max_rows: Optional[int], text_field: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"cannot read as parquet: {exc}", path=str(path),
                        fix="check that the file is valid parquet.") from exc
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return [Row(record=record, path=str(path), line=index, unit="row")
            for index, record in enumerate(table.to_pylist(), start=1)]


def _read_txt(path: Path, max_rows: Optional[int], text_field: str) -> list[Row]:
    rows: list[Row] = []
    for number, text in _decoded_lines(path):
        if max_rows is not None and len(rows) >= max_rows:
            break
        if text.strip():
            rows.append(Row(record={text_field: text}, path=str(path), line=number))
    return rows


_READERS: dict[str, Callable[[Path, Optional[int], str], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}
