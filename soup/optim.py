"""Optimizers and learning-rate schedules.

Weight decay applies only to matrices: biases and normalisation weights (every
1-D parameter) are excluded, as decaying a norm's gain towards zero only hurts.
"""

from __future__ import annotations

import math
import re

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import LambdaLR

from soup.errors import ConfigError


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                     lr_groups=None, loraplus_lr_ratio: float | None = None) -> list[dict]:
    """Trainable parameters grouped by (learning rate, weight decay).

    Decay applies to matrices only (not biases or norm weights). The learning rate is
    `lr`, unless a pattern of `lr_groups` ([{pattern, lr}], regex over parameter names,
    first match wins) matches the name, or LoRA+ scales a B matrix by loraplus_lr_ratio.
    """
    compiled = [(re.compile(g["pattern"]), float(g["lr"]), g["pattern"]) for g in (lr_groups or [])]
    matched = {pattern: 0 for _, _, pattern in compiled}
    groups: dict[tuple, dict] = {}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        param_lr = lr
        for regex, group_lr, pattern in compiled:
            if regex.search(name):
                param_lr = group_lr
                matched[pattern] += 1
                break
        else:
            # LoRA+ (arXiv 2402.12354): B learns faster than A for efficient feature learning.
            if loraplus_lr_ratio is not None and lr is not None and ".lora_B." in name:
                param_lr = lr * loraplus_lr_ratio
        decay = weight_decay if param.ndim >= 2 and not name.endswith(".bias") else 0.0
        key = (param_lr, decay)
        group = groups.setdefault(key, {"params": [], "weight_decay": decay, "names": []})
        if param_lr is not None:
            group["lr"] = param_lr
        group["params"].append(param)
        group["names"].append(name)
    unused = [pattern for pattern, count in matched.items() if count == 0]
    if unused:
        raise ConfigError(f"optim.lr_groups: pattern(s) {unused} match no trainable parameter.\n"
                          "  fix: check the regex against the names in model.named_parameters().")
    return list(groups.values())


def build_optimizer(model: torch.nn.Module, optim_cfg: DictConfig, peft_cfg: DictConfig | None = None) -> torch.optim.Optimizer:
    groups = parameter_groups(
        model, optim_cfg.weight_decay, optim_cfg.lr,
        OmegaConf.to_container(optim_cfg.lr_groups) if optim_cfg.get("lr_groups") is not None else None,
        peft_cfg.loraplus_lr_ratio if peft_cfg is not None else None,
    )
    for group in groups:
        group.pop("names")
    if optim_cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=optim_cfg.lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)
    raise ValueError(f"unknown optimizer {optim_cfg.name!r}")  # validate() rejects it earlier


def lr_multiplier(step: int, total_steps: int, sched_cfg: DictConfig) -> float:
    """Factor applied to the peak lr before optimizer step `step` (0-based)."""
    warmup = sched_cfg.warmup_steps or int(sched_cfg.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if sched_cfg.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = sched_cfg.min_lr_ratio
    if sched_cfg.name == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if sched_cfg.name == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {sched_cfg.name!r}")  # validate() rejects it earlier


def build_scheduler(optimizer: torch.optim.Optimizer, sched_cfg: DictConfig, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, sched_cfg))
