"""NEFTune (Jain et al., arXiv 2310.05914): noisy input embeddings during fine-tuning.

In training mode each embedding output gets uniform noise in [-s, s] with
s = alpha / sqrt(L * d) (L the sequence length, d the hidden size), which the paper
found to regularise instruction tuning. Evaluation and generation see clean embeddings.
"""

from __future__ import annotations

import math

import torch


def neftune_scale(alpha: float, seq_len: int, hidden_size: int) -> float:
    return alpha / math.sqrt(seq_len * hidden_size)


def add_neftune(model: torch.nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Hook the input embeddings; returns the handle (handle.remove() turns it off)."""

    def noisy(module: torch.nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        scale = neftune_scale(alpha, output.shape[-2], output.shape[-1])
        return output + torch.empty_like(output).uniform_(-scale, scale)

    return model.get_input_embeddings().register_forward_hook(noisy)
