"""Sequence classification data: rows -> (text[, pair]) token ids and a label.

    {"text": "The soup was lovely.", "label": "positive"}              one text, a class name
    {"query": "capital of France", "document": "Paris is ...", "label": 1}   a pair (cross-encoder)
    {"text": "...", "label": 0.73}                                      a score (regression)

The columns are task.text_column, task.pair_column (null: one text) and task.label_column.
Labels are class names (strings), class indices (ints) or scores (floats, which make the
task a regression with one output). Class names are sorted into ids 0..n-1, and the model's
config keeps the mapping (id2label / label2id), so a saved classifier names its classes.
A pair is tokenised as the tokenizer joins two texts (its own separator for encoders, the
two texts one after the other for a decoder, whose score is read at the last token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from soup.data.readers import Row, row_error
from soup.errors import DataError


@dataclass
class Labels:
    """How labels map to the model's outputs: names[i] is class i; regression has one output."""

    names: list[str] = field(default_factory=list)
    regression: bool = False

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.names)

    def id_of(self, row: Row, value: Any, column: str) -> int | float:
        if self.regression:
            return float(value)
        key = str(value)
        if key not in self.names:
            raise row_error(row, f"label {value!r} is not one of the training labels ({', '.join(self.names)})",
                            fix=f"give '{column}' one of those values, or add rows of that class to the train file.")
        return self.names.index(key)


def label_space(rows: Sequence[Row], column: str, num_labels: int | None) -> Labels:
    """The labels of the train rows: scores (any float that is not a whole number, or
    task.num_labels=1), else class names or indices. Raises DataError naming file:line."""
    values = []
    for row in rows:
        if column not in row.record:
            raise row_error(row, f"the row has no '{column}' (its fields: {', '.join(sorted(row.record))})",
                            fix=f"give every row a '{column}', or set task.label_column to the column that holds it.")
        value = row.record[column]
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise row_error(row, f"'{column}' is {value!r} ({type(value).__name__}), not a class name, "
                                 "class index or score", fix="write a string, an int or a float.")
        values.append(value)
    if num_labels == 1 or any(isinstance(v, float) and not v.is_integer() for v in values):
        bad = next((row for row, v in zip(rows, values) if isinstance(v, str)), None)
        if bad is not None:
            raise row_error(bad, f"'{column}' is text in a regression (scores elsewhere, or task.num_labels=1)",
                            fix="give every row a number, or leave task.num_labels null for classes.")
        return Labels(regression=True)
    if all(isinstance(v, (int, float)) for v in values):
        indices = sorted({int(v) for v in values})
        count = num_labels or indices[-1] + 1
        if indices[0] < 0 or indices[-1] >= count:
            raise DataError(f"class indices {indices[0]}..{indices[-1]} in '{column}' do not fit "
                            f"task.num_labels={count}", path=rows[0].path,
                            fix="number the classes 0..num_labels-1, or raise task.num_labels.")
        return Labels(names=[str(i) for i in range(count)])
    if any(not isinstance(v, str) for v in values):
        bad = next(row for row, v in zip(rows, values) if not isinstance(v, str))
        raise row_error(bad, f"'{column}' mixes class names and numbers", fix="use one kind of label in the file.")
    names = sorted(set(values))
    if num_labels is not None and len(names) != num_labels:
        # Named classes are the data's: a head of another size would have outputs no name stands for.
        raise DataError(f"{len(names)} classes in '{column}' ({', '.join(names)}) but task.num_labels={num_labels}",
                        path=rows[0].path, fix=f"set task.num_labels={len(names)} (or null: counted from the data), "
                                               "or number the classes 0..num_labels-1 to keep outputs for classes "
                                               "the train rows lack.")
    if len(names) < 2:
        raise DataError(f"every train row has the label {names[0]!r}: nothing to tell apart", path=rows[0].path,
                        fix="add rows of the other classes.")
    return Labels(names=names)


def text_of(row: Row, column: str) -> str:
    if column not in row.record:
        raise row_error(row, f"the row has no '{column}' (its fields: {', '.join(sorted(row.record))})",
                        fix=f"give every row a '{column}', or set the task's column option to the one holding it.")
    value = row.record[column]
    if not isinstance(value, str) or not value.strip():
        raise row_error(row, f"'{column}' is {value!r}, not a non-empty string", fix="write the text as a string.")
    return value


def tokenize_row(row: Row, tokenizer, text_column: str, pair_column: str | None,
                 max_length: int | None) -> list[int]:
    """The row's token ids (a pair joined as the tokenizer joins two texts), cut to max_length
    (None: uncut) from the end of the longer text."""
    texts = [text_of(row, text_column)] + ([text_of(row, pair_column)] if pair_column else [])
    if max_length is None:
        return list(tokenizer(*texts)["input_ids"])
    encoded = tokenizer(*texts, truncation="longest_first" if pair_column else True, max_length=max_length)
    return list(encoded["input_ids"])


def right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (N, T) long: the sequences right-padded to the longest."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return input_ids, mask


def collate_classification(examples: list[dict], pad_id: int, regression: bool) -> dict[str, torch.Tensor]:
    """Right-padded input_ids and attention_mask (B, T), labels (B,) long or float."""
    ids, mask = right_padded([e["input_ids"] for e in examples], pad_id)
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.float32 if regression else torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# --- listwise reranking --------------------------------------------------------------------------
def is_listwise(row: Row, pair_column: str | None) -> bool:
    """A row whose pair column holds a list of candidates is a listwise reranking group."""
    return pair_column is not None and isinstance(row.record.get(pair_column), list)


def listwise_group(row: Row, tokenizer, text_column: str, pair_column: str, label_column: str,
                   size: int, max_length: int | None) -> tuple[list[list[int]], list[float], int]:
    """A group {query, [candidates], [graded labels]}: the token ids of each (query, candidate) pair
    (cut to max_length when it is given), the labels, and how many pairs were longer than max_length.

    Every group has `size` candidates, labels >= 0, and at least one relevant (label > 0) candidate:
    the listwise loss spreads its target over the group's labels, and MRR needs a relevant one."""
    query = text_of(row, text_column)
    candidates, labels = row.record.get(pair_column), row.record.get(label_column)
    if not isinstance(labels, list) or len(labels) != len(candidates):
        raise row_error(row, f"'{label_column}' must be a list with one label per candidate of '{pair_column}' "
                             f"({len(candidates)}), got {labels!r}",
                        fix="give each candidate a graded relevance (0 irrelevant, higher more relevant).")
    if len(candidates) != size:
        raise row_error(row, f"the group has {len(candidates)} candidates, the file's first group {size}",
                        fix="give every group the same number of candidates (add irrelevant ones, or subsample).")
    if any(not isinstance(c, str) or not c.strip() for c in candidates):
        raise row_error(row, f"every candidate of '{pair_column}' must be a non-empty string",
                        fix="write each candidate as a string.")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in labels) or max(labels) <= 0:
        raise row_error(row, f"'{label_column}' must be numbers >= 0 with at least one above 0, got {labels}",
                        fix="mark the relevant candidates (label 1, or a higher grade); a group with none teaches "
                            "nothing and has no reciprocal rank.")
    full = [list(tokenizer(query, c)["input_ids"]) for c in candidates]
    too_long = sum(len(ids) > max_length for ids in full) if max_length is not None else 0
    if too_long:
        full = [list(tokenizer(query, c, truncation="longest_first", max_length=max_length)["input_ids"])
                for c in candidates]
    return full, [float(v) for v in labels], too_long


def collate_listwise(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (G * C, T), right-padded, group g's candidates at rows gC..gC+C-1;
    labels (G, C) float."""
    input_ids, mask = right_padded([ids for e in examples for ids in e["input_ids"]], pad_id)
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
