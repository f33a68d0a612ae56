"""The interface between the entry point, the loop and a task.

soup/train.py reads the same for every task: the task builds its data
(`build_data`), then, once the model exists, anything else it trains with
(`setup`: a reference model, a reward model); the loop calls `units`, `begin_step`
and `forward`. A new task (grpo, reward_model, ...) adds a Task subclass and a line
in soup/tasks/__init__.py, not a branch in train.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

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


@dataclass
class TaskData:
    """What a task trains and evaluates on.

    train: the items the sampler draws micro-batches from (examples, or packed rows).
    collate: a list of items -> a batch of tensors; eval_collate: the same for `val`
    (None: collate). sampler: None for shuffled micro-batches of train.micro_batch_size.
    files: the data files read (hashed into run.json); reports: asdict-able summaries
    for run.json; chat_template: the template the data was rendered with (saved with the
    tokenizer); lines: what the run log says about the data."""

    train: list
    val: list | None
    collate: Callable[[list], dict[str, torch.Tensor]]
    files: list[str]
    report: Any
    val_report: Any = None
    eval_collate: Callable[[list], dict[str, torch.Tensor]] | None = None
    sampler: Any = None
    chat_template: str | None = None
    lines: list[str] = field(default_factory=list)


class Task(ABC):
    """`units(batch)` is known before the forward pass, so the loop can normalise the
    loss over every micro-batch of an optimizer step exactly."""

    unit_name = "tokens"
    # The head on the decoder (soup/models/load.py HEADS): next-token logits unless the task
    # trains a score (a reward model) or token classes (a process reward model).
    model_head = "causal_lm"
    # Optimizer steps per sampler draw (grpo: num_iterations steps train on one generation batch).
    steps_per_draw = 1
    # Whether a step may hold no loss unit (grpo with skip_zero_advantage): it then updates nothing.
    allows_empty_steps = False

    def __init__(self, task_cfg):
        self.cfg = task_cfg

    @abstractmethod
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """How many loss units (trained tokens, pairs, ...) this micro-batch holds."""

    @abstractmethod
    def build_data(self, cfg, tokenizer) -> TaskData:
        """Read, tokenize and arrange this task's data (cfg: the whole run config)."""

    def setup(self, model: torch.nn.Module, cfg, data: TaskData, device: torch.device, autocast) -> list[str]:
        """Build what the task needs besides the policy (a reference, a reward model); return
        log lines. Runs after PEFT and before the memory features wrap the model."""
        return []

    def prepare_step(self, micro_rows: list[list], collate, model: torch.nn.Module, step: int) -> list[dict]:
        """The micro-batches optimizer step `step` trains on, from the rows the sampler drew for it.
        Offline tasks collate them; an online task (grpo) generates and scores completions here."""
        return [collate(rows) for rows in micro_rows]

    def optimized_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """What the run's optimizer trains: the model, or the model and what the task trains
        beside it (ppo: its value model), under one gradient clip."""
        return model

    def draws_rows(self, step: int) -> bool:
        """Whether optimizer step `step` draws new rows from the sampler (see steps_per_draw)."""
        return True

    def step_log(self) -> dict[str, float]:
        """Per-step figures the task logs as they are (grpo: its generation batch's rewards)."""
        return {}

    def evaluate(self, model: torch.nn.Module, examples: list, batch_size: int, device: torch.device) -> dict | None:
        """Evaluation metrics over `examples` when the task measures something other than its
        loss (grpo: the rewards of sampled completions); None: the loop's loss evaluation."""
        return None

    def begin_step(self, step: int, total_steps: int, epoch: float, model: torch.nn.Module) -> None:
        """Called before optimizer step `step` (0-based): schedules that move with the run."""

    def finish_final(self, final_dir, model: torch.nn.Module, full_model: bool) -> list[str]:
        """Add the task's own files to final/ once the model is saved there: full_model, the whole
        model (embedding: the sentence-transformers modules), else its adapters (classifier: the
        head's config, class names included, for soup.merge); return log lines."""
        return []

    def state_dict(self) -> dict:
        """Task state a checkpoint must hold for an exact resume (running statistics, ...)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned."""

    def rank_state_dict(self) -> dict:
        """State that differs from rank to rank (each rank's own rollouts, ...): every rank's
        is saved, and each rank gets its own back on resume."""
        return {}

    def load_rank_state_dict(self, state: dict) -> None:
        """Restore what this rank's rank_state_dict() returned."""

    @abstractmethod
    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        """Run the model and return the loss summed over this micro-batch's units."""
