"""Hidden states of labelled positions, and per-sequence log-probabilities from them.

A loss needs the LM head's output only where a label is. Materialising
[rows, seq, vocab] logits to read a few positions wastes most of the head's FLOPs and
memory, so the model runs with logits_to_keep=1 and the head (or a chunked loss that
owns the head) is applied to the final hidden states of labelled positions only.
"""

from __future__ import annotations

import torch

from soup.data.shared_prompt import TARGET_KEYS
from soup.distributed import unwrap
from soup.losses.sft import IGNORE_INDEX

# Batch entries that are targets or side information, not model inputs.
NON_MODEL_KEYS = ("labels", "ref_logps", "desirable") + TARGET_KEYS


def labelled_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Final hidden states at positions that predict a label.

    batch: input_ids, attention_mask (or a packed row's position_ids and mask), labels
    [rows, seq] unshifted (position t predicts labels[t + 1]).
    Or, in the shared-prompt layout (soup/data/shared_prompt.py), the positions its
    target_* entries name. Returns (hidden [selected, hidden_size], targets [selected],
    sequence of each [selected]).
    """
    hidden = final_hidden_states(model, batch)
    if "target_positions" in batch:  # the shared-prompt layout names its targets
        return (hidden[batch["target_rows"], batch["target_positions"]], batch["target_ids"],
                batch["target_sequences"])
    hidden = hidden[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    return hidden[mask], targets[mask], mask.nonzero(as_tuple=True)[0]


def final_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last layer's hidden states [rows, seq, hidden_size] (after the final norm)."""
    inputs = {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}
    # No KV cache: training never decodes, and building one costs time and memory.
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on selected hidden states, in fp32, with the model's logit soft-capping if any."""
    logits = unwrap(model).get_output_embeddings()(hidden).float()
    softcap = getattr(getattr(unwrap(model), "config", None), "final_logit_softcapping", None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row, and how many there are.

    Returns (logps [rows] fp32, tokens [rows] long).
    """
    hidden, targets, rows = labelled_hidden_states(model, batch)
    token_logps = head_logits(model, hidden).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    n_rows = int(batch["n_sequences"]) if "n_sequences" in batch else batch["labels"].shape[0]
    sums = torch.zeros(n_rows, dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)
    tokens = torch.zeros(n_rows, dtype=torch.long, device=rows.device).index_add(0, rows, torch.ones_like(rows))
    return sums, tokens


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float,
                     with_entropy: bool = False):
    """(B, T) log-probs of a rollout's sampled completion tokens under `model`, from logits /
    temperature (the distribution the sampler drew from); with_entropy: also the (B, T) entropy
    of each position's distribution (no gradient).

    batch: input_ids = left-padded prompt + right-padded completion, attention_mask,
    position_ids, and completion_ids (B, T), the last T columns of input_ids."""
    width = batch["completion_ids"].shape[1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    hidden = final_hidden_states(model, inputs)[:, -width - 1:-1]
    logits = head_logits(model, hidden)
    if temperature > 0:
        logits = logits / temperature
    log_probs = logits.log_softmax(-1)
    logps = log_probs.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logps
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logps, entropy
