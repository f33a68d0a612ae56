"""Pad a list of examples into one batch.

Labels are NOT shifted here: labels[b, t] is the token at input_ids[b, t] (or
IGNORE_INDEX), and the model/task shifts by one when it computes the loss. Keeping
one convention (Hugging Face's) in one place avoids the classic double-shift bug.
"""

from __future__ import annotations

from typing import Sequence

import torch

from soup.data.tokenize import IGNORE_INDEX


def collate_padded(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch.

    examples: dicts with input_ids [seq_i] and labels [seq_i] (lists of ints).
    Returns input_ids [batch, seq] long (pad_token_id on pads), labels [batch, seq]
    long (IGNORE_INDEX on pads), attention_mask [batch, seq] long (1 = real token).
    """
    if not examples:
        raise ValueError("collate_padded got an empty batch")
    seq = max(len(e["input_ids"]) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)
    for b, example in enumerate(examples):
        n = len(example["input_ids"])
        if len(example["labels"]) != n:
            raise ValueError(f"example {b}: {n} input_ids but {len(example['labels'])} labels")
        input_ids[b, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
