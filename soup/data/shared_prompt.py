"""Shared-prompt layout for preference batches: each prompt is run once, not twice.

The stacked layout (collate_pairs) forwards prompt+chosen and prompt+rejected as two
rows, so every prompt token goes through the model twice and each row is padded to the
batch's longest. Here one *unit* holds prompt, chosen and rejected end to end,

    tokens     p0 p1 p2 | c0 c1 | r0 r1 r2
    positions   0  1  2 |  3  4 |  3  4  5      (rejected restarts where chosen started)
    branch      0  0  0 |  1  1 |  2  2  2

and an attention mask lets a completion token see the prompt and the earlier tokens of
its own completion only. Every hidden state then equals the one the stacked layout
computes (same tokens attended, same positions), so the log-probs, the loss and the
gradients are the same (pinned in tests/unit/data/test_shared_prompt.py), at
(P + C + R) / (2P + C + R) of the token work. Units are then packed first-fit-decreasing
into rows as long as the batch's longest unit, which removes most of the padding too
(the same idea as Wang et al. 2024, "Accelerating Direct Preference Optimization with
Prefix Sharing", arXiv 2410.20305).

Targets can no longer be read off by shifting labels by one: the first rejected token is
predicted from the last prompt token, not from the token before it in the row. So the
batch names every target explicitly: target_rows / target_positions (the hidden state
that predicts it), target_ids, and target_sequences (which log-prob it adds to: sequence
i < n is unit i's first completion, n + i its second, as in the stacked layout's rows).

The same layout serves KTO/BCO rows (prompt, matched completion, mismatched completion
for the KL baseline). It needs an attention implementation that takes a 4-D mask: sdpa
(bool) or eager (float additive); flash attention has no such mask.
"""

from __future__ import annotations

from typing import Sequence

import torch

from soup.data.packing import MASK_ATTN_IMPLEMENTATIONS, MAX_MASK_CELLS, first_fit_decreasing

# Batch keys that describe the targets of the shared layout; never model inputs.
TARGET_KEYS = ("target_rows", "target_positions", "target_ids", "target_sequences", "n_sequences")
PROMPT, FIRST, SECOND = 0, 1, 2


def _unit(prompt: list[int], first: list[int], second: list[int]) -> dict:
    p, f = len(prompt), len(first)
    return {
        "input_ids": prompt + first + second,
        "position_ids": list(range(p + f)) + list(range(p, p + len(second))),
        "branch": [PROMPT] * p + [FIRST] * f + [SECOND] * len(second),
        # Offsets, within the unit, of the hidden state that predicts each completion
        # token: the last prompt token for a completion's first token.
        "first_predictors": [p - 1 + k for k in range(f)],
        "second_predictors": [p - 1] + [p + f + k - 1 for k in range(1, len(second))],
    }


def collate_shared_prompt(examples: Sequence[dict], pad_token_id: int, completion_keys: tuple[str, str],
                          attn_implementation: str) -> dict[str, torch.Tensor]:
    """One unit (prompt, first completion, second completion) per example, packed into rows.

    examples: dicts with prompt_ids and the two completion keys (chosen_ids/rejected_ids,
    or completion_ids/kl_completion_ids), lists of ints, prompt and completions non-empty.
    Returns input_ids, position_ids [rows, seq] long; attention_mask [rows, 1, seq, seq]
    (bool for sdpa, float additive for eager); target_rows, target_positions, target_ids,
    target_sequences [targets] long; n_sequences (0-dim, = 2 x examples).
    """
    if not examples:
        raise ValueError("collate_shared_prompt got an empty batch")
    if attn_implementation not in MASK_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"task.sequence_layout=shared_prompt needs model.attn_implementation in {MASK_ATTN_IMPLEMENTATIONS} "
            f"(a 4-D attention mask), got {attn_implementation!r}\n  fix: set task.sequence_layout=stacked."
        )
    first_key, second_key = completion_keys
    units = []
    for e in examples:
        if not e["prompt_ids"] or not e[first_key] or not e[second_key]:
            raise ValueError("the shared-prompt layout needs a non-empty prompt and completions")
        units.append(_unit(e["prompt_ids"], e[first_key], e[second_key]))
    lengths = [len(u["input_ids"]) for u in units]
    seq = max(lengths)
    # Rows as long as the longest unit: packing never makes a row longer than padding would.
    rows = first_fit_decreasing(lengths, seq)
    n_rows, n = len(rows), len(examples)
    if n_rows * seq * seq > MAX_MASK_CELLS:
        raise ValueError(
            f"the shared-prompt mask of this batch would hold {n_rows} x {seq}^2 cells (limit {MAX_MASK_CELLS:,})\n"
            "  fix: lower train.micro_batch_size or data.max_length, or set task.sequence_layout=stacked."
        )

    input_ids = torch.full((n_rows, seq), pad_token_id, dtype=torch.long)
    position_ids = torch.arange(seq).repeat(n_rows, 1)
    unit_of = torch.full((n_rows, seq), -1, dtype=torch.long)  # -1 on pads
    branch = torch.zeros((n_rows, seq), dtype=torch.long)
    target_rows, target_positions, target_ids, target_sequences = [], [], [], []
    for r, members in enumerate(rows):
        offset = 0
        for i in members:
            unit, length = units[i], lengths[i]
            span = slice(offset, offset + length)
            input_ids[r, span] = torch.tensor(unit["input_ids"])
            position_ids[r, span] = torch.tensor(unit["position_ids"])
            unit_of[r, span] = i
            branch[r, span] = torch.tensor(unit["branch"])
            for predictors, completion, sequence in ((unit["first_predictors"], examples[i][first_key], i),
                                                     (unit["second_predictors"], examples[i][second_key], n + i)):
                target_rows += [r] * len(completion)
                target_positions += [offset + p for p in predictors]
                target_ids += completion
                target_sequences += [sequence] * len(completion)
            offset += length
        # Pads count positions from 0 as a unit of their own (they attend to themselves only).
        position_ids[r, offset:] = torch.arange(seq - offset)

    allowed = shared_prompt_mask(unit_of, branch)
    if attn_implementation == "eager":
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = allowed
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask,
            "target_rows": as_long(target_rows), "target_positions": as_long(target_positions),
            "target_ids": as_long(target_ids), "target_sequences": as_long(target_sequences),
            "n_sequences": torch.tensor(2 * n)}


def shared_prompt_mask(unit_of: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """unit_of, branch [rows, seq] -> bool [rows, 1, seq, seq], True = the query may attend the key.

    A query attends keys of its own unit, not after it, that are prompt tokens or in its
    own branch; so a second-completion token never sees the first completion. A pad
    attends to itself only (a fully masked softmax row would give NaN under sdpa).
    """
    seq = unit_of.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    same_unit = (unit_of[:, :, None] == unit_of[:, None, :]) & (unit_of[:, :, None] >= 0)
    visible_branch = (branch[:, None, :] == PROMPT) | (branch[:, :, None] == branch[:, None, :])
    allowed = (same_unit & visible_branch & causal) | torch.eye(seq, dtype=torch.bool)
    return allowed[:, None]


def units_in(batch: dict[str, torch.Tensor]) -> int:
    """Pairs (or matched rows) in a preference batch of either layout."""
    if "n_sequences" in batch:
        return int(batch["n_sequences"]) // 2
    return batch["input_ids"].shape[0] // 2
