"""Tasks turn a collated batch into a summed loss and metrics; the loop normalises.

A task knows its batch shape and loss; it knows nothing of optimisers or the loop.
"""

from __future__ import annotations

from soup.tasks.base import Task, TaskOutput
from soup.tasks.pretrain import PretrainTask
from soup.tasks.sft import SFTTask

TASKS: dict[str, type[Task]] = {"sft": SFTTask, "pretrain": PretrainTask}


def build_task(task_cfg) -> Task:
    return TASKS[task_cfg.name](task_cfg)


__all__ = ["TASKS", "Task", "TaskOutput", "build_task"]
