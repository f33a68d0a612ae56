"""Gradient (activation) checkpointing tiers: recompute chosen modules in backward.

A checkpointed module keeps only its inputs during forward and runs again in backward
to rebuild what its gradient needs (Chen et al. 2016, https://arxiv.org/abs/1604.06174).
Tiers, least memory saved first:

    none       keep every activation.
    selective  recompute the attention module of every decoder block: its q/k/v,
               rotary outputs and attention output (about a seventh of a Llama block's
               activations) are dropped; norms and the MLP keep theirs.
    medium     recompute every other decoder block (blocks 0, 2, 4, ...): about half.
    full       recompute every decoder block: only each block's input is kept, plus
               one block's activations while it is recomputed in backward.
    auto       pick from the device's memory with `choose_tier` (rule there).

We wrap the chosen modules' `forward` in torch.utils.checkpoint (use_reentrant=False,
so kwargs such as position_embeddings and attention_mask pass through and inputs need
not require grad, which matters under LoRA). The wrapper is an instance attribute, so
state_dict keys, module hooks and save/load are unchanged, and it checkpoints only in
training mode with grad enabled: eval and no_grad run the plain forward.

Results are unchanged: the recompute replays the same ops with the RNG state restored
(preserve_rng_state), so loss and grads equal tier none (tests/unit/memory).

Do not combine with transformers' own `gradient_checkpointing_enable()` (each block
would be checkpointed twice): apply_checkpointing refuses a model where it is on.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from soup.errors import ConfigError

TIERS = ("none", "selective", "medium", "full", "auto")

# Estimated activation bytes kept per token per decoder block, in units of
# hidden_size x bytes-per-element, with no checkpointing. Measured on our Llama
# (intermediate = 2.69 x hidden, SDPA attention so no [seq x seq] matrix is kept):
# ~21, of which the MLP ~11 (gate, up, silu, product at 2.69 each), norms ~5, attention
# ~3 (q, k, v, attention output; k and v smaller under GQA), block input 1. The peaks
# per tier in tests/unit/memory/test_checkpointing.py are within ~15% of this model.
ACTIVATION_ELEMENTS_PER_TOKEN_PER_BLOCK = 21.0
# Share of a block's activations that selective (attention-only) recompute drops.
SELECTIVE_SAVED_FRACTION = 0.15
# auto keeps the estimated peak under this share of total memory: headroom for the
# allocator's fragmentation, the CUDA context, logits and eval.
AUTO_MEMORY_FRACTION = 0.8


# The keywords under which transformers hands a decoder block its KV cache, across versions.
CACHE_KEYWORDS = ("past_key_values", "cache", "layer_past")


class _CheckpointedForward:
    """A module's forward, run under torch.utils.checkpoint when training with grad.

    A callable object rather than a closure so that copy.deepcopy(model) rebinds it
    to the copied module.
    """

    def __init__(self, forward):
        self.forward = forward  # the module's bound forward

    def __call__(self, *args, **kwargs):
        module = self.forward.__self__
        if not (module.training and torch.is_grad_enabled()):
            return self.forward(*args, **kwargs)
        # A KV cache would be written twice (forward and recompute), so the recompute
        # would see twice the keys; training never reads it (transformers does the same).
        # transformers 5.24 renamed the keyword `past_key_values` to `cache`; clear every name.
        for cache_keyword in CACHE_KEYWORDS:
            if kwargs.get(cache_keyword) is not None:
                kwargs[cache_keyword] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        return checkpoint(self.forward, *args, use_reentrant=False, **kwargs)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (model.model.layers for Llama), through peft.

    Generic rule: among ModuleLists whose children all share one class, the one
    holding the most parameters (a vision tower's layers lose to the LM's).
    """
    best, best_params = None, -1
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params > best_params:
            best, best_params = module, n_params
    if best is None:
        raise ConfigError(
            f"checkpointing: found no list of decoder blocks in {type(model).__name__}.\n"
            "  fix: use checkpointing=none for this model."
        )
    return best


def attention_module(block: nn.Module) -> nn.Module:
    """The attention child of a decoder block (self_attn for Llama, attn for GPT-2)."""
    for name, child in block.named_children():
        if "attention" in type(child).__name__.lower() or name in ("self_attn", "attn", "attention"):
            return child
    raise ConfigError(
        f"checkpointing=selective: no attention module among the children of {type(block).__name__} "
        f"({', '.join(n for n, _ in block.named_children())}).\n"
        "  fix: use checkpointing=medium or full for this model."
    )


def _wrap(module: nn.Module) -> None:
    if isinstance(module.__dict__.get("forward"), _CheckpointedForward):
        raise ValueError(f"{type(module).__name__} is already checkpointed; apply_checkpointing runs once per model")
    module.forward = _CheckpointedForward(module.forward)


def remove_checkpointing(model: nn.Module) -> None:
    """Undo apply_checkpointing: every module gets its own forward back."""
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), _CheckpointedForward):
            del module.forward


def estimate_model_state_bytes(model: nn.Module) -> int:
    """Weights, plus for trainable ones a gradient and two fp32 AdamW moments.

    Tied weights are counted once. An upper bound for SGD (no moments).
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        if p.requires_grad:
            total += p.numel() * (p.element_size() + 8)
    return total


def estimate_activation_bytes(tier: str, tokens_per_micro_batch: int, hidden_size: int, num_layers: int,
                              bytes_per_activation: int = 4) -> int:
    """Estimated activation bytes kept for backward by the decoder blocks under `tier`.

    One block keeps A = 21 x tokens x hidden x bytes (measured on our Llama, see
    ACTIVATION_ELEMENTS_PER_TOKEN_PER_BLOCK) and a checkpointed block keeps only its
    input, I = tokens x hidden x bytes. Recompute rebuilds one block's A at a time.
        none: L*A   selective: L*A*(1 - 0.15)   medium: ceil(L/2)*I + floor(L/2)*A + A
        full: L*I + A
    """
    block_input = tokens_per_micro_batch * hidden_size * bytes_per_activation
    block = ACTIVATION_ELEMENTS_PER_TOKEN_PER_BLOCK * block_input
    if tier == "none":
        total = num_layers * block
    elif tier == "selective":
        total = num_layers * block * (1 - SELECTIVE_SAVED_FRACTION)
    elif tier == "medium":
        checkpointed = math.ceil(num_layers / 2)
        total = checkpointed * block_input + (num_layers - checkpointed) * block + block
    elif tier == "full":
        total = num_layers * block_input + block
    else:
        raise ValueError(f"no activation estimate for tier {tier!r}")
    return int(total)


def total_device_memory_bytes(device: torch.device) -> int:
    """Total memory of `device`: GPU memory for CUDA, physical RAM for CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    raise ValueError(f"checkpointing=auto: cannot read the memory of a {device.type} device; pass total_memory_bytes")


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def choose_tier(device: torch.device, total_memory_bytes: int, model_state_bytes: int, tokens_per_micro_batch: int,
                hidden_size: int, num_layers: int, bytes_per_activation: int = 4) -> tuple[str, str]:
    """The cheapest tier whose estimated peak fits in 80% of the device's memory.

    Rule, the same on CUDA (total GPU memory) and CPU (total RAM): estimated peak =
    model state (estimate_model_state_bytes) + decoder-block activations for the
    micro-batch (estimate_activation_bytes). Try none, selective, medium, full in that
    order (each recomputes more, so costs more time) and take the first whose peak
    is at most AUTO_MEMORY_FRACTION x total memory; if none fits, full, the least.
    Logits and the loss are not counted (the headroom covers them, or chunked CE).

    Returns (tier, reason), the reason a one-line account for the run log.
    """
    budget = AUTO_MEMORY_FRACTION * total_memory_bytes
    where = f"{_gb(budget)} budget ({AUTO_MEMORY_FRACTION:.0%} of {_gb(total_memory_bytes)} {device.type} memory)"
    for tier in ("none", "selective", "medium", "full"):
        peak = model_state_bytes + estimate_activation_bytes(
            tier, tokens_per_micro_batch, hidden_size, num_layers, bytes_per_activation)
        if peak <= budget:
            return tier, f"estimated peak {_gb(peak)} with {tier} fits the {where}"
    return "full", f"estimated peak {_gb(peak)} even with full exceeds the {where}; full keeps the least"


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.hidden_size)


def apply_checkpointing(model: nn.Module, tier: str, device: torch.device, total_memory_bytes: int | None = None, *,
                        tokens_per_micro_batch: int | None = None, bytes_per_activation: int = 4) -> str:
    """Checkpoint the modules `tier` names in `model` (in place); return a line for the run log.

    model: a transformers causal LM, optionally peft-wrapped. tier: none | selective |
    medium | full | auto. auto needs tokens_per_micro_batch (micro_batch_size x
    max_length) and reads total_memory_bytes from `device` when not given;
    bytes_per_activation is 2 under bf16/fp16 autocast, 4 in fp32.
    """
    if tier not in TIERS:
        raise ConfigError(f"checkpointing={tier!r} is not a tier.\n  fix: choose one of {', '.join(TIERS)}.")
    auto_prefix, auto_reason = "", ""
    if tier == "auto":
        if tokens_per_micro_batch is None:
            raise ValueError("checkpointing=auto needs tokens_per_micro_batch to estimate activation memory")
        if total_memory_bytes is None:
            total_memory_bytes = total_device_memory_bytes(device)
        tier, why = choose_tier(device, total_memory_bytes, estimate_model_state_bytes(model), tokens_per_micro_batch,
                                _hidden_size(model), len(decoder_blocks(model)), bytes_per_activation)
        auto_prefix, auto_reason = "auto -> ", f"; {why}"
    if tier == "none":
        return f"checkpointing: {auto_prefix}none{auto_reason}"

    blocks = decoder_blocks(model)
    if any(getattr(block, "gradient_checkpointing", False) for block in blocks):
        raise ConfigError(
            "checkpointing: transformers' own gradient checkpointing is already on for this model, so blocks "
            "would be checkpointed twice.\n  fix: leave gradient_checkpointing_enable() off and use checkpointing=<tier>."
        )
    if tier == "full":
        chosen = list(blocks)
    elif tier == "medium":
        chosen = list(blocks)[::2]
    else:
        chosen = [attention_module(block) for block in blocks]
    for module in chosen:
        _wrap(module)
    what = "attention in " if tier == "selective" else ""
    return f"checkpointing: {auto_prefix}{tier} ({what}{len(chosen)} of {len(blocks)} blocks){auto_reason}"
