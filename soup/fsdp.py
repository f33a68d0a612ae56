"""parallelism=fsdp2: each rank holds 1/world_size of every weight, gradient and optimizer state.

torch's fully_shard (FSDP2) shards each decoder block and then the root (embeddings, final
norm, LM head): a block's weights are gathered just before it runs and freed after it
(`parallelism.reshard_after_forward`; false keeps them until the backward, trading memory
for one all-gather less); gradients are reduce-scattered, averaged over ranks as DDP's
are, so the loop's units-over-all-ranks scaling applies unchanged. train.precision=bf16
adds a mixed-precision policy (bf16 weights in compute, fp32 gradient reduction) to the
loop's autocast. The root stays gathered after its forward: the tasks apply the LM head to
selected hidden states after the forward returns (soup/tasks/logps.py).

Checkpoints are torch.distributed.checkpoint's sharded format: every rank writes its own
shards of the weights and optimizer state into checkpoints/step-N/ beside rank 0's usual
files (scheduler, RNG, task state, trainer state, manifest), and a resume at the same
world size loads each rank's shards back. final/ is one Hugging Face directory: the full
weights are gathered to rank 0, loaded into a plain copy of the model and saved as a
single-process run saves them.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

SHARDED_METADATA = ".metadata"  # what torch.distributed.checkpoint writes beside the shards


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: torch.nn.Module, precision: str, reshard_after_forward: bool,
                cpu_offload: bool) -> torch.nn.Module:
    """fully_shard every decoder block (the model's _no_split_modules), then the root."""
    block_names = set(getattr(_transformers_model(model), "_no_split_modules", None) or ())
    if not block_names:
        raise ValueError("parallelism=fsdp2 needs a transformers model that names its decoder blocks "
                         "(_no_split_modules)")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    options = {"mp_policy": policy, **({"offload_policy": CPUOffloadPolicy()} if cpu_offload else {})}
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, reshard_after_forward=False, **options)
    return model


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers PreTrainedModel inside a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    model.set_requires_gradient_sync(sync)


def save_sharded(directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the weights and the optimizer state into `directory` (collective)."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(directory, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each rank reads its shards back (collective; the same world size that wrote them)."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights, gathered on rank 0 (on the CPU); empty on the other ranks (collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
