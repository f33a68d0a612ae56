"""The interface between the loop and a task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class TaskOutput:
    """loss_sum: the loss summed over this micro-batch's units (tokens, pairs, ...).
    metric_sums: other per-unit quantities summed the same way, averaged by the loop."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """`units(batch)` is known before the forward pass, so the loop can normalise the
    loss over every micro-batch of an optimizer step exactly."""

    unit_name = "tokens"

    def __init__(self, task_cfg):
        self.cfg = task_cfg

    @abstractmethod
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss units (trained tokens, pairs, ...) this micro-batch holds."""

    @abstractmethod
    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """Run the model and return the loss summed over this micro-batch's units."""
