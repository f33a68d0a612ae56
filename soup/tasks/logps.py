"""Per-sequence log-probabilities with the LM head applied only where a label is.

A preference step needs log p(completion | prompt) summed over completion tokens.
Materialising [rows, seq, vocab] logits to read a few hundred positions wastes most
of the head's FLOPs and memory, so the model runs with logits_to_keep=1 and the head
is applied to the final hidden states of labelled positions only.
"""

from __future__ import annotations

import torch

from soup.losses.sft import IGNORE_INDEX


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row, and how many there are.

    batch: input_ids, attention_mask, labels [rows, seq] (labels unshifted; IGNORE_INDEX
    where no target). Returns (logps [rows] fp32, tokens [rows] long).
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]  # position t predicts token t + 1
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    head = model.get_output_embeddings()
    logits = head(hidden[mask]).float()  # [selected, vocab]
    token_logps = logits.log_softmax(-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    rows = mask.nonzero(as_tuple=True)[0]
    sums = torch.zeros(targets.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, rows, token_logps)
    return sums, mask.sum(-1)
