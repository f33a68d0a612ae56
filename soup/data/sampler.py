"""A resumable micro-batch order: the exact position is two integers.

Epoch e visits the examples in the permutation drawn from a generator seeded with
(seed, e), so any position in the stream can be rebuilt from (epoch, batch index)
without replaying the run. The stream continues across epochs.

With several ranks (parallelism=ddp) every rank draws the same permutation and each
micro-step takes world_size x micro_batch_size examples of it, rank r the r-th slice:
every example once per epoch across the ranks, every rank the same number of
micro-batches. The epoch's last micro-step shares what is left as evenly as it can; a
rank left with nothing repeats one example (only when fewer examples than ranks remain).
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

    def __init__(self, num_examples: int, micro_batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        if num_examples < 1:
            raise ValueError("the sampler needs at least one example")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.num_examples = num_examples
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.position = SamplerPosition()
        self._cached_epoch, self._cached_order = -1, []

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank."""
        return -(-self.num_examples // (self.micro_batch_size * self.world_size))

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
        step = self.micro_batch_size * self.world_size
        batch = self._rank_share(order[pos.batch_index * step : (pos.batch_index + 1) * step])
        pos.batch_index += 1
        if pos.batch_index >= self.batches_per_epoch:
            pos.epoch, pos.batch_index = pos.epoch + 1, 0
        return batch

    def _rank_share(self, chunk: list[int]) -> list[int]:
        """This rank's slice of one micro-step's examples."""
        size = self.micro_batch_size
        if len(chunk) == size * self.world_size:
            return chunk[self.rank * size : (self.rank + 1) * size]
        base, extra = divmod(len(chunk), self.world_size)  # the epoch's last, short micro-step
        start = self.rank * base + min(self.rank, extra)
        share = chunk[start : start + base + (self.rank < extra)]
        return share or [chunk[self.rank % len(chunk)]]

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "batch_index": self.position.batch_index,
                "num_examples": self.num_examples, "micro_batch_size": self.micro_batch_size, "seed": self.seed,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        state = {"world_size": 1, **state}  # checkpoints from before ranks ran with one
        for key in ("num_examples", "micro_batch_size", "seed", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"the checkpoint's sampler had {key}={state[key]}, this run has {getattr(self, key)}: "
                    "resuming would not continue the same data order"
                )
        self.position = SamplerPosition(state["epoch"], state["batch_index"])
