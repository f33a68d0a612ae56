"""Optimizers and learning-rate schedules.

Weight decay applies only to matrices: biases and normalisation weights (every
1-D parameter) are excluded, as decaying a norm's gain towards zero only hurts.

Optimizers, by `optim.name` (one conf/optim/<name>.yaml each). Besides lr, weight_decay
and lr_groups (read by all), each reads the OptimConfig fields listed; validate()
rejects the others when changed from their defaults.

    adamw                torch AdamW; betas, eps, implementation (auto: fused kernel where torch has one)
    sgd                  torch SGD; momentum, nesterov
    adamw_8bit           bitsandbytes AdamW8bit, block-wise 8-bit moments (arXiv 2110.02861); betas, eps
    paged_adamw          bitsandbytes PagedAdamW: 32-bit moments in CUDA unified memory; betas, eps
    paged_adamw_8bit     bitsandbytes PagedAdamW8bit: both of the above; betas, eps
    lion / lion_8bit     bitsandbytes Lion, sign updates (arXiv 2302.06675); betas
    adafactor            transformers Adafactor, factored second moments (arXiv 1804.04235); fixed lr
    galore               galore-torch GaLoreAdamW, low-rank gradient projection (arXiv 2403.03507);
                         betas, eps, galore_rank, galore_update_proj_gap, galore_scale, galore_proj_type
    schedule_free_adamw  schedulefree AdamWScheduleFree (arXiv 2405.15682); betas, eps. It schedules
                         itself: sched must be constant, its warmup comes from sched.warmup_steps,
                         and the loop calls prepare_for_train / prepare_for_eval (below).

bitsandbytes keeps 32-bit state for tensors under 4096 elements (its min_8bit_size), so
the 8-bit options only quantise the larger matrices.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim.lr_scheduler import LambdaLR

from soup.errors import ConfigError, require


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
    """The optimizer named by optim_cfg.name over the trainable parameters of `model`."""
    groups = parameter_groups(
        model, optim_cfg.weight_decay, optim_cfg.lr,
        OmegaConf.to_container(optim_cfg.lr_groups) if optim_cfg.get("lr_groups") is not None else None,
        peft_cfg.loraplus_lr_ratio if peft_cfg is not None else None,
    )
    for group in groups:
        group.pop("names")
    if optim_cfg.name not in BUILDERS:
        raise ValueError(f"unknown optimizer {optim_cfg.name!r}")  # validate() rejects it earlier
    return BUILDERS[optim_cfg.name](model, groups, optim_cfg)


# --- one builder per optimizer: (model, parameter groups, optim config) -> optimizer ---

def _adamw(model, groups, cfg):
    implementation = cfg.implementation
    if implementation == "auto":
        implementation = "fused" if _fused_supported(groups) else "foreach"
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[implementation]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernel)


def _fused_supported(groups: list[dict]) -> bool:
    """Whether torch has a fused AdamW kernel for every parameter (floating point, on CUDA, CPU, ...)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(p.is_floating_point() and p.device.type in devices for g in groups for p in g["params"])


def _sgd(model, groups, cfg):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _bitsandbytes(class_name: str, reads_eps: bool = True) -> Callable:
    def build(model, groups, cfg):
        bnb = require("bitsandbytes", extra="optim", wanted_by=f"optim={cfg.name}")
        eps = {"eps": cfg.eps} if reads_eps else {}
        return getattr(bnb.optim, class_name)(groups, lr=cfg.lr, betas=tuple(cfg.betas), **eps)
    return build


def _adafactor(model, groups, cfg):
    # A fixed, given lr (relative_step=False) that the sched group shapes like any other;
    # scale_parameter=False so the lr is the step size, not a multiple of each weight's RMS.
    # No first moment (beta1=None): that is Adafactor's memory saving. Other settings are
    # the paper's: eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8.
    from transformers.optimization import Adafactor

    return Adafactor(groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False)


def _galore(model, groups, cfg):
    galore_torch = require("galore_torch", package="galore-torch", extra="optim", wanted_by="optim=galore")
    low_rank = galore_parameters(model)
    split = []
    for group in groups:
        projected = [p for p in group["params"] if id(p) in low_rank]
        rest = [p for p in group["params"] if id(p) not in low_rank]
        if projected:
            split.append({**group, "params": projected, "rank": cfg.galore_rank,
                          "update_proj_gap": cfg.galore_update_proj_gap, "scale": cfg.galore_scale,
                          "proj_type": cfg.galore_proj_type})
        if rest:
            split.append({**group, "params": rest})
    optimizer = galore_torch.GaLoreAdamW(split, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                         no_deprecation_warning=True)
    _make_galore_checkpointable(optimizer)
    return optimizer


def galore_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters GaLore projects: the 2-D weights of the decoder (attention and
    MLP matrices), not the input embedding or the output head, as in the paper."""
    excluded = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter)() if hasattr(model, getter) else None
        if module is not None and getattr(module, "weight", None) is not None:
            excluded.add(id(module.weight))
    return {id(p) for p in model.parameters() if p.requires_grad and p.ndim == 2 and id(p) not in excluded}


def _make_galore_checkpointable(optimizer: torch.optim.Optimizer) -> None:
    """GaLore keeps each matrix's projector as a Python object in the optimizer state, which
    torch.load(weights_only=True) refuses. The state dict carries its tensor instead
    ("galore_ortho_matrix"); loading rebuilds the projector, so the basis chosen at the last
    SVD, not a fresh one, projects the next step (exact resume)."""
    from galore_torch.galore_projector import GaLoreProjector

    def to_tensors(_optimizer, state_dict):
        for index, state in state_dict["state"].items():
            if "projector" in state:
                # A copy: the packed state shares its dicts with the live optimizer.
                state = dict(state)
                state["galore_ortho_matrix"] = state.pop("projector").ortho_matrix
                state_dict["state"][index] = state
        return state_dict

    def to_projectors(opt):
        for group in opt.param_groups:
            for param in group["params"]:
                state = opt.state.get(param, {})
                if "galore_ortho_matrix" in state:
                    projector = GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                                scale=group["scale"], proj_type=group["proj_type"])
                    projector.ortho_matrix = state.pop("galore_ortho_matrix")
                    state["projector"] = projector

    optimizer.register_state_dict_post_hook(to_tensors)
    optimizer.register_load_state_dict_post_hook(to_projectors)


def _schedule_free_adamw(model, groups, cfg):
    schedulefree = require("schedulefree", extra="optim", wanted_by="optim=schedule_free_adamw")
    # warmup_steps is set by build_scheduler, which knows the run's length.
    optimizer = schedulefree.AdamWScheduleFree(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    # The loop starts with model.train(); step() refuses to run in eval mode.
    optimizer.train()
    return optimizer


BUILDERS: dict[str, Callable[[torch.nn.Module, list[dict], DictConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "sgd": _sgd,
    "adamw_8bit": _bitsandbytes("AdamW8bit"),
    "paged_adamw": _bitsandbytes("PagedAdamW"),
    "paged_adamw_8bit": _bitsandbytes("PagedAdamW8bit"),
    "lion": _bitsandbytes("Lion", reads_eps=False),
    "lion_8bit": _bitsandbytes("Lion8bit", reads_eps=False),
    "adafactor": _adafactor,
    "galore": _galore,
    "schedule_free_adamw": _schedule_free_adamw,
}


# --- schedule-free: the weights have a training form and an evaluation form ---

def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    return callable(getattr(optimizer, "train", None)) and "train_mode" in optimizer.param_groups[0]


def prepare_for_train(optimizer: torch.optim.Optimizer) -> None:
    """Put the weights in their training form; a no-op for every optimizer but schedule-free.

    Schedule-free (arXiv 2405.15682) takes gradients at y, an interpolation between the
    averaged iterate x and the base iterate z; the model holds y while training and x while
    evaluating. Call this before the first step of a run (a resumed run too, after the
    checkpoint loads) and after each evaluation. Idempotent.
    """
    if is_schedule_free(optimizer):
        optimizer.train()


def prepare_for_eval(optimizer: torch.optim.Optimizer) -> None:
    """Put the weights in their evaluation form (schedule-free's average x); a no-op otherwise.

    Call before each evaluation and before saving the final model, whose weights should be x.
    Idempotent. The x <-> y swap is a lerp, so eval-then-train is not bit-exact in floating
    point; resume stays exact because a checkpoint saved in either form records the form
    (param_groups' train_mode) and the resumed run calls prepare_for_train from there.
    """
    if is_schedule_free(optimizer):
        optimizer.eval()


def effective_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """One line for the run log: package and class, and for torch AdamW the kernel `auto` picked."""
    group = optimizer.param_groups[0]
    name = f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"
    if isinstance(optimizer, torch.optim.AdamW):
        kernel = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "for_loop"
        return f"{name}({kernel})"
    return name


# --- learning-rate schedules ---

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
    if is_schedule_free(optimizer):
        # The optimizer schedules itself (validate() allows only sched=constant): it takes the
        # warmup, lr x (k+1)/warmup_steps for step k, and the scheduler stays at 1.
        warmup = sched_cfg.warmup_steps or int(sched_cfg.warmup_ratio * total_steps)
        for group in optimizer.param_groups:
            group["warmup_steps"] = warmup
        return LambdaLR(optimizer, lambda step: 1.0)
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, sched_cfg))
