"""The interface between the loop and a task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class TaskOutput:
    """loss_sum: the loss summed over this micro-batch's units (tokens, pairs, ...).
    metric_sums: other quantities summed the same way; the loop divides each by the
    step's units, or by the summed metric_counts[key] when the task gives one (a mean
    over a subset, e.g. the desirable rows of a KTO batch)."""

    loss_sum: torch.Tensor
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_counts: dict[str, float] = field(default_factory=dict)


class Task(ABC):
    """`units(batch)` is known before the forward pass, so the loop can normalise the
    loss over every micro-batch of an optimizer step exactly."""

    unit_name = "tokens"

    def __init__(self, task_cfg):
        self.cfg = task_cfg

    @abstractmethod
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss units (trained tokens, pairs, ...) this micro-batch holds."""

    def begin_step(self, step: int, total_steps: int, epoch: float, model: torch.nn.Module) -> None:
        """Called before optimizer step `step` (0-based): schedules that move with the run."""

    def state_dict(self) -> dict:
        """Task state a checkpoint must hold for an exact resume (running statistics, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""

    @abstractmethod
    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """Run the model and return the loss summed over this micro-batch's units."""
