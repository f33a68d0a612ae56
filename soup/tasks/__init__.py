"""Tasks turn a collated batch into a summed loss and metrics; the loop normalises.

A task knows its batch shape and loss; it knows nothing of optimisers or the loop.
"""

from __future__ import annotations

from soup.tasks.base import Task, TaskOutput
from soup.tasks.preference import PreferenceTask
from soup.tasks.pretrain import PretrainTask
from soup.tasks.sft import SFTTask

PREFERENCE_TASKS = ("dpo", "ipo", "kto", "orpo", "simpo", "cpo", "bco", "preference")
TASKS: dict[str, type[Task]] = {"sft": SFTTask, "pretrain": PretrainTask,
                                **{name: PreferenceTask for name in PREFERENCE_TASKS}}


def build_task(task_cfg, kernels_cfg=None) -> Task:
    if TASKS[task_cfg.name] in (SFTTask, PretrainTask):
        return TASKS[task_cfg.name](task_cfg, kernels_cfg)
    return TASKS[task_cfg.name](task_cfg)


__all__ = ["PREFERENCE_TASKS", "TASKS", "PreferenceTask", "SFTTask", "Task", "TaskOutput", "build_task"]
