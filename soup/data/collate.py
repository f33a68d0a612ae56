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


def _prompt_completion_rows(prompt_and_completions: list[tuple[list[int], list[int]]]) -> list[dict]:
    """Rows whose labels mask the prompt and train the completion."""
    return [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c} for p, c in prompt_and_completions]


def collate_pairs(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected of every pair stacked into one batch for a single forward pass.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected; labels cover the
    completions only. Adds ref_logps [2B] when the examples carry precomputed
    reference log-probs (ref_chosen, ref_rejected).
    """
    rows = _prompt_completion_rows([(e["prompt_ids"], e["chosen_ids"]) for e in examples]
                                   + [(e["prompt_ids"], e["rejected_ids"]) for e in examples])
    return add_ref_logps(collate_padded(rows, pad_token_id), examples, ("ref_chosen", "ref_rejected"))


def collate_unpaired(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """KTO/BCO rows: B matched prompt+completion rows, then B mismatched rows
    (prompt_i + another example's completion) for the KL reference point.

    Adds desirable [B] bool, and ref_logps [2B] when precomputed (ref_logp, ref_kl_logp).
    """
    rows = _prompt_completion_rows([(e["prompt_ids"], e["completion_ids"]) for e in examples]
                                   + [(e["prompt_ids"], e["kl_completion_ids"]) for e in examples])
    batch = collate_padded(rows, pad_token_id)
    batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
    return add_ref_logps(batch, examples, ("ref_logp", "ref_kl_logp"))


def add_ref_logps(batch: dict[str, torch.Tensor], examples: Sequence[dict], keys: tuple[str, str]) -> dict:
    """Add ref_logps [2B] (every example's first key, then every example's second) when all
    examples carry precomputed reference log-probs; the order matches the batch's sequences."""
    first, second = keys
    if all(first in e for e in examples):
        batch["ref_logps"] = torch.tensor([e[first] for e in examples] + [e[second] for e in examples],
                                          dtype=torch.float32)
    return batch
