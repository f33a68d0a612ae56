"""bitsandbytes 4-bit / 8-bit base weights (QLoRA when combined with LoRA).

transformers quantises weights while loading them, so a model built from a config
(model=tiny) is written once to a scratch directory and loaded back quantised. The
quantised weights are frozen; adapters train on top of them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from soup.errors import ConfigError, require

BNB_QUANTS = ("4bit", "8bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def bnb_config(quant_cfg: DictConfig):
    require("bitsandbytes", extra="quant", wanted_by=f"quant={quant_cfg.name}")
    from transformers import BitsAndBytesConfig

    if quant_cfg.name == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.quant_type,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant_cfg.compute_dtype],
        bnb_4bit_quant_storage=STORAGE[quant_cfg.quant_storage],
    )


def load_quantized(path: str | Path, quant_cfg: DictConfig, device: torch.device, model_class=None, **kwargs):
    """model_class: what loads it (AutoModelForCausalLM unless the task's head is another)."""
    from transformers import AutoModelForCausalLM

    model_class = model_class or AutoModelForCausalLM
    model = model_class.from_pretrained(path, quantization_config=bnb_config(quant_cfg),
                                        device_map={"": str(device)}, **kwargs)
    if quant_cfg.name == "4bit" and device.type == "cpu":
        _check_cpu_blocks(model)
    return model


def _check_cpu_blocks(model) -> None:
    # bitsandbytes' CPU 4-bit kernels repack weights in blocks of 64 input features
    # (at eval time); a narrower layer fails deep inside them, so say it here.
    import bitsandbytes as bnb

    narrow = [name for name, module in model.named_modules()
              if isinstance(module, bnb.nn.Linear4bit) and module.in_features % 64]
    if narrow:
        raise ConfigError(f"quant=4bit on CPU needs layers whose input size is a multiple of 64; "
                          f"{narrow[0]} (and {len(narrow) - 1} more) is not.\n"
                          "  fix: a wider model (model.tiny.hidden_size / intermediate_size multiples of 64), "
                          "quant=8bit, or a CUDA device.")


def quantize_built_model(model, quant_cfg: DictConfig, device: torch.device, **kwargs):
    """Quantise a model that exists only in memory (model=tiny) by a save/load round trip.

    `kwargs` go to from_pretrained: the built model's attention implementation and dtype
    are not in its saved config, so the caller passes them again. Under torchrun
    transformers saves on rank 0 only, so every rank loads rank 0's copy (the same weights:
    one seed)."""
    from soup.distributed import barrier, broadcast_from_main, current_world

    world = current_world()
    scratch = broadcast_from_main(tempfile.mkdtemp(prefix="soup-quant-") if world.is_main else None)
    try:
        if world.is_main:
            model.save_pretrained(scratch)
        barrier()
        return load_quantized(scratch, quant_cfg, device, model_class=type(model), **kwargs)
    finally:
        barrier()
        if world.is_main:
            shutil.rmtree(scratch, ignore_errors=True)


def prepare_for_adapters(model):
    """peft's preparation of a k-bit model: norms in fp32, input grads for adapters.

    Gradient checkpointing stays with soup's checkpointing group, not peft's.
    """
    import peft

    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
