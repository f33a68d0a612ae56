"""Loss-spike recovery: notice a step whose loss jumps, and undo what led to it.

A step's loss is known before its update is applied. train.spike_factor=f makes the loop compare
it with the median of the last train.spike_window step losses: above f x that median, or not a
finite number, the update is not applied. The run rolls back to its newest checkpoint (weights,
optimizer, lr schedule, RNG), keeps its place in the data stream, so every micro-batch drawn since
that checkpoint (the spike's and those that led up to it) is skipped, optionally multiplies the lr
by train.spike_lr_factor, and goes on. PaLM (Chowdhery et al. 2022, arXiv 2204.02311, sec. 5.1)
handled its spikes this way: restart about 100 steps before the spike and skip the batches around
it. After train.spike_max_recoveries recoveries the run stops with an error naming them.

The median needs a history: the first min(window, MIN_HISTORY) steps are never called spikes (a
non-finite loss always is). Recoveries are counted, logged (metrics.jsonl, split "recovery") and
kept in checkpoints, so a resumed run keeps its count.

Also here: train.auto_micro_batch_size (CUDA only): before training, the largest micro-batch that
divides micro_batch_size x grad_accum_steps and fits a forward and backward of the longest rows,
with the accumulation steps set to keep the global batch (an out-of-memory error is caught and
the memory freed).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Callable

from soup.errors import SoupError

MIN_HISTORY = 5


class SpikeGuard:
    def __init__(self, factor: float, window: int, max_recoveries: int, lr_factor: float):
        self.factor, self.max_recoveries, self.lr_factor = factor, max_recoveries, lr_factor
        self.history: deque[float] = deque(maxlen=window)
        self.recoveries = 0

    def spike(self, loss: float) -> str | None:
        """Why this step's loss is a spike, or None when it is not."""
        if not math.isfinite(loss):
            return f"the loss is {loss}"
        if len(self.history) < min(self.history.maxlen, MIN_HISTORY):
            return None
        median = statistics.median(self.history)
        if loss > self.factor * median:
            return (f"the loss {loss:.4g} is above {self.factor:g} x {median:.4g}, the median of the last "
                    f"{len(self.history)} steps")
        return None

    def record(self, loss: float) -> None:
        """A step that was applied: its loss joins the history."""
        self.history.append(loss)

    def state_dict(self) -> dict:
        return {"recoveries": self.recoveries, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.recoveries = state.get("recoveries", 0)
        self.history.clear()
        self.history.extend(state.get("history", []))


def build_spike_guard(train_cfg) -> SpikeGuard | None:
    if train_cfg.spike_factor is None:
        return None
    return SpikeGuard(train_cfg.spike_factor, train_cfg.spike_window, train_cfg.spike_max_recoveries,
                      train_cfg.spike_lr_factor)



# --- auto micro-batch size (CUDA) ------------------------------------------------------------------------
def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def choose_micro_batch(global_batch: int, fits) -> int:
    """The largest micro-batch that divides `global_batch` and `fits(size)` says fits in memory
    (tried from the largest down; the global batch stays micro x accumulation steps)."""
    for size in divisors_descending(global_batch):
        if fits(size):
            return size
    raise SoupError(f"auto micro-batch size: not even one row of the longest examples fits in device memory "
                    f"(global batch {global_batch}).\n  fix: a shorter data.max_length, gradient checkpointing "
                    "(checkpointing=full), LoRA, or quant=4bit.")


def probe_fits(try_step: Callable[[int], None]) -> Callable[[int], bool]:
    """fits(size) for choose_micro_batch: runs try_step(size) (a forward and backward of `size` of the
    longest rows), True unless CUDA runs out of memory, which is caught and its memory freed."""
    import torch

    def fits(size: int) -> bool:
        try:
            try_step(size)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    return fits


def auto_micro_batch(cfg, model, task, data, device) -> str:
    """Set train.micro_batch_size and grad_accum_steps to the largest micro-batch that fits (CUDA)."""
    from soup.loop import autocast_context, to_device

    global_batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    longest = sorted(data.train, key=lambda item: len(item.get("input_ids", ())), reverse=True)

    def try_step(size: int) -> None:
        try:
            with autocast_context(cfg.train.precision, device):
                out = task.forward(model, to_device(data.collate(longest[:size]), device))
            out.loss_sum.backward()
        finally:
            model.zero_grad(set_to_none=True)

    micro = choose_micro_batch(global_batch, probe_fits(try_step))
    cfg.train.micro_batch_size, cfg.train.grad_accum_steps = micro, global_batch // micro
    return (f"auto micro-batch size: {micro} rows fit (the longest rows, forward and backward), "
            f"x {global_batch // micro} accumulation steps = the global batch of {global_batch}")
