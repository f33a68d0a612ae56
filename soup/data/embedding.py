"""Sentence-embedding data: rows -> the token ids of each of their texts.

    {"anchor": "A plane is taking off.", "positive": "An air plane is taking off."}     a pair
    {"anchor": ..., "positive": ..., "negative": "A man is playing a flute."}           a pair, a hard negative
    {"sentence1": "A man plays.", "sentence2": "A man is playing.", "score": 4.2}       a scored pair

A file is read as scored pairs when its first row carries task.score_column, else as pairs, and
every row must then have the same fields. The two texts are task.text_columns, or (null) anchor and
positive, else sentence1 and sentence2, whichever the first row has. Hard negatives (pairs only) are
task.negative_columns, or (null) the columns named negative or negative_<n>.

Each text is tokenised on its own, as the tokenizer encodes one text (an encoder's [CLS] ... [SEP]).
A batch holds each column of texts (first, second, negatives) padded to its own longest text: queries
are often far shorter than the passages they retrieve, and padding them to the passages' length
would cost as much as the passages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from soup.data.classification import right_padded
from soup.data.readers import Row, row_error
from soup.errors import DataError

AUTO_TEXT_COLUMNS = (("anchor", "positive"), ("sentence1", "sentence2"))
NEGATIVE_COLUMN = re.compile(r"negative(_\d+)?")


@dataclass
class EmbeddingFormat:
    """How one file's rows read: its two text columns, hard-negative columns, and whether it is scored."""

    text_columns: tuple[str, str]
    negative_columns: tuple[str, ...] = ()
    score_column: str | None = None

    @property
    def scored(self) -> bool:
        return self.score_column is not None

    def describe(self) -> str:
        texts = " / ".join(self.text_columns)
        if self.scored:
            return f"scored pairs ({texts}, score '{self.score_column}')"
        negatives = f", hard negatives {', '.join(self.negative_columns)}" if self.negative_columns else ""
        return f"pairs ({texts}{negatives})"


def file_format(rows: Sequence[Row], text_columns, score_column: str, negative_columns) -> EmbeddingFormat:
    """The format of a file's rows, from its first row and the task's column options."""
    first = rows[0]
    fields = set(first.record)
    if text_columns is not None:
        texts = (str(text_columns[0]), str(text_columns[1]))
    else:
        texts = next((pair for pair in AUTO_TEXT_COLUMNS if set(pair) <= fields), None)
        if texts is None:
            raise row_error(first, f"no pair of text columns (anchor and positive, or sentence1 and sentence2) among "
                                   f"the row's fields: {', '.join(sorted(fields))}",
                            fix="name the row's two texts with task.text_columns=[first,second].")
    if score_column in fields:
        return EmbeddingFormat(texts, score_column=score_column)
    if negative_columns is None:
        negatives = tuple(sorted((f for f in fields if NEGATIVE_COLUMN.fullmatch(f)),
                                 key=lambda f: (len(f), f)))
    else:
        negatives = tuple(str(c) for c in negative_columns)
    return EmbeddingFormat(texts, negatives)


def _text(row: Row, column: str) -> str:
    if column not in row.record:
        raise row_error(row, f"the row has no '{column}' (its fields: {', '.join(sorted(row.record))})",
                        fix="give every row of the file the same fields as its first row.")
    value = row.record[column]
    if not isinstance(value, str) or not value.strip():
        raise row_error(row, f"'{column}' is {value!r}, not a non-empty string", fix="write the text as a string.")
    return value


def _score(row: Row, column: str) -> float:
    value = row.record.get(column)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise row_error(row, f"'{column}' is {value!r}, not a number",
                        fix="give every scored pair a numeric score (or drop the column to read pairs).")
    return float(value)


@dataclass
class EmbeddingReport:
    split: str
    source: str
    format: str
    rows: int
    truncated_texts: int
    dropped: int

    def summary(self) -> str:
        return (f"data {self.split}: {self.rows} rows of {self.source}: {self.format}; {self.truncated_texts} texts "
                f"cut to data.max_length, {self.dropped} rows dropped as too long")


def tokenize_rows(rows: Sequence[Row], fmt: EmbeddingFormat, tokenizer, max_length: int, overlong: str,
                  split: str, source: str) -> tuple[list[dict], EmbeddingReport]:
    """Examples {"texts": [ids of each text], "score": float | None}. A text longer than max_length is
    cut (data.overlong=truncate or truncate_or_drop), or its row dropped (data.overlong=drop)."""
    columns = [*fmt.text_columns, *fmt.negative_columns]
    texts = [[_text(row, column) for column in columns] for row in rows]
    scores = [_score(row, fmt.score_column) if fmt.scored else None for row in rows]
    flat = [text for row_texts in texts for text in row_texts]
    encoded = tokenizer(flat)["input_ids"] if flat else []
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > max_length]
    if too_long and overlong != "drop":
        cut = tokenizer([flat[i] for i in too_long], truncation=True, max_length=max_length)["input_ids"]
        for i, ids in zip(too_long, cut):
            encoded[i] = ids
    overlong_rows = {i // len(columns) for i in too_long}
    examples, dropped = [], 0
    for r, score in enumerate(scores):
        if overlong == "drop" and r in overlong_rows:
            dropped += 1
            continue
        ids = encoded[r * len(columns):(r + 1) * len(columns)]
        examples.append({"texts": [list(t) for t in ids], "score": score})
    if not examples:
        raise DataError(f"every {split} row has a text longer than data.max_length={max_length}, and "
                        "data.overlong=drop left none", path=source,
                        fix="raise data.max_length, or set data.overlong=truncate.")
    truncated = 0 if overlong == "drop" else len(too_long)
    return examples, EmbeddingReport(split, source, fmt.describe(), len(examples), truncated, dropped)


# Each column of texts in a batch, padded to its own longest text: its ids key and its mask key.
COLUMNS = (("input_ids", "attention_mask"), ("second_ids", "second_mask"), ("negative_ids", "negative_mask"))


def collate_embedding(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """The B first texts (input_ids, attention_mask), the B second texts (second_ids, second_mask)
    and, with hard negatives, each row's K negatives in row order (negative_ids, negative_mask:
    row i's at iK + k), each column right-padded to its own longest text (a short query is not
    padded to a long passage's length); scores (B,) float32, nan for unscored pairs."""
    per_row = len(examples[0]["texts"])
    if any(len(e["texts"]) != per_row for e in examples):
        raise ValueError("every example of a batch must have the same number of texts")
    columns = [[e["texts"][0] for e in examples], [e["texts"][1] for e in examples]]
    if per_row > 2:
        columns.append([ids for e in examples for ids in e["texts"][2:]])
    batch = {}
    for (ids_key, mask_key), texts in zip(COLUMNS, columns):
        batch[ids_key], batch[mask_key] = right_padded(texts, pad_id)
    batch["scores"] = torch.tensor([float("nan") if e["score"] is None else e["score"] for e in examples],
                                   dtype=torch.float32)
    return batch
