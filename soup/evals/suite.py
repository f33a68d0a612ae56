"""A suite file: the evaluation tasks `python -m soup.eval` and `train.eval_gate` run.

    # suite.yaml -- relative paths resolve against this file's folder
    tasks:
      heldout:                  # the name the metrics carry: heldout/loss, heldout/ppl
        kind: loss
        file: val.jsonl
      gsm8k:
        kind: generation
        file: gsm8k_test.jsonl  # rows {prompt or messages, answer}
        scorer: answer          # the `accuracy` reward's parser: ####, \\boxed{}, numbers exactly
        max_new_tokens: 256

Each kind reads the fields of KINDS below and no others: a field a kind does not read, a
misspelt one, a wrong type or a missing file is an error naming the file, line and task,
before any model loads (nothing in a suite is silently ignored).
"""

from __future__ import annotations

import difflib
import hashlib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from soup.data.dataset import PKG_PREFIX, resolve_data_path
from soup.errors import ConfigError
from soup.evals.scorers import check_scorer

REQUIRED = object()  # a field with no default
# Sampling of the evaluated model in generation and judge tasks: greedy by default, so a score is
# a property of the weights, not of a draw.
SAMPLING = {"max_new_tokens": (int, 256), "temperature": (float, 0.0), "system_prompt": (str, None),
            "completion_column": (str, None)}
# kind -> field -> (type, default). `file` rows are read by soup's readers (.jsonl, .json, .csv, .parquet, .txt).
KINDS: dict[str, dict[str, tuple[type, Any]]] = {
    # The training loop's own loss on `file`, tokenized as the run's data group says (or data: overrides).
    "loss": {"file": (str, REQUIRED), "max_rows": (int, None), "batch_size": (int, None), "task": (str, None),
             "data": (dict, None)},
    # Completions (greedy by default) scored against the reference column; scorers: soup/evals/scorers.py.
    "generation": {"file": (str, REQUIRED), "max_rows": (int, None), "batch_size": (int, None),
                   "scorer": (str, "answer"), "pattern": (str, None), "reference_column": (str, "answer"), **SAMPLING},
    # Each choice's log-likelihood after the question; acc (sum) and acc_norm (per byte of the choice).
    "multiple_choice": {"file": (str, REQUIRED), "max_rows": (int, None), "batch_size": (int, None),
                        "question_column": (str, "question"), "choices_column": (str, "choices"),
                        "reference_column": (str, "answer"), "delimiter": (str, " ")},
    # A local judge model reads `rubric` and the completion; the score is its expected rating.
    "judge": {"file": (str, REQUIRED), "max_rows": (int, None), "batch_size": (int, None), "judge": (str, REQUIRED),
              "rubric": (str, REQUIRED), "min_score": (int, 1), "max_score": (int, 5),
              "reference_column": (str, None), **SAMPLING},
    # lm-evaluation-harness tasks from local files (the lm_eval extra).
    "lm_eval": {"tasks": (list, REQUIRED), "include_path": (str, None), "num_fewshot": (int, None),
                "limit": (int, None), "batch_size": (int, None)},
}
# The data group fields a loss task may set (the rest are about training batches, not tokens).
LOSS_DATA_FIELDS = ("format", "chat_template", "max_length", "overlong", "train_on_responses_only", "text_field")
LOSS_TASKS = ("sft", "pretrain")
TYPE_NAMES = {int: "an integer", float: "a number", str: "text", list: "a list", dict: "a mapping"}
RUBRIC_FIELDS = ("prompt", "completion", "reference")


@dataclass
class SuiteTask:
    name: str
    kind: str
    options: dict[str, Any]
    where: str  # "suite.yaml:7 tasks.gsm8k", for messages

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["options"][key]
        except KeyError:
            raise AttributeError(key) from None

    def path(self, key: str = "file") -> Optional[Path]:
        value = self.options.get(key)
        return Path(value) if value is not None else None


@dataclass
class Suite:
    path: Path
    sha256: str
    tasks: list[SuiteTask] = field(default_factory=list)


def read_suite(value: str, flag: str = "suite") -> Suite:
    """The checked suite at `value` (a path: the launch directory first, then soup/assets; or pkg://...)."""
    path = resolve_data_path(value, flag)
    if not path.is_file():
        raise ConfigError(f"{flag}={value}: no such file ({path}).\n  fix: point {flag} at a suite YAML file "
                          "(see soup/evals/suite.py for its layout).")
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}\n  fix: correct the file's syntax.") from None
    data = yaml.safe_load(text)
    if not isinstance(data, dict) or set(data) != {"tasks"} or not isinstance(data["tasks"], dict) or not data["tasks"]:
        raise ConfigError(f"{path}: a suite is a mapping with one key, `tasks`, naming at least one task "
                          f"(found {type(data).__name__ if not isinstance(data, dict) else ', '.join(map(str, data))})."
                          "\n  fix: write `tasks:` then one mapping per task, e.g. `heldout: {kind: loss, file: "
                          "val.jsonl}`.")
    lines = _task_lines(root)
    suite = Suite(path, hashlib.sha256(text.encode()).hexdigest())
    for name, spec in data["tasks"].items():
        where = f"{path}:{lines.get(str(name), 0) + 1} tasks.{name}"
        suite.tasks.append(_check_task(str(name), spec, where, path.parent))
    return suite


def _task_lines(root) -> dict[str, int]:
    """task name -> its 0-based line in the file."""
    for key, value in getattr(root, "value", []):
        if key.value == "tasks" and isinstance(value, yaml.MappingNode):
            return {k.value: k.start_mark.line for k, _ in value.value}
    return {}


def _check_task(name: str, spec: Any, where: str, folder: Path) -> SuiteTask:
    fix_kinds = f"kind: {' | '.join(KINDS)}"
    if not isinstance(spec, dict) or "kind" not in spec:
        raise ConfigError(f"{where}: a task is a mapping with a `kind`.\n  fix: {fix_kinds}.")
    kind = spec["kind"]
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        raise ConfigError(f"{where}: kind={kind!r} is not a kind of evaluation"
                          f"{f' (did you mean {close[0]!r}?)' if close else ''}.\n  fix: {fix_kinds}.")
    fields = KINDS[kind]
    options: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "kind":
            continue
        if key not in fields:
            readers = [k for k, f in KINDS.items() if key in f]
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = (f" (did you mean {close[0]!r}?)" if close else
                    f"; it is read by kind {' | '.join(readers)}" if readers else "")
            raise ConfigError(f"{where}: kind {kind} does not read `{key}`{hint}.\n"
                              f"  fix: drop it; kind {kind} reads {', '.join(fields)}.")
        options[key] = _typed(value, fields[key][0], f"{where}.{key}")
    for key, (_, default) in fields.items():
        if key not in options:
            if default is REQUIRED:
                raise ConfigError(f"{where}: kind {kind} needs `{key}`.\n  fix: add `{key}: ...` to the task.")
            options[key] = default
    for key in ("file", "include_path"):
        if options.get(key) is not None:
            options[key] = _resolved(options[key], folder, f"{where}.{key}", directory=key == "include_path")
    task = SuiteTask(name, kind, options, where)
    _check_kind(task, folder)
    return task


def _typed(value: Any, kind: type, where: str) -> Any:
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    wanted = TYPE_NAMES[kind]
    raise ConfigError(f"{where}: {value!r} is a {type(value).__name__}; it must be {wanted}.\n  fix: give {wanted}.")


def _resolved(value: str, folder: Path, where: str, directory: bool = False) -> str:
    """An absolute path: pkg://... under soup/assets, absolute as written, else relative to the suite's folder."""
    path = resolve_data_path(value, where) if value.startswith(PKG_PREFIX) else Path(value).expanduser()
    if not path.is_absolute():
        path = folder / path
    if not (path.is_dir() if directory else path.is_file()):
        raise ConfigError(f"{where}: no such {'folder' if directory else 'file'} {path}.\n  fix: relative paths "
                          "resolve against the suite file's folder; give an existing path.")
    return str(path)


def _check_kind(task: SuiteTask, folder: Path) -> None:
    where = task.where
    positive = [k for k in ("max_rows", "batch_size", "max_new_tokens", "limit") if k in task.options]
    for key in positive:
        value = task.options[key]
        if value is not None and value < 1:
            raise ConfigError(f"{where}.{key}: {value}; at least 1.\n  fix: a positive count, or drop it.")
    if task.options.get("temperature", 0.0) < 0:
        raise ConfigError(f"{where}.temperature: {task.temperature}; 0 (greedy) or more.\n  fix: temperature: 0.")
    if task.kind == "loss":
        if task.task is not None and task.task not in LOSS_TASKS:
            raise ConfigError(f"{where}.task: {task.task!r}; a loss task scores tokens as {' or '.join(LOSS_TASKS)} "
                              "trains them.\n  fix: task: sft (response tokens of chat rows) or task: pretrain (every "
                              "token).")
        unknown = sorted(set(task.data or {}) - set(LOSS_DATA_FIELDS))
        if unknown:
            raise ConfigError(f"{where}.data: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not read "
                              f"by a loss task.\n  fix: data may set {', '.join(LOSS_DATA_FIELDS)}.")
    elif task.kind == "generation":
        check_scorer(task.scorer, task.pattern, where)
    elif task.kind == "judge":
        _check_judge(task, folder)
    elif task.kind == "lm_eval":
        if not task.tasks or not all(isinstance(t, str) for t in task.tasks):
            raise ConfigError(f"{where}.tasks: a non-empty list of lm-evaluation-harness task names.\n"
                              "  fix: tasks: [my_local_task].")
        from soup.evals.harness import check_lm_eval

        check_lm_eval(where)


def _check_judge(task: SuiteTask, suite_folder: Path) -> None:
    where = task.where
    judge = task.judge
    if "://" in judge or judge.startswith(("hf:", "hub:")):
        raise ConfigError(f"{where}.judge: {judge} is remote; a judge is a local model directory, so an "
                          "evaluation never sends your model's outputs anywhere.\n  fix: download the judge once "
                          "and give its folder.")
    folder = Path(judge).expanduser()
    folder = folder if folder.is_absolute() else suite_folder / folder
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{where}.judge: {folder} is not a local model directory (no config.json); hub ids are "
                          "not fetched.\n  fix: give the folder of a saved causal LM (relative paths resolve "
                          "against the suite file's folder).")
    task.options["judge"] = str(folder.resolve())
    if task.min_score >= task.max_score:
        raise ConfigError(f"{where}: min_score {task.min_score} must be below max_score {task.max_score}.\n"
                          "  fix: e.g. min_score: 1, max_score: 5.")
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(task.rubric) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"{where}.rubric: {exc} (braces are placeholders).\n  fix: write a literal brace as "
                          "{{ or }}.") from None
    unknown = sorted(used - set(RUBRIC_FIELDS))
    if unknown or "completion" not in used:
        raise ConfigError(f"{where}.rubric: it must show the judge {{completion}}"
                          f"{f'; {unknown} are not placeholders' if unknown else ''}.\n  fix: use {{prompt}}, "
                          "{completion} and (with reference_column) {reference}.")
    if "reference" in used and task.reference_column is None:
        raise ConfigError(f"{where}.rubric: it shows {{reference}}, and the task names no reference_column.\n"
                          "  fix: reference_column: answer (the column holding it), or drop {reference}.")
