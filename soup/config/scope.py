"""Where each config field is read: the table behind "nothing is silently ignored".

A field named in field_scopes() is read only in the runs its scope describes; every
other field is read by every run. A field is *set* when the command line names it
(or the `experiment=` preset the command line picks). validate() rejects a set field
that the run does not read, naming the flag, the run's setting that ignores it, where
it applies and the fix, whatever its value: `task=simpo task.cpo_alpha=1.0` is an
error although 1.0 is the default. Values that config.yaml, a group option or a
`debug=` preset supply are defaults, not choices, and are not checked here.

tests/unit/config/test_liveness.py walks every field of the schemas and checks both
halves: where a field applies, changing it changes the run; elsewhere, setting it is
rejected. A new field must be listed there (and, if it is conditional, here).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from soup.config.schema import GROUP_SCHEMAS, SoupConfig

PREFERENCE_TASKS = ("dpo", "ipo", "kto", "orpo", "simpo", "cpo", "bco", "preference")
TOKEN_TASKS = ("sft", "pretrain")
TEMPLATED_TASKS = ("sft", "distill", "grpo", "rloo", "ppo", "reward_model", *PREFERENCE_TASKS)
SFT_ROW_TASKS = ("sft", "distill")  # tasks that read SFT rows
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass(frozen=True)
class Scope:
    """applies(cfg): does this run read the field. where: the settings that do. now(cfg):
    the run's own setting that keeps it from applying (both for the error message)."""

    applies: Callable[[DictConfig], bool]
    where: str
    now: Callable[[DictConfig], str]


def choice(group: str, *options: str) -> Scope:
    """Read only when `group` (a group's name field, or any dotted field) is one of `options`."""
    shown = group.removesuffix(".name")  # task.name=dpo is written task=dpo
    return Scope(lambda cfg: OmegaConf.select(cfg, group) in options, f"{shown}={'|'.join(options)}",
                 lambda cfg: f"{shown}={OmegaConf.select(cfg, group)}")


def flag_on(path: str) -> Scope:
    """Read only when the boolean `path` is true."""
    return Scope(lambda cfg: bool(OmegaConf.select(cfg, path)), f"{path}=true", lambda cfg: f"{path}=false")


# --- what each option of the option-rich groups reads -----------------------------------
# peft: the fields each adapter reads (peft=none still freezes layers).
_LORA = ("r", "alpha", "dropout", "target_modules", "rank_pattern", "alpha_pattern", "freeze_layers",
         "freeze_ratio", "loraplus_lr_ratio")
PEFT_READS: dict[str, tuple[str, ...]] = {
    "none": ("freeze_layers", "freeze_ratio"),
    **{name: (*_LORA, "init") for name in ("lora", "dora", "rslora")},
    **{name: _LORA for name in ("olora", "pissa")},
    "loftq": (*_LORA, "loftq_bits", "loftq_iter"),
    "vera": ("r", "dropout", "target_modules", "vera_d_initial", "freeze_layers", "freeze_ratio"),
}
# optim: the fields each optimizer reads besides lr, weight_decay and lr_groups (soup/optim.py).
_ADAM = ("betas", "eps")
_GALORE = ("galore_rank", "galore_update_proj_gap", "galore_scale", "galore_proj_type")
OPTIM_READS: dict[str, tuple[str, ...]] = {
    "adamw": (*_ADAM, "implementation"), "sgd": ("momentum", "nesterov"), "adamw_8bit": _ADAM,
    "paged_adamw": _ADAM, "paged_adamw_8bit": _ADAM, "lion": ("betas",), "lion_8bit": ("betas",),
    "adafactor": (), "galore": (*_ADAM, *_GALORE), "schedule_free_adamw": _ADAM,
}


def _readers(table: dict[str, tuple[str, ...]], field_name: str) -> list[str]:
    return sorted(name for name, fields in table.items() if field_name in fields)


# --- preference tasks: which losses run, and what they read ------------------------------
def preference_losses(cfg: DictConfig) -> list | None:
    """The LossSpecs a preference run trains, or None when the task config names no valid loss."""
    from soup.tasks.preference import selected_losses

    try:
        return [spec for spec, _ in selected_losses(cfg.task)]
    except Exception:  # an unknown loss name: validate() reports it with the valid names
        return None


def _losses_now(cfg: DictConfig) -> str:
    specs = preference_losses(cfg) or []
    return f"task={cfg.task.name} trains " + ", ".join(spec.name for spec in specs)


def loss_param(field_name: str) -> Scope:
    """Read only when a loss this run trains takes `field_name`."""
    from soup.losses.registry import LOSSES

    def applies(cfg: DictConfig) -> bool:
        if cfg.task.name in ("grpo", "rloo"):  # its schema holds only what it reads (beta among these)
            return True
        specs = preference_losses(cfg)
        return specs is None or any(field_name in spec.params for spec in specs)

    readers = sorted(n for n, spec in LOSSES.items() if field_name in spec.params)
    return Scope(applies, f"a loss that takes {field_name} ({', '.join(readers)})", _losses_now)


def needs_reference(cfg: DictConfig) -> bool:
    specs = preference_losses(cfg)
    return specs is None or any(spec.needs_reference for spec in specs)


def uses_reference_copy(cfg: DictConfig) -> bool:
    reference = cfg.task.reference
    return reference == "copy" or (reference == "auto" and cfg.peft.name == "none" and needs_reference(cfg))


def has_val_data(cfg: DictConfig) -> bool:
    return bool(cfg.data.val_file) or cfg.data.val_split > 0


VAL_DATA = Scope(has_val_data, "validation data (data.val_split > 0 or data.val_file)",
                 lambda cfg: "no validation data: data.val_split=0 and no data.val_file")


PPO_KL = Scope(lambda c: c.task.kl_coef > 0, "a KL penalty (task.kl_coef > 0)", lambda c: "task.kl_coef=0")
# PPO's clips act once the models have moved since the rollout: from a rollout batch's second step on.
PPO_RATIO_MOVES = Scope(lambda c: c.task.ppo_epochs * c.task.num_mini_batches > 1,
                        "more than one optimizer step per rollout batch (task.ppo_epochs x task.num_mini_batches > 1)",
                        lambda c: "task.ppo_epochs=1 with task.num_mini_batches=1")


def ratio_moves(clip_only: bool) -> Scope:
    """grpo's clip settings: read when the importance ratio can leave 1 (a batch trained on again,
    or replayed) and the loss_type has a ratio (clip_only: the clipped ones, not cispo)."""
    clipped = ("grpo", "bnpo", "dr_grpo", "dapo", "rloo")
    kinds = clipped if clip_only else (*clipped, "cispo")

    def applies(c: DictConfig) -> bool:
        return c.task.loss_type in kinds and (c.task.num_iterations > 1 or c.task.replay_buffer_size > 0)

    def now(c: DictConfig) -> str:
        if c.task.loss_type not in kinds:
            return f"task.loss_type={c.task.loss_type}"
        return "task.num_iterations=1 and no replay buffer: each batch trains once, so the ratio stays 1"

    return Scope(applies, f"task.loss_type={'|'.join(kinds)} with task.num_iterations > 1 or a replay buffer", now)


REFERENCE_COPY = Scope(lambda c: c.task.beta > 0 and c.peft.name == "none",
                       "a reference copy (task.beta > 0 with peft=none)",
                       lambda c: "task.beta=0, so no reference" if not c.task.beta else
                       f"peft={c.peft.name}, whose reference (the adapters disabled) cannot move")


FRESH_RUN = Scope(lambda cfg: cfg.resume is None, "a fresh run (resume=null)",
                  lambda cfg: f"resume={cfg.resume}")
RESUMED_RUN = Scope(lambda cfg: cfg.resume is not None, "resume=auto or resume=<checkpoint>",
                    lambda cfg: "resume=null")


def _build_scopes() -> dict[str, Scope]:
    token_task = choice("task.name", *TOKEN_TASKS)
    token_rows = choice("task.name", *TOKEN_TASKS, "distill")  # tasks that train on token rows
    preference = choice("task.name", *PREFERENCE_TASKS, "reward_model")  # tasks that read preference pairs
    scopes = {
        "overwrite": FRESH_RUN,
        "allow_resume_changes": RESUMED_RUN,
        # model
        "model.path": choice("model.name", "hf"),
        "model.trust_remote_code": Scope(lambda c: c.model.name == "hf" or bool(c.model.tokenizer_path),
                                         "model.name=hf (or with model.tokenizer_path)",
                                         lambda c: "model.name=tiny with its built-in tokenizer"),
        # data
        "data.train_file": choice("data.name", "file"),
        "data.format": token_rows,  # preference rows are recognised by their fields
        # prompt_completion rows are plain text: no template renders them
        "data.chat_template": Scope(
            lambda c: c.task.name in TEMPLATED_TASKS and not (c.task.name in SFT_ROW_TASKS
                                                              and c.data.format == "prompt_completion"),
            f"task={'|'.join(TEMPLATED_TASKS)} (sft and distill with a chat format)",
            lambda c: "data.format=prompt_completion" if c.task.name in SFT_ROW_TASKS else f"task={c.task.name}"),
        "data.train_on_responses_only": choice("task.name", *SFT_ROW_TASKS),
        "data.text_field": choice("task.name", "pretrain"),
        "data.packing": token_rows,
        "data.multipack": token_rows,
        "data.packing_cross_doc_attn_mask": flag_on("data.packing"),
        "data.multipack_layout": flag_on("data.multipack"),
        "data.multipack_max_items_per_bin": flag_on("data.multipack"),
        "data.multipack_max_mask_cells": flag_on("data.multipack"),
        "data.max_prompt_length": preference,
        "data.max_completion_length": preference,
        # quant
        "quant.fp8_recipe": choice("quant.name", "fp8"),
        "quant.qat_group_size": choice("quant.name", "int8_qat"),
        "quant.qat_weight_bits": choice("quant.name", "int8_qat"),
        **{f"quant.{f}": choice("quant.name", "4bit")
           for f in ("quant_type", "double_quant", "compute_dtype", "quant_storage")},
        # kernels
        "kernels.cut_ce": token_task,  # preference losses score sequences with their own log-probs
        "kernels.ce_chunk_size": choice("kernels.cut_ce", "chunked"),
        # offload
        "offload.scratch_dir": choice("offload.name", "disk"),
        "offload.min_bytes": choice("offload.name", "disk", "cpu"),
        # parallelism
        "parallelism.reshard_after_forward": choice("parallelism.name", "fsdp2"),
        "parallelism.cpu_offload": choice("parallelism.name", "fsdp2"),
        "parallelism.offload_optimizer": choice("parallelism.name", "deepspeed_zero2", "deepspeed_zero3"),
        "parallelism.offload_param": choice("parallelism.name", "deepspeed_zero3"),
        # sched
        "sched.min_lr_ratio": choice("sched.name", "linear", "cosine"),
        # tracker
        "tracker.project": choice("tracker.name", "wandb"),
        "tracker.mode": choice("tracker.name", "wandb"),
        # train
        "train.eval_every_steps": VAL_DATA,
        "train.eval_at_start": VAL_DATA,
        # The eval gate's suite runs its forwards and generations in batches of this size too.
        "train.eval_batch_size": Scope(lambda c: has_val_data(c) or c.train.eval_gate is not None,
                                       VAL_DATA.where + " or train.eval_gate set",
                                       lambda c: VAL_DATA.now(c) + ", and train.eval_gate=null"),
        **{f"train.{f}": Scope(lambda c: c.train.spike_factor is not None, "train.spike_factor set",
                               lambda c: "train.spike_factor=null")
           for f in ("spike_window", "spike_max_recoveries", "spike_lr_factor")},
        **{f"train.{f}": flag_on("train.lr_finder") for f in ("lr_finder_min_lr", "lr_finder_max_lr", "lr_finder_steps")},
        **{f"train.{f}": Scope(lambda c: c.train.eval_gate is not None, "train.eval_gate set",
                               lambda c: "train.eval_gate=null")
           for f in ("eval_gate_every_steps", "eval_gate_every_epochs", "eval_gate_metrics", "eval_gate_threshold",
                     "eval_gate_action", "eval_gate_baseline")},
        # task (preference)
        "task.preference_loss": choice("task.name", "preference"),
        "task.preference_loss_weights": choice("task.name", "preference"),
        "task.loss_type": choice("task.name", "dpo", "grpo", "rloo"),
        # task=rloo's baseline is the other completions' mean; grpo's is the group's, scaled by this
        "task.scale_rewards": choice("task.name", "grpo"),
        "task.kl_in_reward": Scope(lambda c: c.task.name == "rloo" and c.task.beta > 0,
                                   "task=rloo with task.beta > 0",
                                   lambda c: f"task={c.task.name}" if c.task.name != "rloo" else "task.beta=0"),
        # task=grpo
        "task.epsilon": ratio_moves(clip_only=True),
        "task.delta": ratio_moves(clip_only=True),
        "task.epsilon_high": ratio_moves(clip_only=False),
        "task.importance_sampling_level": ratio_moves(clip_only=False),
        "task.off_policy_mask_threshold": Scope(lambda c: c.task.loss_type != "rft",
                                                "a loss_type with advantages of both signs (every one but rft)",
                                                lambda c: "task.loss_type=rft, whose advantages are never negative"),
        "task.ref_sync_steps": REFERENCE_COPY,
        "task.ref_model_ema_alpha": Scope(lambda c: REFERENCE_COPY.applies(c) and c.task.ref_sync_steps > 0,
                                          "a moving reference copy (task.ref_sync_steps > 0, task.beta > 0)",
                                          lambda c: "task.ref_sync_steps=0" if REFERENCE_COPY.applies(c)
                                          else REFERENCE_COPY.now(c)),
        "task.format_pattern": Scope(lambda c: "format" in list(c.task.reward), "task.reward with format",
                                     lambda c: f"task.reward={list(c.task.reward)}"),
        "task.answer_column": Scope(lambda c: bool({"accuracy", "math"} & set(c.task.reward)),
                                    "task.reward with accuracy or math", lambda c: f"task.reward={list(c.task.reward)}"),
        # task=distill
        "task.jsd_beta": choice("task.divergence", "generalized_jsd"),
        "task.max_new_tokens": Scope(lambda c: c.task.lmbda > 0, "task.lmbda > 0 (on-policy steps)",
                                     lambda c: "task.lmbda=0"),
        "task.teacher.cache_dir": Scope(lambda c: c.task.teacher.top_k is not None, "task.teacher.top_k set",
                                        lambda c: "task.teacher.top_k=null"),
        # task=embedding
        "task.scale": choice("task.loss", "info_nce", "cosent"),
        "task.symmetric": choice("task.loss", "info_nce"),
        "task.negative_columns": choice("task.loss", "info_nce"),
        "task.score_scale": choice("task.loss", "cosine"),
        "task.matryoshka_weights": Scope(lambda c: bool(c.task.matryoshka_dims), "task.matryoshka_dims set",
                                         lambda c: "task.matryoshka_dims=null"),
        # task=ppo
        "task.kl_estimator": PPO_KL,
        "task.target_kl": PPO_KL,
        "task.kl_horizon": Scope(lambda c: PPO_KL.applies(c) and c.task.target_kl is not None,
                                 "an adaptive KL coefficient (task.target_kl set, task.kl_coef > 0)",
                                 lambda c: PPO_KL.now(c) if not PPO_KL.applies(c) else "task.target_kl=null"),
        "task.cliprange": PPO_RATIO_MOVES,
        "task.cliprange_value": PPO_RATIO_MOVES,
        "task.rpo_alpha": choice("task.name", "dpo", "preference"),
        "task.beta_schedule": loss_param("beta"),
        "task.beta_end": choice("task.beta_schedule", "linear", "cosine", "exponential"),
        "task.reference": Scope(needs_reference, "a loss that needs a reference model",
                                lambda c: _losses_now(c) + ", which is reference-free"),
        "task.precompute_with": choice("task.reference", "precomputed"),
        "task.ref_cache_dir": choice("task.reference", "precomputed"),
        "task.ref_refresh_epochs": Scope(uses_reference_copy, "a frozen reference copy (task.reference=copy)",
                                         lambda c: f"task.reference={c.task.reference} with peft={c.peft.name}"),
    }
    from soup.config.schema import PeftConfig, TinyArchConfig
    from soup.tasks.preference import LOSS_PARAM_FIELDS

    for field_name in LOSS_PARAM_FIELDS:
        scopes[f"task.{field_name}"] = loss_param(field_name)
    for f in dataclasses.fields(TinyArchConfig):
        scopes[f"model.tiny.{f.name}"] = choice("model.name", "tiny")
    for f in dataclasses.fields(PeftConfig):
        readers = _readers(PEFT_READS, f.name)
        if f.name != "name" and len(readers) < len(PEFT_READS):
            scopes[f"peft.{f.name}"] = choice("peft.name", *readers)
    for field_name in ("betas", "eps", "momentum", "nesterov", "implementation", *_GALORE):
        scopes[f"optim.{field_name}"] = choice("optim.name", *_readers(OPTIM_READS, field_name))
    return scopes


_SCOPES: dict[str, Scope] | None = None


def field_scopes() -> dict[str, Scope]:
    """FIELD_SCOPES, built on first use (it reads the loss registry)."""
    global _SCOPES
    if _SCOPES is None:
        _SCOPES = _build_scopes()
    return _SCOPES


# --- which fields exist, which are set --------------------------------------------------
# The root's own values (seed, resume, overwrite ...): `key=value` names a field, not a group option.
ROOT_VALUES = tuple(f.name for f in dataclasses.fields(SoupConfig) if f.name not in (*GROUP_SCHEMAS, "train"))
def schema_of(node: Any) -> type | None:
    """The dataclass behind a config node (None for plain dicts and values)."""
    if not OmegaConf.is_dict(node):
        return None
    schema = OmegaConf.get_type(node)
    return schema if dataclasses.is_dataclass(schema) else None


def leaf_fields(schema: type, prefix: str = "") -> dict[str, Any]:
    """{dotted path: default} for every field of `schema`, nested dataclasses expanded."""
    leaves: dict[str, Any] = {}
    instance = schema()
    for f in dataclasses.fields(schema):
        value = getattr(instance, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            leaves.update(leaf_fields(type(value), path + "."))
        else:
            leaves[path] = value
    return leaves


def config_fields(cfg: DictConfig) -> list[str]:
    """Dotted paths of every field of this composed config (as its group schemas declare them)."""
    paths: list[str] = []
    for f in dataclasses.fields(SoupConfig):
        schema = schema_of(cfg[f.name])
        paths.extend(leaf_fields(schema, f.name + ".") if schema is not None else [f.name])
    return paths


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Keys present in `cfg` that no schema declares (e.g. added with Hydra's `+key=value`),
    each with a "did you mean" when a declared key is close."""
    problems: list[str] = []

    def walk(node: DictConfig, schema: type, prefix: str) -> None:
        declared = {f.name for f in dataclasses.fields(schema)}
        for key in node.keys():
            path = f"{prefix}{key}"
            if key not in declared:
                close = difflib.get_close_matches(str(key), sorted(declared), n=1)
                hint = f"did you mean {prefix}{close[0]}?" if close else f"{prefix.rstrip('.') or 'the root'} has: " \
                                                                        f"{', '.join(sorted(declared))}."
                problems.append(f"{path} is not a soup option ({hint}); soup accepts only the keys of its "
                                "schemas (soup/config/schema.py), however they are added.")
                continue
            child = node._get_node(key)
            child_schema = schema_of(child) if OmegaConf.is_dict(child) else None
            if child_schema is not None:
                walk(child, child_schema, path + ".")

    walk(cfg, SoupConfig, "")
    return problems


def command_line_fields(overrides: Iterable[str]) -> set[str]:
    """The config keys named by command-line overrides (`a.b=1`, `+a.b=1`, `~a.b`), not group choices."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.package is None and "." not in override.key_or_group and \
                override.key_or_group not in ROOT_VALUES:
            continue  # a group choice such as task=dpo or debug=tiny
        if override.key_or_group.startswith("hydra"):
            continue
        keys.add(override.key_or_group)
    return keys


def group_choices(overrides: Iterable[str]) -> dict[str, str]:
    """Group choices named on the command line, e.g. {"debug": "tiny"}."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group: str(o.value()) for o in OverridesParser.create().parse_overrides(list(overrides))
            if "." not in o.key_or_group and o.key_or_group not in ROOT_VALUES and isinstance(o.value(), str)}


def _preset_keys(group: str, option: str) -> set[str]:
    path = CONF_DIR / group / f"{option}.yaml"
    if not path.exists():
        return set()
    preset = OmegaConf.load(path)
    preset.pop("defaults", None)
    return set(_dotted_keys(OmegaConf.to_container(preset)))


def _dotted_keys(tree: dict, prefix: str = "") -> Iterable[str]:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _dotted_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _value(cfg: DictConfig, path: str) -> Any:
    value = OmegaConf.select(cfg, path, throw_on_missing=False)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def set_fields(cfg: DictConfig, overrides: Iterable[str] = ()) -> set[str]:
    """The fields this run sets explicitly: named on the command line, or by the `experiment=`
    preset it names (a preset is a command line kept in a file). Values from config.yaml,
    group options and `debug=` presets are defaults: they are not the user's choice."""
    overrides = list(overrides)
    named = command_line_fields(overrides)
    experiment = group_choices(overrides).get("experiment")
    if experiment:
        named |= _preset_keys("experiment", experiment)
    return {path for path in config_fields(cfg)
            if any(path == key or path.startswith(key + ".") for key in named)}


def shown(value: Any) -> str:
    """A value as it is written on the command line (null, true, [0.9,0.99])."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value).replace(" ", "")


def unread_fields(cfg: DictConfig, overrides: Iterable[str] = ()) -> list[str]:
    """A message for each set field that this run does not read."""
    scopes = field_scopes()
    problems = []
    for path in sorted(set_fields(cfg, overrides)):
        scope = scopes.get(path)
        if scope is not None and not scope.applies(cfg):
            problems.append(f"{path}={shown(_value(cfg, path))} is set, but this run does not read it "
                            f"({scope.now(cfg)}); it is read only with {scope.where}. "
                            "Fix: remove it, or change the run so that it applies.")
    return problems
