"""Tasks turn a collated batch into a summed loss and metrics; the loop normalises.

A task knows its batch shape and loss; it knows nothing of optimisers or the loop.
"""

from __future__ import annotations

from soup.tasks.base import Task, TaskOutput
from soup.tasks.classifier import ClassifierTask
from soup.tasks.distill import DistillTask
from soup.tasks.embedding import EmbeddingTask
from soup.tasks.grpo import GRPOTask
from soup.tasks.preference import PreferenceTask
from soup.tasks.pretrain import PretrainTask
from soup.tasks.ppo import PPOTask
from soup.tasks.prm import PRMTask
from soup.tasks.reward_model import RewardModelTask
from soup.tasks.sft import SFTTask

PREFERENCE_TASKS = ("dpo", "ipo", "kto", "orpo", "simpo", "cpo", "bco", "preference")
TASKS: dict[str, type[Task]] = {"sft": SFTTask, "pretrain": PretrainTask, "grpo": GRPOTask,
                                "rloo": GRPOTask, "reward_model": RewardModelTask, "prm": PRMTask,
                                "ppo": PPOTask, "distill": DistillTask, "classifier": ClassifierTask,
                                "embedding": EmbeddingTask,
                                **{name: PreferenceTask for name in PREFERENCE_TASKS}}


def build_task(cfg, tokenizer) -> Task:
    """The task `cfg.task.name` names, built from the whole run config."""
    task_class = TASKS[cfg.task.name]
    if task_class in (SFTTask, PretrainTask):
        return task_class(cfg.task, cfg.kernels)
    if task_class in (GRPOTask, PPOTask):
        return task_class.from_config(cfg, tokenizer)
    return task_class(cfg.task)


__all__ = ["PREFERENCE_TASKS", "TASKS", "ClassifierTask", "DistillTask", "EmbeddingTask", "GRPOTask", "PPOTask", "PRMTask", "PreferenceTask", "RewardModelTask", "SFTTask", "Task", "TaskOutput",
           "build_task"]
