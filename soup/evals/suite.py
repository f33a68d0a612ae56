"""A suite: the evaluation tasks `python -m soup.eval` and `train.eval_gate` run.

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

soup.eval composes its suite like soup.train composes data: the `suite` group (conf/suite/)
holds a suite (`suite=demo`) or names a suite file (`suite=file suite.file=suite.yaml`), and
`suite.tasks.<task>.<field>=...` on the command line sets a field over the suite's, so a sweep can
vary one: `--multirun suite.tasks.sums.max_new_tokens=8,64`. A field (or task) the composed config
does not hold yet, such as any field of a suite.file's tasks, takes Hydra's `+`:
`+suite.tasks.gsm8k.max_new_tokens=512`, `+suite.tasks.new={kind: loss, file: val.jsonl}`. A suite file may itself name a
base file (`file: base.yaml`) whose tasks its own `tasks` extend the same way. train.eval_gate
takes a suite file, or the name of one of conf/suite/.

Each kind reads the fields of KINDS below and no others: a field a kind does not read, a
misspelt one, a wrong type or a missing file is an error naming the file and line (or the
flag) and the task, before any model loads (nothing in a suite is silently ignored).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
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


@dataclass
class Suite:
    origin: str  # the suite file, or "soup.eval's suite group (<its file>)"
    sha256: str  # of the checked tasks (every field, defaults included): equal hashes, equal evaluations
    tasks: list[SuiteTask] = field(default_factory=list)


@dataclass
class RawTask:
    """A task's fields as written, before the checks, and where they were written."""

    spec: dict[str, Any]
    where: str


CONF_SUITES = Path(__file__).resolve().parents[2] / "conf" / "suite"
# A conf/suite/ file is a Hydra config too: its `defaults` list is Hydra's (the group's schema).
DOCUMENT_KEYS = ("name", "file", "tasks", "defaults")
PATH_FIELDS = ("file", "include_path", "judge")


def read_suite(value: str, flag: str = "suite") -> Suite:
    """The checked suite of a file: a path (the launch directory first, then soup/assets), pkg://...,
    or the name of a suite in conf/suite/ (train.eval_gate=demo), whose relative paths mean what they
    mean to `python -m soup.eval suite=<name>`: the launch directory's."""
    from soup.data.dataset import _launch_dir

    path = suite_path(value, flag)
    return _checked(str(path), _file_tasks(path, flag, folder=_launch_dir() if path.parent == CONF_SUITES else None))


def compose_suite(node) -> Suite:
    """soup.eval's `suite` group (a DictConfig): suite.file's tasks, with suite.tasks merged over them."""
    from omegaconf import OmegaConf

    from soup.data.dataset import _launch_dir

    document = OmegaConf.to_container(node, resolve=True)
    base = document.get("file")
    tasks = _file_tasks(suite_path(base, "suite.file"), "suite.file") if base else {}
    tasks = _merged(tasks, document.get("tasks") or {}, _launch_dir(), lambda name: f"suite.tasks.{name}")
    if not tasks:
        raise ConfigError("the suite has no task.\n  fix: suite=demo, suite=file suite.file=<suite.yaml>, or add "
                          "one: 'suite.tasks.heldout={kind: loss, file: val.jsonl}'.")
    origin = f"soup.eval's suite group ({document.get('name')}{f': {suite_path(base, None)}' if base else ''})"
    return _checked(origin, tasks)


def suite_path(value: str, flag: Optional[str]) -> Path:
    named = CONF_SUITES / f"{value}.yaml"
    if "/" not in value and not value.endswith((".yaml", ".yml")) and named.is_file():
        return named
    path = resolve_data_path(value, flag or "suite")
    if not path.is_file():
        raise ConfigError(f"{flag}={value}: no such file ({path}).\n  fix: point {flag} at a suite YAML file "
                          f"(layout: soup/evals/suite.py), or name one of conf/suite/: "
                          f"{', '.join(sorted(p.stem for p in CONF_SUITES.glob('*.yaml')))}.")
    return path


def _file_tasks(path: Path, flag: str, depth: int = 0, folder: Optional[Path] = None) -> dict[str, RawTask]:
    """A suite file's tasks as written (its base file's first), paths made absolute against `folder`
    (default: the file's own folder)."""
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}\n  fix: correct the file's syntax.") from None
    unknown = sorted(set(data) - set(DOCUMENT_KEYS)) if isinstance(data, dict) else None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if unknown is None or unknown or not isinstance(tasks, (dict, type(None))) or not (tasks or data.get("file")):
        found = type(data).__name__ if not isinstance(data, dict) else ", ".join(map(str, data)) or "nothing"
        raise ConfigError(f"{path}: a suite is a mapping with `tasks` naming at least one task (and optionally a "
                          f"base `file` and a `name`); found {found}.\n  fix: write `tasks:` then one mapping per "
                          "task, e.g. `heldout: {kind: loss, file: val.jsonl}`.")
    base = {}
    if data.get("file") is not None:
        if not isinstance(data["file"], str) or depth >= 8:
            raise ConfigError(f"{path}: `file` names a base suite file, and here it is {data['file']!r}"
                              f"{' after a chain of 8 base files (a loop?)' if depth >= 8 else ''}.\n  fix: a path "
                              "(relative to this file's folder), pkg://..., or a name in conf/suite/.")
        base = _file_tasks(suite_path(_absolute("file", data["file"], path.parent)
                                      if "/" in data["file"] or data["file"].endswith((".yaml", ".yml"))
                                      else data["file"], f"{path} file"), flag, depth + 1)
    lines = _task_lines(root)
    return _merged(base, tasks or {}, folder or path.parent,
                   lambda name: f"{path}:{lines.get(name, 0) + 1} tasks.{name}")


def _merged(base: dict[str, RawTask], tasks: dict, folder: Path, where_of) -> dict[str, RawTask]:
    """`base` with `tasks` merged over it field by field; their relative paths made absolute against `folder`."""
    merged = dict(base)
    for name, spec in tasks.items():
        name, where = str(name), where_of(str(name))
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: a task is a mapping of its fields, not {spec!r}.\n  fix: e.g. "
                              "{kind: loss, file: val.jsonl}.")
        spec = {key: _absolute(key, value, folder) if key in PATH_FIELDS else value for key, value in spec.items()}
        if name in merged:
            spec, where = {**merged[name].spec, **spec}, f"{where} (over {merged[name].where})"
        merged[name] = RawTask(spec, where)
    return merged


def _absolute(key: str, value: Any, folder: Path) -> Any:
    """A relative path made absolute against `folder`; pkg:// paths and URLs stay as written, and so does
    a judge like "org/model" that is no folder here (a hub id, which the judge check refuses)."""
    if not isinstance(value, str) or value.startswith(PKG_PREFIX) or "://" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if key == "judge" and not (folder / path).exists() and not value.startswith("."):
        return value
    return str(folder / path)


def _checked(origin: str, tasks: dict[str, RawTask]) -> Suite:
    suite = Suite(origin, "")
    for name, raw in tasks.items():
        suite.tasks.append(_check_task(name, raw.spec, raw.where))
    canonical = json.dumps({t.name: {"kind": t.kind, **t.options} for t in suite.tasks}, sort_keys=True, default=str)
    suite.sha256 = hashlib.sha256(canonical.encode()).hexdigest()
    return suite


def _task_lines(root) -> dict[str, int]:
    """task name -> its 0-based line in the file."""
    for key, value in getattr(root, "value", []):
        if key.value == "tasks" and isinstance(value, yaml.MappingNode):
            return {k.value: k.start_mark.line for k, _ in value.value}
    return {}


def _check_task(name: str, spec: Any, where: str) -> SuiteTask:
    fix_kinds = f"kind: {' | '.join(KINDS)}"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{where}: the task name {name!r} names files and metrics (<task>/<metric>), so it is "
                          "letters, digits, '_', '.' and '-' only.\n  fix: rename it, e.g. mmlu_stem.")
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
            options[key] = _resolved(options[key], f"{where}.{key}", directory=key == "include_path")
    task = SuiteTask(name, kind, options, where)
    _check_kind(task)
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


def _resolved(value: str, where: str, directory: bool = False) -> str:
    """The checked absolute path (pkg://... under soup/assets; others were made absolute by _merged)."""
    path = resolve_data_path(value, where) if value.startswith(PKG_PREFIX) else Path(value).expanduser()
    if not (path.is_dir() if directory else path.is_file()):
        raise ConfigError(f"{where}: no such {'folder' if directory else 'file'} {path}.\n  fix: give an existing "
                          "path (a relative one resolves against the suite file's folder, or against the launch "
                          "directory when set with suite.tasks... on the command line).")
    return str(path)


def _check_kind(task: SuiteTask) -> None:
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
        _check_judge(task)
    elif task.kind == "lm_eval":
        if not task.tasks or not all(isinstance(t, str) for t in task.tasks):
            raise ConfigError(f"{where}.tasks: a non-empty list of lm-evaluation-harness task names.\n"
                              "  fix: tasks: [my_local_task].")
        from soup.evals.harness import check_lm_eval

        check_lm_eval(where)


def _check_judge(task: SuiteTask) -> None:
    where = task.where
    judge = task.judge
    if "://" in judge or judge.startswith(("hf:", "hub:")):
        raise ConfigError(f"{where}.judge: {judge} is remote; a judge is a local model directory, so an "
                          "evaluation never sends your model's outputs anywhere.\n  fix: download the judge once "
                          "and give its folder.")
    folder = Path(judge).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{where}.judge: {folder} is not a local model directory (no config.json); hub ids are "
                          "not fetched.\n  fix: give the folder of a saved causal LM (a relative path resolves "
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
