"""Several processes training one model: the process group, who writes, and the sums.

    torchrun --nproc_per_node 2 -m soup.train parallelism=ddp

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address; soup joins them into one process group (gloo on CPU, nccl on CUDA,
each rank on the GPU of its LOCAL_RANK). Every rank builds the same data and model from
the same seed; the samplers give each rank its share of every step; the loop sums the
step's loss units over all ranks before the backward, so a step's gradient is that of
the whole global batch. Rank 0 alone writes the run directory, the log and the metrics.

A single-process run has world_size 1 and every helper here is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from soup.errors import ConfigError

DISTRIBUTED = ("ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = World()


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current_world() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def ranks_from_submitit_tasks() -> bool:
    """In a submitit job of several tasks (hydra.launcher.tasks_per_node > 1, or nodes > 1),
    each task is one rank: export what torchrun would have set (RANK, WORLD_SIZE, LOCAL_RANK,
    and a rendezvous on the job's first node, from SLURM_JOB_NODELIST) so that
    start_process_group joins them. False (nothing exported) outside such a job or under torchrun."""
    if launched_by_torchrun() or not os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks <= 1:
        return False
    # Each rank picks its own GPU by LOCAL_RANK (start_process_group), from all the job's GPUs.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def start_process_group() -> World:
    """Join torchrun's process group (once per process); SINGLE when not launched by torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return current_world()


def check_launch(parallelism: str, world: World) -> None:
    """parallelism=ddp needs torchrun's ranks, and torchrun's ranks need a parallelism that uses them."""
    if parallelism in DISTRIBUTED and not launched_by_torchrun():
        raise ConfigError(f"parallelism={parallelism} runs one process per rank, started by torchrun (or as the "
                          "tasks of a SLURM job).\n"
                          f"  fix: torchrun --nproc_per_node 2 -m soup.train parallelism={parallelism} ... "
                          "(or in a sweep: hydra/launcher=slurm hydra.launcher.tasks_per_node=2; "
                          "or parallelism=single for one process).")
    if parallelism not in DISTRIBUTED and world.distributed:
        raise ConfigError(f"{world.world_size} processes were started (by torchrun, or as a SLURM job's tasks), but "
                          f"parallelism={parallelism} trains in one: each would train its own copy.\n  fix: add "
                          "parallelism=ddp, or start one process (python -m soup.train; in a sweep, "
                          "hydra.launcher.tasks_per_node=1).")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper or a DeepSpeed engine (the model itself otherwise)."""
    wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine"
    return model.module if wrapped else model


def sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over every rank (the values themselves in one process)."""
    if not current_world().distributed or not values:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_dict_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each key summed over every rank; a key some ranks lack counts 0 there."""
    if not current_world().distributed:
        return dict(values)
    keys = sorted(set().union(*all_gather_objects(sorted(values))))
    return dict(zip(keys, sum_across_ranks([values.get(k, 0.0) for k in keys])))


def all_gather_objects(value) -> list:
    world = current_world()
    if not world.distributed:
        return [value]
    gathered = [None] * world.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def on_cpu(value):
    """`value` with every tensor in its dicts, lists and tuples moved to the CPU (for pickling across ranks)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: on_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    return value


def broadcast_from_main(value):
    """Rank 0's `value` on every rank."""
    if not current_world().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (a signal that reached one rank stops all)."""
    return sum_across_ranks([1.0 if flag else 0.0])[0] > 0 if current_world().distributed else flag


def barrier() -> None:
    if current_world().distributed:
        dist.barrier()


def no_sync(model: torch.nn.Module, skip: bool):
    """No gradient communication when `skip` (a micro-batch before the step's last): gradients
    add up locally and are averaged across ranks once, in the last micro-batch's backward
    (DDP's no_sync; FSDP2's gradient sync switched off, then on for the last)."""
    from soup.fsdp import is_sharded, set_gradient_sync

    if is_sharded(model):
        set_gradient_sync(model, not skip)
        return contextlib.nullcontext()
    if skip and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def zero3_partitioned(params) -> bool:
    """Whether DeepSpeed ZeRO-3 holds these parameters as partitions (it tags each with a ds_id)."""
    return any(hasattr(p, "ds_id") for p in params)


def forward_is_collective(model: torch.nn.Module) -> bool:
    """Whether the model's forward gathers weights from the other ranks (FSDP2, ZeRO-3), so
    that every rank must run the same number of forwards."""
    from soup.fsdp import is_sharded

    return is_sharded(model) or zero3_partitioned(model.parameters())


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module):
    """The model's parameters as full tensors (collective for a sharded model: call it on
    every rank). ZeRO-3's partitions are gathered for the duration of the block, FSDP2's
    shards copied into full tensors; a plain model's parameters are themselves."""
    params = list(model.parameters())
    if zero3_partitioned(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            yield params
        return
    from torch.distributed.tensor import DTensor

    yield [p.full_tensor() if isinstance(p, DTensor) else p for p in params]


def end_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
