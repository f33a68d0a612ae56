"""Cross-group validation: every rule that involves more than one flag, in one place.

Runs on the composed config before any model or data is loaded. All problems are
collected and reported together, each naming the flags involved and the fix.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from soup.config.scope import CONF_DIR, command_line_fields, group_choices, unknown_keys, unread_fields
from soup.errors import ConfigError
from soup.precision import slow_cpu_bf16_error

PREFERENCE_TASKS = ("dpo", "ipo", "kto", "orpo", "simpo", "cpo", "bco", "preference")
TASKS = ("sft", "pretrain", *PREFERENCE_TASKS, "grpo", "rloo", "ppo", "reward_model", "prm", "distill", "classifier",
         "embedding")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")
EMBEDDING_LOSSES = ("info_nce", "cosent", "cosine")
BETA_SCHEDULES = ("constant", "linear", "cosine", "exponential")
REFERENCES = ("auto", "copy", "adapter", "precomputed", "none")
SEQUENCE_LAYOUTS = ("auto", "shared_prompt", "stacked")
MULTIPACK_LAYOUTS = ("packed", "padded")
MODELS = ("tiny", "hf")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "chatml", "plaintext", "tool_calling", "prompt_completion")
OVERLONG_POLICIES = ("truncate", "drop", "truncate_or_drop")
BACKENDS = ("transformers",)
QUANTS = ("none", "fp8", "int8_qat", "4bit", "8bit")
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
KERNELS = ("none", "liger", "flash_attn", "compile", "auto")
CUT_CE = ("off", "chunked", "cce")
CHECKPOINTING = ("none", "full", "medium", "selective", "auto")
OFFLOADS = ("none", "cpu", "disk")
PARALLELISMS = ("single", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
PEFTS = ("none", "lora", "dora", "rslora", "vera", "olora", "pissa", "loftq")
LORA_INITS = ("default", "gaussian")
OPTIMIZERS = ("adamw", "sgd", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "lion", "lion_8bit", "adafactor",
              "galore", "schedule_free_adamw")
SCHEDULES = ("constant", "linear", "cosine")
TRACKERS = ("jsonl", "tensorboard", "wandb")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: soup/precision.py
DTYPES = ("float32", "bfloat16")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """train.device as a torch.device; on CUDA each rank of a multi-process run takes the GPU of its local rank."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def validate(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Raise ConfigError listing every problem in `cfg`, or return None.

    `overrides` are the command-line overrides (Hydra's task overrides): a field they
    name counts as set even at its default value (soup/config/scope.py), and they decide
    which of two fields saying the same thing wins (resolve_alternatives, which may
    clear the other in `cfg`).
    """
    missing = unset_group_options(cfg, overrides)
    if missing:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in missing))
    unknown = unknown_keys(cfg)
    if unknown:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in unknown))
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

    resolve_alternatives(cfg, overrides, need)
    problems.extend(unread_fields(cfg, overrides))
    if cfg.task.name in PREFERENCE_TASKS:
        _check_preference(cfg, need)
    if cfg.task.name in ("grpo", "rloo"):
        _check_grpo(cfg, need)
    if cfg.task.name in ("grpo", "rloo", "ppo"):
        _check_online(cfg, need)
    if cfg.task.name == "ppo":
        _check_ppo(cfg, need)
    if cfg.task.name == "distill":
        _check_distill(cfg, need)
    if cfg.task.name == "classifier":
        _check_classifier(cfg, need)
    if cfg.task.name == "embedding":
        _check_embedding(cfg, need)
    if cfg.parallelism.name != "single":
        _check_ranks(cfg, need)
    _check_model(cfg, need)
    _check_data(cfg, need)
    _check_train(cfg, need)
    _check_device(cfg, need)
    _check_optim(cfg, need)
    _check_memory(cfg, need)

    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def unset_group_options(cfg: DictConfig, overrides) -> list[str]:
    """A message for each group whose chosen option leaves a required value unset, which
    happens when the choice names one of soup's schemas (task=task_schema) instead of an option."""
    chosen = group_choices(overrides)
    problems = []
    for key in sorted(OmegaConf.missing_keys(cfg)):
        group, _, field_name = key.partition(".")
        if field_name != "name":  # a value an option leaves to the user (model.path): checked below
            continue
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")) if (CONF_DIR / group).is_dir() else []
        choice = f"{group}={chosen[group]}" if group in chosen else f"this {group} option"
        problems.append(f"{key} has no value: {choice} is not one of soup's options (names ending in _schema are "
                        f"its internal schemas). Fix: choose {group}=" + "|".join(options) + ".")
    return problems


# Pairs of fields that say the same thing two ways, with the value that means "not set".
ALTERNATIVES = (
    ("train.max_steps", "train.epochs", None, "the run's length"),
    ("sched.warmup_steps", "sched.warmup_ratio", 0, "the warmup"),
)


def resolve_alternatives(cfg: DictConfig, overrides, need) -> None:
    """One rule for each pair in ALTERNATIVES (e.g. train.max_steps optimizer steps or
    train.epochs passes over the data; one pass when neither is set): set one. A config
    file may set one as a default (the demo data sets train.max_steps=150, sched=cosine a
    warmup_ratio); the one named on the command line replaces it, and the other is
    cleared in `cfg`. Both set any other way is an error."""
    named = command_line_fields(overrides)
    for first, second, unset, meaning in ALTERNATIVES:
        first_value, second_value = OmegaConf.select(cfg, first), OmegaConf.select(cfg, second)
        if first_value == unset or second_value == unset:
            continue
        if (first in named) != (second in named):
            group, key = (second if first in named else first).split(".")
            cfg[group][key] = unset
            continue
        unset_text = "null" if unset is None else unset
        need(False, f"{first}={first_value} and {second}={second_value} both set {meaning}; set one "
                    f"({first}={unset_text} or {second}={unset_text} clears the other).")


def _check_model(cfg: DictConfig, need) -> None:
    if cfg.model.name == "hf":
        need(bool(cfg.model.path), "model=hf needs model.path (a local directory or a hub id).")
    if cfg.model.name == "tiny":
        tiny = cfg.model.tiny
        need(tiny.hidden_size % tiny.num_attention_heads == 0,
             "model.tiny.hidden_size must be a multiple of model.tiny.num_attention_heads.")
        need(tiny.num_attention_heads % tiny.num_key_value_heads == 0,
             "model.tiny.num_attention_heads must be a multiple of model.tiny.num_key_value_heads.")
    if cfg.model.dtype == "bfloat16" and cfg.peft.name == "none":
        # Pure-bf16 weights lose small AdamW updates to rounding; autocast keeps fp32 masters.
        need(False, "model.dtype=bfloat16 with a full fine-tune trains bf16 master weights, which "
                    "stalls small updates; use model.dtype=float32 train.precision=bf16 instead.")
    _check_peft(cfg, need)


def _check_peft(cfg: DictConfig, need) -> None:
    peft = cfg.peft
    if peft.name != "none":
        need(peft.r > 0, f"peft.r must be positive (got {peft.r}).")
        need(peft.alpha > 0, f"peft.alpha must be positive (got {peft.alpha}).")
        need(0.0 <= peft.dropout < 1.0, f"peft.dropout must be in [0, 1) (got {peft.dropout}).")
        need(peft.init in LORA_INITS, f"peft.init={peft.init!r}; valid: {', '.join(LORA_INITS)} "
                                      "(olora, pissa and loftq are their own peft options).")
        for field_name in ("rank_pattern", "alpha_pattern"):
            value = peft[field_name]
            need(value is None or (OmegaConf.is_dict(value) and all(isinstance(v, (int, float)) for v in value.values())),
                 f"peft.{field_name} maps module-name patterns to numbers, e.g. {{q_proj: 16}}.")
    if peft.loraplus_lr_ratio is not None:
        need(peft.loraplus_lr_ratio > 0, "peft.loraplus_lr_ratio must be positive (B matrices get lr x ratio).")
    need(peft.freeze_layers >= 0 and 0.0 <= peft.freeze_ratio < 1.0,
         "peft.freeze_layers must be >= 0 and peft.freeze_ratio in [0, 1).")
    need(not (peft.freeze_layers and peft.freeze_ratio), "set peft.freeze_layers or peft.freeze_ratio, not both.")
    if peft.name == "loftq":
        import importlib.util

        need(peft.loftq_bits in (2, 4, 8), "peft.loftq_bits must be 2, 4 or 8.")
        need(all(importlib.util.find_spec(m) is not None for m in ("scipy", "bitsandbytes")),
             "peft=loftq needs scipy and bitsandbytes (peft's LoftQ init quantises the base with them): "
             "pip install 'soup-harness[loftq]'.")
        need(torch.cuda.is_available(), "peft=loftq: peft's LoftQ init quantises the base weights on a CUDA GPU "
                                        "(it fails on a CPU-only torch); use peft=pissa or peft=lora here.")
    neftune = cfg.train.neftune_alpha
    if neftune is not None:
        need(neftune > 0, f"train.neftune_alpha must be positive (got {neftune}); null turns NEFTune off.")
    groups = cfg.optim.lr_groups
    if groups is not None:
        import re

        ok = OmegaConf.is_list(groups) and all(OmegaConf.is_dict(g) and set(g.keys()) == {"pattern", "lr"}
                                               for g in groups)
        need(ok, "optim.lr_groups is a list of {pattern: <regex over parameter names>, lr: <number>}.")
        if ok:
            for i, group in enumerate(groups):
                try:
                    re.compile(group.pattern)
                except re.error as exc:
                    need(False, f"optim.lr_groups[{i}].pattern {group.pattern!r} is not a valid regex: {exc}.")
                need(isinstance(group.lr, (int, float)) and group.lr > 0,
                     f"optim.lr_groups[{i}].lr must be a positive number.")


def _check_data(cfg: DictConfig, need) -> None:
    data = cfg.data
    if data.name == "file":
        need(bool(data.train_file), "data=file needs data.train_file=<path>.")
    need(0.0 <= data.val_split < 1.0, f"data.val_split must be in [0, 1) (got {data.val_split}).")
    need(not (data.val_file and data.val_split > 0),
         "data.val_file and data.val_split are both set; keep one (val_split=0 to use the file).")
    need(data.max_length >= 8, f"data.max_length must be at least 8 (got {data.max_length}).")
    need(data.max_rows is None or data.max_rows > 0, "data.max_rows must be positive or null.")
    for cap in ("max_prompt_length", "max_completion_length"):
        # A completion cut to 0 tokens would reach losses that divide by its length.
        need(data[cap] is None or data[cap] >= 1, f"data.{cap} must be at least 1 token, or null.")
    if cfg.task.name == "pretrain":
        need(data.format in ("auto", "plaintext"),
             f"task=pretrain trains on plain documents; data.format={data.format} is a chat format "
             "(use task=sft, or data.format=plaintext).")
    if cfg.task.name != "pretrain":
        need(data.format != "plaintext",
             "task=sft needs conversations or instructions; data.format=plaintext belongs to task=pretrain.")


def _check_train(cfg: DictConfig, need) -> None:
    train = cfg.train
    need(train.micro_batch_size >= 1, "train.micro_batch_size must be at least 1.")
    need(train.grad_accum_steps >= 1, "train.grad_accum_steps must be at least 1.")
    need(train.max_steps is None or train.max_steps > 0, f"train.max_steps must be positive or null (got {train.max_steps}).")
    need(train.epochs is None or train.epochs >= 1, f"train.epochs must be at least 1 or null (got {train.epochs}).")
    need(train.keep_last_checkpoints >= 1, "train.keep_last_checkpoints must be at least 1.")
    need(train.save_every_steps >= 0 and train.eval_every_steps >= 0,
         "train.save_every_steps and train.eval_every_steps must be >= 0 (0 = off).")
    need(train.log_every_steps >= 1, "train.log_every_steps must be at least 1.")
    need(train.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 = no clipping).")
    if train.auto_micro_batch_size:
        on_cuda = train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())
        need(on_cuda, "train.auto_micro_batch_size probes the largest micro-batch that fits in CUDA memory; on a "
                      "CPU there is no out-of-memory error to catch (a batch too large swaps or is killed).\n"
                      "    fix: set train.micro_batch_size yourself (and train.grad_accum_steps for the global batch).")
        need(cfg.task.name not in ("grpo", "rloo", "ppo") and not cfg.data.multipack
             and cfg.parallelism.name == "single",
             "train.auto_micro_batch_size probes one process's offline batches; it does not apply to online tasks "
             "(grpo, rloo, ppo), data.multipack or several ranks.\n    fix: set train.micro_batch_size yourself.")
    if train.lr_finder:
        need(0 < train.lr_finder_min_lr < train.lr_finder_max_lr,
             f"train.lr_finder sweeps from train.lr_finder_min_lr to train.lr_finder_max_lr: they must satisfy "
             f"0 < min < max (got {train.lr_finder_min_lr} and {train.lr_finder_max_lr}).")
        need(train.lr_finder_steps >= 3, f"train.lr_finder_steps must be at least 3 (got {train.lr_finder_steps}).")
        need(cfg.resume is None, "train.lr_finder=true sweeps the lr from the start of a fresh run; it does not "
                                 "resume.\n    fix: drop resume, or train.lr_finder=false.")
        need(cfg.parallelism.name == "single", f"train.lr_finder runs in one process; parallelism="
                                               f"{cfg.parallelism.name} is not supported by the sweep.\n    fix: "
                                               "parallelism=single (the suggested lr holds for the same global batch).")
    if train.spike_factor is not None:
        need(train.spike_factor > 1, f"train.spike_factor must be > 1: a spike is a loss above that many times "
                                     f"the recent median (got {train.spike_factor}; 3 is a usual choice).")
        need(train.spike_window >= 2, f"train.spike_window must be at least 2 steps (got {train.spike_window}).")
        need(train.spike_max_recoveries >= 1, "train.spike_max_recoveries must be at least 1.")
        need(0 < train.spike_lr_factor <= 1, f"train.spike_lr_factor must be in (0, 1] (got {train.spike_lr_factor}).")
        need(train.save_every_steps > 0, "train.spike_factor rolls a spiking run back to its newest checkpoint, and "
                                         "train.save_every_steps=0 writes none.\n    fix: train.save_every_steps=50 "
                                         "(or another cadence: a spike loses the steps since the last one).")
        need(cfg.parallelism.name not in ("deepspeed_zero2", "deepspeed_zero3"),
             f"train.spike_factor with parallelism={cfg.parallelism.name}: DeepSpeed's engine keeps its own "
             "gradient state, which the rollback does not reset yet.\n    fix: parallelism=ddp or fsdp2.")
    if train.eval_gate is not None:
        from soup.evals.gate import check_gate_config

        check_gate_config(train, need)
        need(cfg.parallelism.name == "single", f"train.eval_gate runs its suite in one process; parallelism="
                                               f"{cfg.parallelism.name} has several.\n    fix: parallelism=single, or "
                                               "evaluate checkpoints with python -m soup.eval beside the run.")
        need(cfg.task.name not in ("classifier", "embedding", "reward_model", "prm"),
             f"train.eval_gate evaluates a language model, and task={cfg.task.name} trains a "
             f"{'classifier' if cfg.task.name != 'embedding' else 'text encoder'}.\n    fix: drop train.eval_gate "
             "(its own metrics come with train.eval_every_steps).")
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
                      "fp16); on CPU use train.precision=auto (bf16 where the CPU has native bf16).")
    if cfg.train.precision == "bf16" and not on_cuda:
        slow_bf16 = slow_cpu_bf16_error()  # None unless this CPU runs bf16 ~100x slower than fp32
        need(slow_bf16 is None, slow_bf16)
    if cfg.model.attn_implementation == "flash_attention_2":
        need(on_cuda, "model.attn_implementation=flash_attention_2 needs a CUDA GPU and the "
                      "flash-attn package; on CPU use sdpa.")


def _check_optim(cfg: DictConfig, need) -> None:
    import importlib.util

    optim, sched = cfg.optim, cfg.sched
    need(optim.lr > 0, f"optim.lr must be positive (got {optim.lr}).")
    need(optim.weight_decay >= 0, "optim.weight_decay must be >= 0.")
    need(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
         "optim.betas must be two numbers in [0, 1).")
    if optim.name == "sgd":
        need(not optim.nesterov or optim.momentum > 0, "optim.nesterov needs optim.momentum > 0.")
    need(optim.implementation in ("auto", "fused", "foreach", "for_loop"),
         f"optim.implementation={optim.implementation!r}; valid: auto, fused, foreach, for_loop.")

    packages = {"adamw_8bit": "bitsandbytes", "paged_adamw": "bitsandbytes", "paged_adamw_8bit": "bitsandbytes",
                "lion": "bitsandbytes", "lion_8bit": "bitsandbytes", "galore": "galore_torch",
                "schedule_free_adamw": "schedulefree"}
    if optim.name in packages:
        module = packages[optim.name]
        need(importlib.util.find_spec(module) is not None,
             f"optim={optim.name} needs the {module.replace('_', '-')} package: pip install 'soup-harness[optim]'.")
    if optim.name.startswith("paged_"):
        on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
        need(on_cuda, f"optim={optim.name} pages its state between GPU and CPU memory through CUDA unified "
                      f"memory, so it needs a CUDA GPU (on CPU bitsandbytes falls back to the unpaged "
                      f"optimizer); use optim={optim.name.removeprefix('paged_')}.")
    if optim.name == "galore":
        need(optim.galore_rank > 0, "optim.galore_rank must be positive.")
        need(optim.galore_update_proj_gap > 0, "optim.galore_update_proj_gap must be positive.")
        need(optim.galore_scale > 0, "optim.galore_scale must be positive.")
        need(optim.galore_proj_type in ("std", "reverse_std", "left", "right", "full"),
             f"optim.galore_proj_type={optim.galore_proj_type!r}; valid: std, reverse_std, left, right, full.")
        need(cfg.peft.name == "none", f"optim=galore projects the gradients of the full weight matrices, an "
                                      f"alternative to adapters; with peft={cfg.peft.name} use another optim, "
                                      "or peft=none for GaLore.")
    if optim.name == "schedule_free_adamw":
        need(sched.name == "constant", f"optim=schedule_free_adamw schedules itself (its iterate averaging replaces "
                                       f"the decay), so sched={sched.name} would fight it: use sched=constant; "
                                       "sched.warmup_steps / warmup_ratio still set its warmup.")

    need(0.0 <= sched.warmup_ratio < 1.0, "sched.warmup_ratio must be in [0, 1).")
    need(sched.warmup_steps >= 0, "sched.warmup_steps must be >= 0.")
    need(0.0 <= sched.min_lr_ratio <= 1.0, "sched.min_lr_ratio must be in [0, 1].")
    if cfg.tracker.name == "wandb":
        need(cfg.tracker.mode in ("offline", "online", "disabled"),
             "tracker.mode must be offline, online or disabled.")


def _check_ranks(cfg: DictConfig, need) -> None:
    """What several processes cannot do yet, refused rather than done differently on each rank."""
    one = f"parallelism={cfg.parallelism.name}"
    need(cfg.offload.name != "disk", f"{one} with offload=disk: the ranks would share one scratch directory. "
                                     "Use offload=none (or parallelism=single).")
    reference = cfg.task.get("reference")
    need(reference != "precomputed", f"{one} with task.reference=precomputed: every rank would write the same "
                                     "reference cache. Use task.reference=auto (or copy / adapter).")
    if cfg.parallelism.name == "ddp":
        return
    if cfg.parallelism.name == "fsdp2":
        need(cfg.quant.name != "8bit", f"{one} with quant=8bit: bitsandbytes keeps the 8-bit weights' scales on "
                                       "the parameter object, which FSDP2 replaces with its shard. Use quant=4bit "
                                       "(QLoRA shards under fsdp2), or parallelism=ddp.")
    need(cfg.kernels.name == "none", f"{one} with kernels={cfg.kernels.name}: torch.compile around sharded "
                                     "blocks is not wired yet. Use kernels=none.")
    on_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    for flag in ("cpu_offload", "offload_optimizer", "offload_param"):
        need(not cfg.parallelism.get(flag) or on_cuda,
             f"{one} with parallelism.{flag}=true moves state from GPU to host memory; without CUDA it is there "
             f"already. Use parallelism.{flag}=false.")
    if cfg.parallelism.name.startswith("deepspeed"):
        need(cfg.train.precision != "fp16", f"{one} with train.precision=fp16: DeepSpeed would scale the loss "
                                            "itself, beside soup's grad scaler. Use train.precision=bf16 or fp32.")
        need(cfg.quant.name == "none", f"{one} with quant={cfg.quant.name}: quantised bases under DeepSpeed are not "
                                       "wired. Use parallelism=fsdp2 with quant=4bit (QLoRA), or parallelism=ddp.")
        need(importlib.util.find_spec("deepspeed") is not None,
             f"{one} needs DeepSpeed, which is not installed.\n  fix: pip install 'soup-harness[deepspeed]' "
             "(it builds no ops at install).")


def _check_grpo(cfg: DictConfig, need) -> None:
    from soup.losses.grpo import IS_LEVELS, SCALES
    from soup.tasks.grpo import LOSS_TYPE_PARTS

    task = cfg.task
    one = f"task={task.name}"
    need(task.loss_type in LOSS_TYPE_PARTS,
         f"{one}: task.loss_type={task.loss_type!r}; valid: {', '.join(LOSS_TYPE_PARTS)}.")
    need(task.num_iterations >= 1, f"{one}: task.num_iterations must be at least 1 (optimizer steps per "
                                   f"generation batch; got {task.num_iterations}).")
    need(0 < task.epsilon < 1, f"{one}: task.epsilon must be in (0, 1) (the ratio is clipped to 1 - epsilon "
                               f"from below; got {task.epsilon}).")
    need(task.epsilon_high is None or task.epsilon_high > 0, f"{one}: task.epsilon_high must be > 0 (or null: "
                                                             "epsilon).")
    need(task.delta is None or task.delta > 1, f"{one}: task.delta caps the ratio from above and must be > 1 "
                                               f"(INTELLECT-2 uses 4; got {task.delta}).")
    need(task.importance_sampling_level in IS_LEVELS, f"{one}: task.importance_sampling_level="
                                                      f"{task.importance_sampling_level!r}; valid: token, sequence.")
    need(task.tis_threshold is None or task.tis_threshold > 0, f"{one}: task.tis_threshold must be > 0 (a cap on "
                                                               "the sampler correction, e.g. 2.0) or null.")
    need(task.off_policy_mask_threshold is None or task.off_policy_mask_threshold >= 0,
         f"{one}: task.off_policy_mask_threshold must be >= 0 (a KL, e.g. 0.5) or null.")
    need(task.replay_buffer_size >= 0, f"{one}: task.replay_buffer_size must be >= 0 (0: no buffer).")
    need(task.ref_sync_steps >= 0, f"{one}: task.ref_sync_steps must be >= 0 (0: the reference never moves).")
    need(0 < task.ref_model_ema_alpha <= 1, f"{one}: task.ref_model_ema_alpha must be in (0, 1] "
                                            "(1 copies the policy into the reference).")
    if task.ref_sync_steps and task.beta and cfg.peft.name != "none":
        need(False, f"{one} with task.ref_sync_steps and peft={cfg.peft.name}: the reference is the policy with "
                    "its adapters disabled, the frozen base, which cannot move toward the policy. Use peft=none "
                    "(a reference copy that moves), or task.ref_sync_steps=0.")
    need(task.num_generations >= 2, f"{one}: task.num_generations must be at least 2 (a group needs two "
                                    f"completions to compare; got {task.num_generations}).")
    need(task.scale_rewards in SCALES, f"{one}: task.scale_rewards={task.scale_rewards!r}; valid: {', '.join(SCALES)}.")
    need(task.beta >= 0, f"{one}: task.beta must be >= 0.")


def _check_online(cfg: DictConfig, need) -> None:
    """What grpo, rloo and ppo share: the prompt template, sampling and the rewards."""
    task = cfg.task
    one = f"task={task.name}"
    from soup.tasks.prompts import PROMPT_TEMPLATES

    template = task.prompt_template
    need(template is None or template in PROMPT_TEMPLATES or "{prompt}" in str(template),
         f"{one}: task.prompt_template={template!r} is neither a named template ({', '.join(PROMPT_TEMPLATES)}) "
         "nor a text holding {prompt}, where each prompt goes.")
    stop = task.stop
    need(stop is None or (OmegaConf.is_list(stop) and all(isinstance(x, str) and x for x in stop)),
         f"{one}: task.stop must be a list of non-empty strings, e.g. task.stop='[\"</answer>\"]'.")
    need(task.max_completion_length >= 1, f"{one}: task.max_completion_length must be at least 1.")
    need(task.max_completion_length < cfg.data.max_length,
         f"{one}: task.max_completion_length={task.max_completion_length} leaves no room for the prompt in "
         f"data.max_length={cfg.data.max_length}; raise data.max_length.")
    need(task.temperature > 0, f"{one}: task.temperature must be > 0: online RL learns from sampled completions "
                               "(at 0 every completion of a grpo group is the same, so nothing trains).")
    need(0 < task.top_p <= 1, f"{one}: task.top_p must be in (0, 1] (got {task.top_p}).")
    need(task.top_k >= 0, f"{one}: task.top_k must be >= 0 (0: off).")
    need(0 <= task.min_p < 1, f"{one}: task.min_p must be in [0, 1) (got {task.min_p}).")
    need(task.repetition_penalty > 0, f"{one}: task.repetition_penalty must be > 0 (1: off).")
    rewards = list(task.reward) if OmegaConf.is_list(task.reward) else None
    need(bool(rewards), f"{one}: task.reward must be a non-empty list, e.g. task.reward=[accuracy,format].")
    if rewards:
        from soup.rewards import get_reward
        from soup.tasks.grpo import reward_params

        for name in rewards:
            try:
                get_reward(str(name), **reward_params(str(name), task))
            except ConfigError as exc:
                need(False, str(exc))
        weights = task.reward_weights
        need(weights is None or (OmegaConf.is_list(weights) and len(weights) == len(rewards)),
             f"{one}: task.reward_weights needs one weight per reward ({len(rewards)}), e.g. "
             f"[{','.join(['1.0'] * len(rewards))}].")


def _check_classifier(cfg: DictConfig, need) -> None:
    task = cfg.task
    need(task.num_labels is None or task.num_labels >= 1, f"task=classifier: task.num_labels must be >= 1 (1: a "
                                                          f"regression) or null (counted from the data); got "
                                                          f"{task.num_labels}.")
    weights = task.class_weights
    need(weights is None or weights == "balanced" or (
        OmegaConf.is_list(weights) and all(isinstance(w, (int, float)) and w > 0 for w in weights)),
        "task=classifier: task.class_weights must be null, balanced, or a list of positive weights, one per "
        "class in sorted order of the class names, e.g. task.class_weights=[1.0,2.0,1.0].")
    need(task.pair_column != task.text_column, "task=classifier: task.pair_column names the same column as "
                                               "task.text_column; a pair needs two texts.")


def _check_embedding(cfg: DictConfig, need) -> None:
    from soup.losses.embedding import POOLING_MODES

    task = cfg.task
    need(task.loss in EMBEDDING_LOSSES, f"task=embedding: task.loss={task.loss!r}; valid: {', '.join(EMBEDDING_LOSSES)}.")
    need(task.pooling in ("auto", *POOLING_MODES), f"task=embedding: task.pooling={task.pooling!r}; valid: auto, "
                                                   f"{', '.join(POOLING_MODES)}.")
    need(task.scale > 0, f"task=embedding: task.scale must be > 0 (it is 1 / temperature; got {task.scale}).")
    need(task.score_scale > 0, f"task=embedding: task.score_scale must be > 0 (got {task.score_scale}).")
    dims = list(task.matryoshka_dims or [])
    need(all(d >= 1 for d in dims) and len(set(dims)) == len(dims),
         f"task=embedding: task.matryoshka_dims must be distinct sizes >= 1, e.g. [384,128,32] (got {dims}).")
    if task.matryoshka_weights is not None:
        need(len(task.matryoshka_weights) == len(dims),
             f"task=embedding: task.matryoshka_weights has {len(task.matryoshka_weights)} weights for "
             f"{len(dims)} task.matryoshka_dims; give one per dim, in the same order.")
    if task.text_columns is not None:
        need(len(task.text_columns) == 2 and task.text_columns[0] != task.text_columns[1],
             f"task=embedding: task.text_columns names the row's two texts, e.g. [query,passage] "
             f"(got {list(task.text_columns)}).")


def _check_distill(cfg: DictConfig, need) -> None:
    from soup.losses.distill import DIVERGENCES

    task = cfg.task
    need(task.teacher.path is not None, "task=distill needs a teacher: set task.teacher.path to a causal LM directory "
                                        "that uses the student's tokenizer (e.g. ../shared/models/stories260k with "
                                        "model.tokenizer_path=../shared/models/stories260k).")
    need(task.divergence in DIVERGENCES, f"task=distill: task.divergence={task.divergence!r}; valid: "
                                         f"{', '.join(DIVERGENCES)}.")
    need(0 <= task.jsd_beta <= 1, f"task=distill: task.jsd_beta must be in [0, 1] (got {task.jsd_beta}).")
    need(0 <= task.alpha <= 1, f"task=distill: task.alpha must be in [0, 1]: the divergence's weight, 1 - alpha "
                               f"the cross-entropy's (got {task.alpha}).")
    need(task.temperature > 0, f"task=distill: task.temperature must be > 0 (got {task.temperature}).")
    need(task.teacher.quant in ("none", "8bit", "4bit"), f"task=distill: task.teacher.quant={task.teacher.quant!r}; "
                                                         "valid: none, 8bit, 4bit (bitsandbytes).")
    need(0 <= task.lmbda <= 1, f"task=distill: task.lmbda is the probability of an on-policy step, in [0, 1] "
                               f"(got {task.lmbda}).")
    need(task.max_new_tokens >= 1, f"task=distill: task.max_new_tokens must be >= 1 (got {task.max_new_tokens}).")
    if task.lmbda > 0:
        need(task.teacher.top_k is None, "task=distill: task.lmbda > 0 (on-policy steps) needs the teacher to score "
                                         "the student's own samples, and task.teacher.top_k makes it offline (it "
                                         "scored the data's tokens only).\n    fix: drop task.teacher.top_k, or "
                                         "set task.lmbda=0.")
        need(not cfg.data.packing and not cfg.data.multipack,
             "task=distill: task.lmbda > 0 samples completions from each row's prompt, and packed rows "
             "(data.packing / data.multipack) hold several rows.\n    fix: data.packing=false data.multipack=false.")
    need(task.teacher.top_k is None or task.teacher.top_k >= 1, f"task=distill: task.teacher.top_k must be >= 1 "
                                                               f"(or null: the full distributions); got "
                                                               f"{task.teacher.top_k}.")


def _check_ppo(cfg: DictConfig, need) -> None:
    from soup.losses.ppo import KL_ESTIMATORS
    from soup.tasks.ppo import VALUE_INITS

    task = cfg.task
    need(task.value_init in VALUE_INITS, f"task=ppo: task.value_init={task.value_init!r}; valid: "
                                         f"{', '.join(VALUE_INITS)}.")
    if task.value_init == "reward_model" and OmegaConf.is_list(task.reward):
        paths = [str(name) for name in task.reward if Path(str(name)).expanduser().is_dir()]
        need(len(paths) == 1, f"task=ppo: task.value_init=reward_model starts the value model from the reward "
                              f"model in task.reward, which names {len(paths)} reward model directories "
                              f"({', '.join(paths) or 'none'}). Fix: give one reward model directory in task.reward, "
                              "or task.value_init=policy.")
    need(task.kl_coef >= 0, f"task=ppo: task.kl_coef must be >= 0 (0: no KL penalty; got {task.kl_coef}).")
    need(task.kl_estimator in KL_ESTIMATORS, f"task=ppo: task.kl_estimator={task.kl_estimator!r}; valid: "
                                             f"{', '.join(KL_ESTIMATORS)}.")
    need(task.target_kl is None or task.target_kl > 0, "task=ppo: task.target_kl must be > 0 (nats of KL per "
                                                       "completion, e.g. 6) or null (a fixed kl_coef).")
    need(task.target_kl is None or task.kl_coef > 0, "task=ppo: task.target_kl adapts kl_coef by a factor each "
                                                     "batch, which cannot move it from 0. Fix: start from "
                                                     "task.kl_coef > 0 (e.g. 0.05).")
    need(task.kl_horizon > 0, f"task=ppo: task.kl_horizon must be > 0 (completions; got {task.kl_horizon}).")
    need(task.missing_eos_penalty is None or task.missing_eos_penalty >= 0,
         "task=ppo: task.missing_eos_penalty is subtracted from the score, so it must be >= 0 (or null).")
    need(0 <= task.gamma <= 1, f"task=ppo: task.gamma must be in [0, 1] (got {task.gamma}).")
    need(0 <= task.lam <= 1, f"task=ppo: task.lam must be in [0, 1] (got {task.lam}).")
    need(0 < task.cliprange < 1, f"task=ppo: task.cliprange must be in (0, 1) (got {task.cliprange}).")
    need(task.cliprange_value > 0, f"task=ppo: task.cliprange_value must be > 0 (got {task.cliprange_value}).")
    need(task.vf_coef > 0, f"task=ppo: task.vf_coef must be > 0: at 0 the value model never learns and GAE "
                           f"reads its initial guesses (got {task.vf_coef}).")
    need(task.ppo_epochs >= 1, f"task=ppo: task.ppo_epochs must be at least 1 (got {task.ppo_epochs}).")
    need(task.num_mini_batches >= 1 and cfg.train.grad_accum_steps % task.num_mini_batches == 0,
         f"task=ppo: task.num_mini_batches={task.num_mini_batches} must divide train.grad_accum_steps="
         f"{cfg.train.grad_accum_steps} (a rollout batch is micro_batch_size x grad_accum_steps prompts, each "
         "mini-batch whole micro-batches of it). Fix: raise train.grad_accum_steps to a multiple of it.")
    need(cfg.parallelism.name == "single", f"task=ppo with parallelism={cfg.parallelism.name}: PPO's value model "
                                           "and reference are not yet sharded or synchronised across ranks. "
                                           "Fix: parallelism=single.")
    need(cfg.quant.name not in ("4bit", "8bit"), f"task=ppo with quant={cfg.quant.name}: the value model would "
                                                 "start from the quantised base, which is not wired yet. "
                                                 "Fix: quant=none (peft=lora keeps the memory down).")


def _check_preference(cfg: DictConfig, need) -> None:
    # Imported here: the loss registry fills on import of the loss modules.
    from soup.losses.registry import LOSSES
    from soup.tasks.preference import LOSS_ALIASES, TASK_LOSS, UNPAIRED_TASKS

    task = cfg.task
    paired = sorted(name for name, spec in LOSSES.items() if spec.kind == "paired")
    names: list[str] = []
    if task.name == "dpo":
        need(task.loss_type in DPO_LOSS_TYPES,
             f"task.loss_type={task.loss_type!r} is not a DPO variant; valid: {', '.join(DPO_LOSS_TYPES)}.")
        names = [task.loss_type]
    elif task.name in TASK_LOSS:
        names = [TASK_LOSS[task.name]]
    elif task.preference_loss_weights is not None:
        if not OmegaConf.is_dict(task.preference_loss_weights) or not all(
                isinstance(w, (int, float)) for w in task.preference_loss_weights.values()):
            need(False, "task.preference_loss_weights must map loss names to weights, e.g. "
                        "task.preference_loss_weights={dpo:0.7,bco:0.3}.")
            return
        weights = dict(task.preference_loss_weights)
        need(task.preference_loss is None, "set task.preference_loss or task.preference_loss_weights, not both.")
        need(2 <= len(weights) <= 5, f"task.preference_loss_weights needs 2 to 5 entries (got {len(weights)}).")
        need(all(w > 0 for w in weights.values()), "task.preference_loss_weights must all be positive.")
        need(abs(sum(weights.values()) - 1.0) < 1e-6,
             f"task.preference_loss_weights must sum to 1 (they sum to {sum(weights.values()):g}).")
        names = [LOSS_ALIASES.get(n, n) for n in weights]
    else:
        need(task.preference_loss is not None,
             f"task=preference needs task.preference_loss=<name>; valid: {', '.join(paired)}.")
        names = [LOSS_ALIASES.get(task.preference_loss, task.preference_loss)] if task.preference_loss else []
    if task.name == "preference":
        for name in names:
            need(name in paired, f"task.preference_loss: {name!r} is not a paired preference loss; "
                                 f"valid: {', '.join(paired)} (aliases: {', '.join(LOSS_ALIASES)}).")
    specs = [LOSSES[n] for n in names if n in LOSSES]
    if len(specs) != len(names):
        return

    # Whether a loss parameter is read at all is the scope table's rule (soup/config/scope.py).
    needs_reference = any(spec.needs_reference for spec in specs)
    need(task.beta > 0, f"task.beta must be positive (got {task.beta}).")
    need(task.beta_schedule in BETA_SCHEDULES,
         f"task.beta_schedule={task.beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}.")
    if task.beta_schedule != "constant":
        need(task.beta_end is not None and task.beta_end > 0,
             f"task.beta_schedule={task.beta_schedule} needs task.beta_end > 0 (the value beta reaches at the end).")
    need(task.reference in REFERENCES, f"task.reference={task.reference!r}; valid: {', '.join(REFERENCES)}.")
    need(task.precompute_with in ("auto", "copy", "adapter"), "task.precompute_with must be auto, copy or adapter.")
    if needs_reference:
        need(task.reference != "none", f"{', '.join(names)} needs a reference model; task.reference=none cannot work.")
    uses_adapter = task.reference == "adapter" or (task.reference == "precomputed" and task.precompute_with == "adapter")
    if uses_adapter:
        need(cfg.peft.name != "none", "task.reference=adapter disables the LoRA adapters to get the reference; "
                                      "it needs peft=lora (or use task.reference=copy).")
    need(task.ref_refresh_epochs >= 0, "task.ref_refresh_epochs must be >= 0.")
    if task.rpo_alpha is not None:
        need(task.rpo_alpha >= 0, "task.rpo_alpha must be >= 0.")
    need(task.name in UNPAIRED_TASKS or all(spec.kind == "paired" for spec in specs),
         "an unpaired loss needs task=kto or task=bco.")
    need(task.sequence_layout in SEQUENCE_LAYOUTS,
         f"task.sequence_layout={task.sequence_layout!r}; valid: {', '.join(SEQUENCE_LAYOUTS)}.")
    if task.sequence_layout == "shared_prompt":
        need(cfg.model.attn_implementation in ("sdpa", "eager") and cfg.kernels.name != "flash_attn",
             "task.sequence_layout=shared_prompt masks each completion from the other with a 4-D attention "
             "mask, which flash attention cannot take: use model.attn_implementation=sdpa (and not "
             "kernels=flash_attn), or task.sequence_layout=stacked (or auto).")


def _check_memory(cfg: DictConfig, need) -> None:
    """Packing, kernels, checkpointing, offload, quantised and low-precision training."""
    import importlib.util

    data, kernels, quant, offload = cfg.data, cfg.kernels, cfg.quant, cfg.offload
    device = resolve_device(cfg.train.device) if cfg.train.device != "cuda" or torch.cuda.is_available() else None

    need(not (data.packing and data.multipack),
         "data.packing and data.multipack are two answers to padding waste; pick one.")
    need(data.multipack_layout in MULTIPACK_LAYOUTS,
         f"data.multipack_layout={data.multipack_layout!r}; valid: {', '.join(MULTIPACK_LAYOUTS)}.")
    if data.multipack and data.multipack_layout == "packed":
        need(cfg.model.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
             "data.multipack_layout=packed keeps attention inside each example with a 4-D mask (sdpa, eager) "
             "or FlashAttention's varlen path: set model.attn_implementation to one of those, or use "
             "data.multipack_layout=padded.")
    if data.packing_cross_doc_attn_mask and cfg.model.attn_implementation == "flash_attention_2":
        need(kernels.name in ("flash_attn", "none"), "cross-document masks with flash_attention_2 use its varlen path.")

    need(kernels.cut_ce in CUT_CE, f"kernels.cut_ce={kernels.cut_ce!r}; valid: {', '.join(CUT_CE)}.")
    need(kernels.ce_chunk_size > 0, "kernels.ce_chunk_size must be positive.")
    if kernels.cut_ce == "cce":
        need(importlib.util.find_spec("cut_cross_entropy") is not None,
             "kernels.cut_ce=cce needs the cut-cross-entropy package: pip install 'soup-harness[cce]' "
             "(or use kernels.cut_ce=chunked, our own).")
    if kernels.name in ("liger", "flash_attn", "compile") and device is not None:
        from soup.memory.kernels import kernels_support

        ok, reason = kernels_support(kernels.name, device)
        need(ok, f"kernels={kernels.name}: {reason}")
    if kernels.name == "flash_attn":
        # auto is bf16 there: flash_attn needs compute capability >= 8, which has native bf16.
        need(cfg.train.precision in ("bf16", "fp16", "auto"),
             "kernels=flash_attn runs in half precision only: set train.precision=bf16 (or fp16, or auto).")

    need(quant.fp8_recipe in FP8_RECIPES, f"quant.fp8_recipe={quant.fp8_recipe!r}; valid: {', '.join(FP8_RECIPES)}.")
    need(quant.qat_weight_bits in (8, 4), f"quant.qat_weight_bits={quant.qat_weight_bits}; valid: 8, 4.")
    if quant.name in ("4bit", "8bit"):
        need(importlib.util.find_spec("bitsandbytes") is not None,
             f"quant={quant.name} needs bitsandbytes: pip install 'soup-harness[quant]'.")
        need(cfg.peft.name != "none", f"quant={quant.name} weights are frozen integers: train them through "
                                      "adapters (peft=lora makes QLoRA), or use quant=none for a full fine-tune.")
        need(quant.quant_type in ("nf4", "fp4"), "quant.quant_type must be nf4 or fp4.")
        need(quant.compute_dtype in ("float32", "bfloat16", "float16"),
             "quant.compute_dtype must be float32, bfloat16 or float16.")
        need(quant.quant_storage in ("uint8", "bfloat16", "float16", "float32"),
             "quant.quant_storage must be uint8, bfloat16, float16 or float32.")
        need(cfg.peft.name not in ("pissa", "olora", "loftq"),
             f"peft={cfg.peft.name} initialises adapters from the full-precision weights; with quant={quant.name} "
             "use peft=lora, dora, rslora or vera (or peft=loftq with quant=none).")
        need(cfg.kernels.name != "compile", "kernels=compile with bitsandbytes layers is not supported here.")
    if quant.name in ("fp8", "int8_qat"):
        need(importlib.util.find_spec("torchao") is not None,
             f"quant={quant.name} needs torchao: pip install 'soup-harness[fp8]'.")
        need(cfg.peft.name == "none", f"quant={quant.name} converts the linear layers for training; combining it "
                                      "with peft adapters is not supported: use peft=none.")
    if quant.name == "fp8" and device is not None and device.type == "cuda":
        from soup.memory.fp8 import fp8_support

        ok, reason = fp8_support(device)
        need(ok, f"quant=fp8: {reason}")

    on_cuda = device is not None and device.type == "cuda"
    if offload.name == "cpu":
        need(on_cuda, "offload=cpu moves activations from GPU memory to host memory; on a CPU-only machine "
                      "there is nothing to offload to. Use offload=disk to cut peak RAM, or offload=none.")
    if offload.name == "disk":
        need(not os.path.isabs(offload.scratch_dir) and ".." not in offload.scratch_dir.split("/"),
             f"offload.scratch_dir={offload.scratch_dir!r} must be a path inside the run directory "
             "(relative, no '..').")
