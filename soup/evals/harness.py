"""The `lm_eval` task kind: EleutherAI's lm-evaluation-harness tasks on a loaded model, offline.

lm-evaluation-harness (package `lm_eval`, the optional `lm_eval` extra) owns the task
definitions, prompts and metrics; we hand it the live model through its HF wrapper
(`HFLM(pretrained=model)`), so the model is never reloaded, and flatten its nested results
to the suite's `{"<task>/<metric>": value}`. Tasks come from lm_eval's built-in YAMLs and
from `include_path` (a folder of task YAMLs); their data must already be on disk (a local
`dataset_path: json` with `data_files`, or the Hugging Face datasets cache), because the
run is held offline: a task that would download fails instead of hanging on the network.

How lm_eval scores a multiple-choice row, which a test pins by hand: the continuation is
`target_delimiter + choice` (" " by default); the context is encoded with the tokenizer's
special tokens (BOS), context + continuation likewise, and the continuation's tokens are the
tail of the whole encoding past the context's length. `acc` takes the argmax of the summed
log-probs, `acc_norm` of the sums divided by each choice's length in characters.

lm_eval is imported inside the functions: soup imports without it.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import importlib
import os
from pathlib import Path

import torch

from soup.errors import ConfigError

# lm_eval's suffix for metrics computed without a filter ("acc,none").
NO_FILTER = "none"


def check_lm_eval(where: str) -> None:
    """Raise ConfigError when lm_eval is not importable; `where` names the suite file and task
    (e.g. "suite.yaml: tasks.arc"), so the message says which task to drop instead."""
    try:
        importlib.import_module("lm_eval")
    except ImportError as exc:
        raise ConfigError(
            f"{where}: the `lm_eval` task kind needs the optional package 'lm_eval' "
            f"(EleutherAI's lm-evaluation-harness), which is not installed.\n"
            f"  fix: pip install 'soup-harness[lm_eval]' (or drop the task from {where})"
        ) from exc


def run_lm_eval(model, tokenizer, *, tasks: list[str], include_path: str | None, num_fewshot: int | None,
                limit: int | None, batch_size: int, device: torch.device, seed: int, where: str) -> dict[str, float]:
    """Run lm-evaluation-harness tasks on an already loaded transformers causal LM (in eval mode)
    and its tokenizer; return flat metrics {"<lm_eval task>/<metric>": value} (stderr entries and
    non-numeric values dropped; lm_eval's ",none" filter suffix stripped from metric names, other
    filter names kept as "<metric>.<filter>").

    tasks: lm_eval task, group or tag names (or paths to task YAMLs); include_path: a folder of
    extra task YAMLs, searched after lm_eval's own; num_fewshot: None keeps each task's default
    (0 where it sets none); limit: at most this many documents per task; device: where `model`
    already lives (lm_eval builds its inputs on model.device; this is recorded only). `seed`
    seeds python, numpy and torch's global generators and the few-shot sampler, as lm_eval does.
    """
    check_lm_eval(where)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"{where}: include_path {include_path} is not a folder\n"
                          f"  fix: point include_path at the folder that holds the task YAMLs")
    with _offline():
        manager = _task_manager(include_path)
        _check_task_names(manager, tasks, include_path, where)
        # HFLM sets a pad token on the tokenizer it gets; hand it a copy so the caller's is untouched.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
            device=str(device), bootstrap_iters=0,  # stderr is dropped below; its bootstrap is the slow part
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed)
    return flatten_results(out["results"])


def flatten_results(results: dict[str, dict]) -> dict[str, float]:
    """lm_eval's {"task": {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": ..., "sample_len": 6}} ->
    {"task/acc": 0.5}; a metric under a named filter keeps it: "exact_match,strict-match" ->
    "task/exact_match.strict-match". Only "metric,filter" keys are metrics (name, alias, sample_len
    and sample_count are bookkeeping); stderr entries and non-numeric values are dropped."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, comma, filter_name = key.partition(",")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not comma or metric.endswith("_stderr") or not numeric:
                continue
            name = metric if filter_name in ("", NO_FILTER) else f"{metric}.{filter_name}"
            flat[f"{task}/{name}"] = float(value)
    return flat


@functools.lru_cache(maxsize=None)
def _task_manager(include_path: str | None):
    """lm_eval's TaskManager over its built-in task YAMLs and `include_path`, built once per process
    and folder: indexing the ~14k built-in YAMLs takes 5-10 s on a CPU, and a suite may hold several
    lm_eval tasks. A YAML added to the folder later in the same process is not seen; edits to indexed
    ones are, since a task reads its file when it loads."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _check_task_names(manager, tasks: list[str], include_path: str | None, where: str) -> None:
    """Fail before any data loads when lm_eval knows a task name neither built in nor under include_path."""
    for name in tasks:
        if name in manager.task_index or Path(name).expanduser().is_file():
            continue
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        listing = "lm-eval ls tasks" + (f" --include_path {include_path}" if include_path else "")
        raise ConfigError(
            f"{where}: lm_eval knows no task '{name}'{hint}; it looked in its built-in tasks"
            f" and include_path {include_path}\n"
            f"  fix: spell it as `{listing}` lists it, or put its YAML under include_path"
            f" (lm_eval skips a YAML that does not parse without a word)")


@contextlib.contextmanager
def _offline():
    """Hold the Hugging Face hub and datasets offline, then restore the previous settings.

    datasets and huggingface_hub read the environment once, at import, so the module-level
    flags they consult at run time are set as well as the variables.
    """
    import datasets.config
    import huggingface_hub.constants

    env_names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
             (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    saved_env = {name: os.environ.get(name) for name in env_names}
    saved_flags = [getattr(module, attr) for module, attr in flags]
    os.environ.update({name: "1" for name in env_names})
    for module, attr in flags:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for (module, attr), value in zip(flags, saved_flags):
            setattr(module, attr, value)
