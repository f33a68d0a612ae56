"""Optimizers and learning-rate schedules.

Weight decay applies only to matrices: biases and normalisation weights (every
1-D parameter) are excluded, as decaying a norm's gain towards zero only hurts.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (ndim >= 2) and not decayed (biases, norms)."""
    decay, no_decay, seen = [], [], set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.ndim >= 2 and not name.endswith(".bias") else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, optim_cfg: DictConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, optim_cfg.weight_decay)
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
