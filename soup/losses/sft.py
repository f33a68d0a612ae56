"""Next-token cross-entropy, summed, so the caller controls normalisation.

Gradient accumulation must divide by the number of trained tokens in the whole
optimizer step, not average per micro-batch means (which over-weights tokens of
short micro-batches). Returning (sum, count) lets the loop do that exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Number of positions that carry a next-token target. labels: [batch, seq], unshifted."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of -log p(labels[t+1] | tokens <= t) over labelled positions.

    logits: [batch, seq, vocab] (any float dtype; upcast to fp32 for the softmax).
    labels: [batch, seq], IGNORE_INDEX where no loss applies. Unshifted: position t's
    logits predict labels[t + 1].
    Returns (loss_sum: scalar fp32 tensor, trained_tokens: int).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss_sum = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, int((shift_labels != IGNORE_INDEX).sum())
