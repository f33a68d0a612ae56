"""Multipack: micro-batches chosen by First-Fit-Decreasing so padding wastes little.

Random micro-batches of uneven SFT examples, padded to their longest, spend much of
their compute on pad cells. Multipack instead fills each micro-batch ("bin") up to
a budget of capacity = micro_batch_size x max_length cells, grouping examples of
similar length; the normal padding collator then pads each bin to its longest.

The constraint (per bin): len(bin) x longest_in_bin <= capacity, so the padded
batch never holds more cells than a full micro_batch_size x max_length batch
(and therefore the bin's real tokens, <= len x longest, fit too). Optional caps:
len(bin) <= max_items_per_bin, and len(bin) x longest^2 <= max_mask_cells (the
cells of the [items, 1, longest, longest] attention mask a padded batch implies).
A bin therefore holds many short examples or few long ones: the micro-batch size
varies, the token budget does not (the loop normalises the loss by trained tokens).

FFD under this constraint is one pass: items come longest first, so a bin's first
item is its longest and fixes its item limit when it opens; limits only grow from
bin to bin and a bin is opened only when every earlier one is full, so "the first
bin with room" is always the newest. (tests/unit/data/test_multipack.py checks this
against a literal first-fit scan.) The bins depend only on the sorted lengths: the
(seed, epoch) shuffle breaks ties between equal lengths and orders the bins, but
examples of distinct lengths meet in the same bins every epoch.

Several ranks: the epoch's bins are made a multiple of world_size (see
`_divisible_by_ranks`), sorted by token count and dealt in steps of world_size
(snake order), so the bins of one optimizer step have similar cost and every rank
gets the same number of bins and about the same tokens per epoch. The steps are
then shuffled. Every example is used exactly once per epoch across all ranks.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from soup.data.sampler import SamplerPosition
from soup.errors import ConfigError

# The construction parameters that fix the stream: a checkpoint must match them to resume.
# rank is not among them: all ranks share one position, and rank 0's state is the one saved.
RESUME_KEYS = ("num_examples", "lengths_sha256", "micro_batch_size", "max_length", "seed", "world_size",
               "max_items_per_bin", "max_mask_cells")


class MultipackBatchSampler:
    """Yields this rank's FFD micro-batches (lists of example indices), epoch after epoch.

    lengths: token count of each example, each in [1, max_length].
    micro_batch_size, max_length: the bin capacity is their product, in padded cells.
    seed: with the epoch, seeds the shuffle (same seed -> same stream).
    rank, world_size: this process's share of the bins.
    max_items_per_bin, max_mask_cells: optional caps (None = no cap), see the module doc.
    Same interface as ResumableBatchSampler: next_batch(), batches_per_epoch
    (per rank), position, state_dict(), load_state_dict().
    """

    def __init__(self, lengths: Sequence[int], micro_batch_size: int, max_length: int, seed: int,
                 rank: int = 0, world_size: int = 1, max_items_per_bin: int | None = None,
                 max_mask_cells: int | None = None):
        if not lengths:
            raise ValueError("the multipack sampler needs at least one example")
        for name, value in (("micro_batch_size", micro_batch_size), ("max_length", max_length),
                            ("world_size", world_size), ("max_items_per_bin", max_items_per_bin),
                            ("max_mask_cells", max_mask_cells)):
            if value is not None and value < 1:
                raise ValueError(f"multipack: {name} must be >= 1, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"multipack: rank {rank} is not in [0, world_size={world_size})")
        self.lengths = [int(n) for n in lengths]
        self.micro_batch_size, self.max_length, self.seed = micro_batch_size, max_length, seed
        self.rank, self.world_size = rank, world_size
        self.max_items_per_bin, self.max_mask_cells = max_items_per_bin, max_mask_cells
        self.capacity_cells = micro_batch_size * max_length
        self._check_lengths()
        if len(self.lengths) < world_size:
            raise ValueError(f"multipack: {len(self.lengths)} examples cannot give each of {world_size} ranks a bin")
        self.position = SamplerPosition()
        self._cached_epoch, self._cached_bins = -1, []
        self.duplicated_bins = 0
        self._bins_per_epoch = len(self.epoch_bins(0)) // world_size

    def _check_lengths(self) -> None:
        for i, n in enumerate(self.lengths):
            if n < 1:
                raise ValueError(f"example {i} is empty ({n} tokens): multipack needs at least one token per example")
            if n > self.max_length:
                raise ConfigError(f"example {i} has {n} tokens > data.max_length={self.max_length}\n"
                                 "  fix: truncate it (data.overlong=truncate or drop) or raise data.max_length.")
            if self.max_mask_cells is not None and n * n > self.max_mask_cells:
                raise ConfigError(f"example {i} has {n} tokens: its attention mask alone needs {n}^2 = {n * n:,} cells "
                                 f"> data.multipack_max_mask_cells={self.max_mask_cells:,}\n"
                                 "  fix: raise data.multipack_max_mask_cells or lower data.max_length.")

    # -- the plan of one epoch -------------------------------------------------

    def max_items(self, longest: int) -> int:
        """How many examples a bin whose longest example has `longest` tokens may hold."""
        limit = self.capacity_cells // longest
        if self.max_items_per_bin is not None:
            limit = min(limit, self.max_items_per_bin)
        if self.max_mask_cells is not None:
            limit = min(limit, self.max_mask_cells // (longest * longest))
        return limit

    def pack(self, order: Sequence[int]) -> list[list[int]]:
        """First-Fit-Decreasing bins of the examples in `order` (ties in length keep that order)."""
        bins: list[list[int]] = []
        limit = 0
        for i in sorted(order, key=lambda i: -self.lengths[i]):
            if bins and len(bins[-1]) < limit:
                bins[-1].append(i)
            else:
                bins.append([i])
                limit = self.max_items(self.lengths[i])
        return bins

    def epoch_bins(self, epoch: int) -> list[list[int]]:
        """All ranks' bins of `epoch`, in step order: step s is bins[s*world_size : (s+1)*world_size],
        rank r takes bins[s*world_size + r]."""
        if epoch == self._cached_epoch:
            return self._cached_bins
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        bins = self.pack(torch.randperm(len(self.lengths), generator=generator).tolist())
        bins, self.duplicated_bins = self._divisible_by_ranks(bins)
        bins = self._deal(bins, generator)
        if epoch > 0 and len(bins) != self._bins_per_epoch * self.world_size:
            raise RuntimeError(f"multipack: epoch {epoch} has {len(bins)} bins, epoch 0 had "
                               f"{self._bins_per_epoch * self.world_size}; the bins should depend only on the lengths")
        self._cached_epoch, self._cached_bins = epoch, bins
        return bins

    def _tokens(self, bin_: list[int]) -> int:
        return sum(self.lengths[i] for i in bin_)

    def _divisible_by_ranks(self, bins: list[list[int]]) -> tuple[list[list[int]], int]:
        """Make len(bins) a multiple of world_size without dropping an example.

        Rule: while not divisible, split the bin with the most items in two halves
        (a part of a valid bin is valid; the many-item bins hold the shortest
        examples, so little efficiency is lost). Only if every bin holds a single
        example are the bins with the fewest tokens repeated to fill the last step
        (returned count > 0; those examples are seen twice that epoch). At
        world_size=1 nothing changes.
        """
        bins = [list(b) for b in bins]
        while len(bins) % self.world_size:
            # Most items first, then the earliest opened: deterministic.
            k = max(range(len(bins)), key=lambda j: (len(bins[j]), -j))
            if len(bins[k]) < 2:
                break
            half = len(bins[k]) // 2
            bins[k], tail = bins[k][:half], bins[k][half:]
            bins.append(tail)
        missing = -len(bins) % self.world_size
        if missing:
            fewest = sorted(range(len(bins)), key=lambda j: (self._tokens(bins[j]), j))[:missing]
            bins += [list(bins[j]) for j in fewest]
        return bins, missing

    def _deal(self, bins: list[list[int]], generator: torch.Generator) -> list[list[int]]:
        """Group bins of similar token count into steps of world_size, balance the
        ranks with snake order, and shuffle the steps."""
        ranked = sorted(bins, key=lambda b: (-self._tokens(b), b[0]))
        steps = []
        for s in range(len(ranked) // self.world_size):
            step = ranked[s * self.world_size : (s + 1) * self.world_size]
            steps.append(step if s % 2 == 0 else step[::-1])
        return [b for s in torch.randperm(len(steps), generator=generator).tolist() for b in steps[s]]

    # -- the ResumableBatchSampler interface --------------------------------------

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch for this rank (the same for every rank and epoch)."""
        return self._bins_per_epoch

    def next_batch(self) -> list[int]:
        """The indices of this rank's next micro-batch; advances the position."""
        pos = self.position
        batch = list(self.epoch_bins(pos.epoch)[pos.batch_index * self.world_size + self.rank])
        pos.batch_index += 1
        if pos.batch_index >= self.batches_per_epoch:
            pos.epoch, pos.batch_index = pos.epoch + 1, 0
        return batch

    def _fingerprint(self) -> dict:
        digest = hashlib.sha256(",".join(map(str, self.lengths)).encode()).hexdigest()
        return {"num_examples": len(self.lengths), "lengths_sha256": digest,
                "micro_batch_size": self.micro_batch_size, "max_length": self.max_length, "seed": self.seed,
                "world_size": self.world_size, "max_items_per_bin": self.max_items_per_bin,
                "max_mask_cells": self.max_mask_cells}

    def state_dict(self) -> dict:
        return {"kind": "multipack", "epoch": self.position.epoch, "batch_index": self.position.batch_index,
                **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "multipack":
            raise ConfigError("the checkpoint's sampler was not a multipack sampler: resuming with "
                             "data.multipack=true would not continue the same data order\n"
                             "  fix: resume with the run's data.multipack flag.")
        mine = self._fingerprint()
        for key in RESUME_KEYS:
            if state[key] != mine[key]:
                raise ConfigError(
                    f"the checkpoint's multipack sampler had {key}={state[key]!r}, this run has {mine[key]!r}: "
                    "resuming would not continue the same data order"
                )
        self.position = SamplerPosition(state["epoch"], state["batch_index"])

    # -- what the packing achieved ---------------------------------------------

    @property
    def efficiency(self) -> float:
        """Real tokens / (bins x micro_batch_size x max_length) over all ranks, current epoch."""
        bins = self.epoch_bins(self.position.epoch)
        return sum(self._tokens(b) for b in bins) / (len(bins) * self.capacity_cells)

    @property
    def padded_efficiency(self) -> float:
        """Real tokens / padded cells (sum over bins of len(bin) x longest), current epoch."""
        bins = self.epoch_bins(self.position.epoch)
        padded = sum(len(b) * max(self.lengths[i] for i in b) for b in bins)
        return sum(self._tokens(b) for b in bins) / padded


def naive_padding_efficiency(lengths: Sequence[int], micro_batch_size: int, seed: int) -> float:
    """Real tokens / padded cells of random micro-batches padded to their longest (the baseline)."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[s : s + micro_batch_size] for s in range(0, len(order), micro_batch_size)]
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return sum(lengths) / padded
