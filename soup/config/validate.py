"""Cross-group validation: every rule that involves more than one flag, in one place.

Runs on the composed config before any model or data is loaded. All problems are
collected and reported together, each naming the flags involved and the fix.
"""

from __future__ import annotations

import os

import torch
from omegaconf import DictConfig

from soup.errors import ConfigError

TASKS = ("sft", "pretrain")
MODELS = ("tiny", "hf")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "chatml", "plaintext", "tool_calling")
OVERLONG_POLICIES = ("truncate", "drop")
BACKENDS = ("transformers",)
QUANTS = ("none",)
KERNELS = ("none",)
CHECKPOINTING = ("none",)
OFFLOADS = ("none",)
PARALLELISMS = ("single",)
PEFTS = ("none", "lora")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("jsonl", "tensorboard", "wandb")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = ("float32", "bfloat16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError listing every problem in `cfg`, or return None."""
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def one_of(flag: str, value, valid) -> None:
        need(value in valid, f"{flag}={value!r} is not an option; valid: {', '.join(valid)}.")

    one_of("task", cfg.task.name, TASKS)
    one_of("model", cfg.model.name, MODELS)
    one_of("backend", cfg.backend.name, BACKENDS)
    one_of("quant", cfg.quant.name, QUANTS)
    one_of("kernels", cfg.kernels.name, KERNELS)
    one_of("checkpointing", cfg.checkpointing.name, CHECKPOINTING)
    one_of("offload", cfg.offload.name, OFFLOADS)
    one_of("parallelism", cfg.parallelism.name, PARALLELISMS)
    one_of("peft", cfg.peft.name, PEFTS)
    one_of("optim", cfg.optim.name, OPTIMIZERS)
    one_of("sched", cfg.sched.name, SCHEDULES)
    one_of("tracker", cfg.tracker.name, TRACKERS)
    one_of("train.precision", cfg.train.precision, PRECISIONS)
    one_of("model.dtype", cfg.model.dtype, DTYPES)
    one_of("model.attn_implementation", cfg.model.attn_implementation, ATTENTION)
    one_of("data.format", cfg.data.format, DATA_FORMATS)
    one_of("data.overlong", cfg.data.overlong, OVERLONG_POLICIES)
    one_of("train.device", cfg.train.device, ("auto", "cpu", "cuda"))

    _check_model(cfg, need)
    _check_data(cfg, need)
    _check_train(cfg, need)
    _check_device(cfg, need)
    _check_optim(cfg, need)

    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_model(cfg: DictConfig, need) -> None:
    if cfg.model.name == "hf":
        need(bool(cfg.model.path), "model=hf needs model.path (a local directory or a hub id).")
    if cfg.model.name == "tiny":
        need(cfg.model.path is None, "model.path is only read with model=hf; drop it or set model=hf.")
        tiny = cfg.model.tiny
        need(tiny.hidden_size % tiny.num_attention_heads == 0,
             "model.tiny.hidden_size must be a multiple of model.tiny.num_attention_heads.")
        need(tiny.num_attention_heads % tiny.num_key_value_heads == 0,
             "model.tiny.num_attention_heads must be a multiple of model.tiny.num_key_value_heads.")
    if cfg.model.dtype == "bfloat16" and cfg.peft.name == "none":
        # Pure-bf16 weights lose small AdamW updates to rounding; autocast keeps fp32 masters.
        need(False, "model.dtype=bfloat16 with a full fine-tune trains bf16 master weights, which "
                    "stalls small updates; use model.dtype=float32 train.precision=bf16 instead.")
    if cfg.peft.name == "lora":
        need(cfg.peft.r > 0, f"peft.r must be positive (got {cfg.peft.r}).")
        need(cfg.peft.alpha > 0, f"peft.alpha must be positive (got {cfg.peft.alpha}).")
        need(0.0 <= cfg.peft.dropout < 1.0, f"peft.dropout must be in [0, 1) (got {cfg.peft.dropout}).")


def _check_data(cfg: DictConfig, need) -> None:
    data = cfg.data
    if data.name == "file":
        need(bool(data.train_file), "data=file needs data.train_file=<path>.")
    need(0.0 <= data.val_split < 1.0, f"data.val_split must be in [0, 1) (got {data.val_split}).")
    need(not (data.val_file and data.val_split > 0),
         "data.val_file and data.val_split are both set; keep one (val_split=0 to use the file).")
    need(data.max_length >= 8, f"data.max_length must be at least 8 (got {data.max_length}).")
    need(data.max_rows is None or data.max_rows > 0, "data.max_rows must be positive or null.")
    if cfg.task.name == "pretrain":
        need(data.format in ("auto", "plaintext"),
             f"task=pretrain trains on plain documents; data.format={data.format} is a chat format "
             "(use task=sft, or data.format=plaintext).")
    if cfg.task.name == "sft":
        need(data.format != "plaintext",
             "task=sft needs conversations or instructions; data.format=plaintext belongs to task=pretrain.")


def _check_train(cfg: DictConfig, need) -> None:
    train = cfg.train
    need(train.micro_batch_size >= 1, "train.micro_batch_size must be at least 1.")
    need(train.grad_accum_steps >= 1, "train.grad_accum_steps must be at least 1.")
    need(train.max_steps > 0 or train.epochs >= 1, "set train.max_steps > 0 or train.epochs >= 1.")
    need(train.keep_last_checkpoints >= 1, "train.keep_last_checkpoints must be at least 1.")
    need(train.save_every_steps >= 0 and train.eval_every_steps >= 0,
         "train.save_every_steps and train.eval_every_steps must be >= 0 (0 = off).")
    need(train.log_every_steps >= 1, "train.log_every_steps must be at least 1.")
    need(train.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 = no clipping).")
    if train.eval_every_steps > 0 or train.eval_at_start:
        need(bool(cfg.data.val_file) or cfg.data.val_split > 0,
             "train.eval_every_steps / train.eval_at_start is set but there is no validation data; "
             "set data.val_split or data.val_file, or train.eval_every_steps=0 train.eval_at_start=false.")
    if cfg.resume not in (None, "auto"):
        need(os.path.isdir(cfg.resume), f"resume={cfg.resume!r} is not a checkpoint directory; "
                                         "use resume=auto or a path like <run dir>/checkpoints/step-100.")


def _check_device(cfg: DictConfig, need) -> None:
    cuda = torch.cuda.is_available()
    if cfg.train.device == "cuda":
        need(cuda, "train.device=cuda but no CUDA device is visible; use train.device=auto or cpu.")
    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and cuda)
    if cfg.train.precision == "fp16":
        need(on_cuda, "train.precision=fp16 needs a CUDA GPU (its grad scaler exists for GPU "
                      "fp16); on CPU use train.precision=bf16.")
    if cfg.model.attn_implementation == "flash_attention_2":
        need(on_cuda, "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the "
                      "flash-attn package; on CPU use sdpa.")


def _check_optim(cfg: DictConfig, need) -> None:
    optim, sched = cfg.optim, cfg.sched
    need(optim.lr > 0, f"optim.lr must be positive (got {optim.lr}).")
    need(optim.weight_decay >= 0, "optim.weight_decay must be >= 0.")
    need(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
         "optim.betas must be two numbers in [0, 1).")
    if optim.name != "sgd":
        need(optim.momentum == 0 and not optim.nesterov,
             f"optim.momentum/nesterov are SGD settings; optim={optim.name} does not read them.")
    if optim.name == "sgd":
        need(list(optim.betas) == [0.9, 0.999] and optim.eps == 1e-8,
             "optim.betas/eps are Adam settings; optim=sgd does not read them.")
        need(not optim.nesterov or optim.momentum > 0, "optim.nesterov needs optim.momentum > 0.")
    need(0.0 <= sched.warmup_ratio < 1.0, "sched.warmup_ratio must be in [0, 1).")
    need(sched.warmup_steps >= 0, "sched.warmup_steps must be >= 0.")
    need(0.0 <= sched.min_lr_ratio <= 1.0, "sched.min_lr_ratio must be in [0, 1].")
    if sched.name == "constant":
        need(sched.min_lr_ratio == 0.0, "sched.min_lr_ratio has no effect with sched=constant; "
                                        "use sched=linear or sched=cosine.")
    if cfg.tracker.name == "wandb":
        need(cfg.tracker.mode in ("offline", "online", "disabled"),
             "tracker.mode must be offline, online or disabled.")
