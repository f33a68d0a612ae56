"""A resumable micro-batch order: the exact position is two integers.

Epoch e visits the examples in the permutation drawn from a generator seeded with
(seed, e), so any position in the stream can be rebuilt from (epoch, batch index)
without replaying the run. The stream continues across epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplerPosition:
    epoch: int = 0
    batch_index: int = 0


class ResumableBatchSampler:
    """Yields lists of example indices, micro_batch_size at a time, epoch after epoch.

    The last batch of an epoch may be short (no example is dropped).
    """

    def __init__(self, num_examples: int, micro_batch_size: int, seed: int, shuffle: bool = True):
        if num_examples < 1:
            raise ValueError("the sampler needs at least one example")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.position = SamplerPosition()
        self._cached_epoch, self._cached_order = -1, []

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.num_examples // self.micro_batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def next_batch(self) -> list[int]:
        """The indices of the next micro-batch; advances the position."""
        pos = self.position
        if self._cached_epoch != pos.epoch:
            self._cached_epoch, self._cached_order = pos.epoch, self.epoch_order(pos.epoch)
        order = self._cached_order
        start = pos.batch_index * self.micro_batch_size
        batch = order[start : start + self.micro_batch_size]
        pos.batch_index += 1
        if pos.batch_index >= self.batches_per_epoch:
            pos.epoch, pos.batch_index = pos.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "batch_index": self.position.batch_index,
                "num_examples": self.num_examples, "micro_batch_size": self.micro_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_examples", "micro_batch_size", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint's sampler had {key}={state[key]}, this run has {getattr(self, key)}: "
                    "resuming would not continue the same data order"
                )
        self.position = SamplerPosition(state["epoch"], state["batch_index"])
