"""parallelism=deepspeed_zero2 | deepspeed_zero3: DeepSpeed's ZeRO engine around soup's model and optimizer.

ZeRO-2 splits the optimizer state and the gradients across the ranks; ZeRO-3 the weights
too (gathered module by module as they run, so the LM head the tasks apply after the
forward gathers itself). soup keeps its own loop: the loss of each micro-batch is scaled as
for ddp (units summed over every rank; DeepSpeed averages gradients over ranks) and passed
to engine.backward without DeepSpeed's division by the accumulation steps; the step's last
micro-batch is marked as the accumulation boundary, where DeepSpeed reduces, clips
(train.max_grad_norm) and steps the optimizer soup built. soup's lr schedule drives that
optimizer's groups, which DeepSpeed's optimizer shares.

Checkpoints hold DeepSpeed's own files (every rank writes its partitions under zero/)
beside rank 0's scheduler, RNG, task and trainer state, in one manifest. DeepSpeed loads
them with pickle, so before it does, each file's pickled globals are checked against the
few DeepSpeed classes its checkpoints hold: a file naming anything else is refused unread.
final/ is one plain model directory (ZeRO-3 gathers the weights to rank 0 first).
"""

from __future__ import annotations

from pathlib import Path

import torch

from soup.errors import SoupError

STAGES = {"deepspeed_zero2": 2, "deepspeed_zero3": 3}
TAG = "zero"  # the subdirectory of a checkpoint that holds DeepSpeed's files
# The only globals DeepSpeed 0.19's checkpoints pickle besides tensors and containers.
ALLOWED_GLOBALS = {"deepspeed.utils.tensor_fragment.fragment_address",
                   "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum"}


def is_engine(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def engine_config(cfg, hidden_size: int | None = None) -> dict:
    zero = {"stage": STAGES[cfg.parallelism.name]}
    if hidden_size:
        # DeepSpeed's default buckets (5e8 elements: 1.9 GB per rank in fp32) dwarf a small
        # model; size them from its width (the values of transformers' DeepSpeed "auto").
        zero["reduce_bucket_size"] = hidden_size * hidden_size
        if zero["stage"] == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if cfg.parallelism.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.parallelism.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        # soup's AdamW/SGD/...: DeepSpeed only wraps it.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def start_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg):
    """(engine, its optimizer): DeepSpeed partitions the model and wraps soup's optimizer."""
    import deepspeed

    engine, engine_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                          config=engine_config(cfg, model_width(model)),
                                                          dist_init_required=False)
    return engine, engine_optimizer


def model_width(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "hidden_size", None)


def backward(engine, loss: torch.Tensor, last: bool) -> None:
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> torch.Tensor:
    """Reduce, clip and step at the boundary; the gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return torch.as_tensor(0.0 if norm is None else float(norm))


def save_partitions(engine, directory: Path) -> None:
    """Every rank writes its partitions under directory/zero (collective)."""
    engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)


def load_partitions(engine, directory: Path) -> None:
    """Each rank reads its partitions back, after the pickled globals of every file are checked."""
    for file in sorted((directory / TAG).glob("*.pt")):
        try:
            found = ", ".join(sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(file)))
                                     - ALLOWED_GLOBALS))
        except Exception as exc:  # a pickle the scanner cannot read is not one DeepSpeed wrote
            found = f"unreadable to soup's check: {exc.__class__.__name__}: {exc}"
        if found:
            raise SoupError(f"resume: {file} holds Python objects that soup will not unpickle ({found}); "
                            "nothing in it ran.\n  fix: delete that checkpoint and resume from an older one "
                            "(resume=auto picks the newest intact one).")
    path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise SoupError(f"resume: DeepSpeed found no checkpoint in {directory / TAG}.\n"
                        "  fix: resume from a checkpoint this parallelism wrote, with the same number of ranks.")


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (ZeRO-3 gathers them; collective)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict() or {}
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
