"""PEFT adapters and layer freezing.

peft implements the adapters; this module maps our config onto it, freezes the
bottom layers when asked, and keeps adapters off frozen layers so nothing trains
there by accident.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, OmegaConf

from soup.errors import ConfigError

LORA_FAMILY = ("lora", "dora", "rslora", "olora", "pissa", "loftq")
PEFT_NAMES = ("none", *LORA_FAMILY, "vera")


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def decoder_layer_count(model: torch.nn.Module) -> int:
    from soup.memory.checkpointing import decoder_blocks

    return len(decoder_blocks(model))


def frozen_layer_count(model: torch.nn.Module, peft_cfg: DictConfig) -> int:
    """How many bottom decoder layers peft.freeze_layers / freeze_ratio freeze."""
    if not peft_cfg.freeze_layers and not peft_cfg.freeze_ratio:
        return 0
    layers = decoder_layer_count(model)
    n = peft_cfg.freeze_layers or math.floor(peft_cfg.freeze_ratio * layers)
    if n >= layers:
        raise ConfigError(f"peft.freeze_layers/freeze_ratio freeze {n} of {layers} decoder layers, leaving none "
                          "to train.\n  fix: freeze fewer layers.")
    return n


def freeze_bottom_layers(model: torch.nn.Module, n: int) -> None:
    """requires_grad=False on the bottom n decoder blocks and the input embeddings."""
    from soup.memory.checkpointing import decoder_blocks

    for block in list(decoder_blocks(model))[:n]:
        block.requires_grad_(False)
    embeddings = model.get_input_embeddings()
    # A tied head shares this weight: freezing it would freeze the head too.
    if n and embeddings.weight is not model.get_output_embeddings().weight:
        embeddings.requires_grad_(False)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Suffixes of the linear layers inside the decoder blocks (what "all-linear" means there)."""
    from soup.memory.checkpointing import decoder_blocks

    return sorted({name.rsplit(".", 1)[-1] for block in decoder_blocks(model)
                   for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)})


def peft_task_type(model: torch.nn.Module | None) -> str:
    """peft's name for the model's head: with a score head (a reward model, a PRM) peft
    trains the new head fully beside the adapters (modules_to_save) and saves it with them."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if "For" not in name and name.endswith("Model"):  # a bare backbone (task=embedding)
        return "FEATURE_EXTRACTION"
    return "CAUSAL_LM"


def peft_config(peft_cfg: DictConfig, unfrozen_layers: list[int] | None, model: torch.nn.Module | None = None):
    import peft

    targets = _plain(peft_cfg.target_modules)
    if unfrozen_layers is not None and isinstance(targets, str):
        # peft restricts layers only for a list of names: spell out what the string meant.
        if targets != "all-linear":
            raise ConfigError("peft.freeze_layers/freeze_ratio with a regex peft.target_modules: peft cannot "
                              "restrict a regex to layers.\n  fix: give target_modules as a list, e.g. [q_proj, v_proj].")
        targets = linear_module_names(model)
    common = dict(r=peft_cfg.r, target_modules=targets, task_type=peft_task_type(model),
                  layers_to_transform=unfrozen_layers)
    if peft_cfg.name == "vera":
        return peft.VeraConfig(**common, vera_dropout=peft_cfg.dropout, d_initial=peft_cfg.vera_d_initial)
    init = {"olora": "olora", "pissa": "pissa", "loftq": "loftq"}.get(peft_cfg.name, peft_cfg.init)
    if init == "default":
        init = True
    extra = {}
    if peft_cfg.name == "loftq":
        extra["loftq_config"] = peft.LoftQConfig(loftq_bits=peft_cfg.loftq_bits, loftq_iter=peft_cfg.loftq_iter)
    return peft.LoraConfig(
        **common,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        use_dora=peft_cfg.name == "dora",
        use_rslora=peft_cfg.name == "rslora",
        init_lora_weights=init,
        rank_pattern=_plain(peft_cfg.rank_pattern) or {},
        alpha_pattern=_plain(peft_cfg.alpha_pattern) or {},
        **extra,
    )


def apply_peft(model, peft_cfg: DictConfig, seed: int):
    """Freeze what peft.freeze_* asks, then wrap with adapters (or return the model for peft=none)."""
    import peft

    frozen = frozen_layer_count(model, peft_cfg)
    if peft_cfg.name == "none":
        freeze_bottom_layers(model, frozen)
        return model
    unfrozen = list(range(frozen, decoder_layer_count(model))) if frozen else None
    config = peft_config(peft_cfg, unfrozen, model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            return peft.get_peft_model(model, config)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"peft={peft_cfg.name}: {exc}\n  fix: check peft.target_modules / rank_pattern.") from exc


# PiSSA and OLoRA move part of each base weight into the adapter at init; peft converts
# the trained adapter back into a plain LoRA that applies to the *original* base.
CONVERTED_AT_SAVE = ("pissa", "olora")
# LoftQ replaces the base weights with a quantised approximation: its adapter belongs to
# that modified base, which is saved beside it.
SAVES_ITS_BASE = ("loftq",)


def save_initial_adapter(model, peft_name: str, directory) -> None:
    """Before training: what peft needs to convert PiSSA/OLoRA adapters at the final save."""
    if peft_name in CONVERTED_AT_SAVE:
        # peft reads the init flag from this copy to know what to undo.
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(directory)
        model.peft_config["default"].init_lora_weights = peft_name


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The base model's weights as a plain transformers model names them (adapters left out)."""
    state = {}
    for name, tensor in model.get_base_model().state_dict().items():
        if "lora_" in name or "vera_" in name:
            continue
        state[name.replace(".base_layer.", ".")] = tensor
    return state


def save_final_adapter(model, peft_name: str, final_dir, initial_dir, fresh_base) -> None:
    """save_pretrained with the conversions that make the adapter load onto its base."""
    if peft_name in CONVERTED_AT_SAVE:
        model.save_pretrained(final_dir, path_initial_model_for_weight_conversion=str(initial_dir))
        return
    model.save_pretrained(final_dir)
    if peft_name in SAVES_ITS_BASE:
        base = fresh_base()
        base.load_state_dict(base_state_dict(model))
        base.save_pretrained(final_dir / "base_model")
