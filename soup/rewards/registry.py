"""Rewards by name: the task asks for `task.reward` names and never branches on them.

A reward scores completions (text) using the row's other columns, which arrive as keyword
lists with one value per completion, and returns one float per completion, or None where it
does not apply (the row has no answer, say):

    @register_reward("my_reward", columns=("answer",), params=("strict",))
    def my_reward(completions: list[str], *, answer: list[str | None], strict: bool = False) -> list[float | None]:
        \"\"\"One line: what it rewards. ...\"\"\"

- `columns`: the row columns it reads. The data is checked for them before any generation
  (`required_columns`), and a run can rename one with a `<column>_column` param: accuracy
  with `answer_column="solution"` reads the `solution` column as its `answer`.
- `params`: its settings, keyword-only with defaults. `get_reward(name, **params)` binds
  them and refuses any it does not declare, as the losses do. A registered reward receives
  only its declared columns and params, so a data column can never set a param.
- It may return `RewardOutput(values, counts)` instead of a list, to report counts for the
  log (the code reward counts timeouts and crashes); `score` collects them.

A custom reward is a Python file the user names (`task.reward=[path/to/my_reward.py]`)
that defines `reward_fn(completions, **columns)`; it receives every column. soup imports
only files named in the config, never a name it finds in data.

A reward model is a directory the user names (`task.reward=[runs/rm/final]`): a saved
sequence-classification model with one label, whose score of prompt + completion is the
reward (soup/rewards/reward_model.py). It reads the `prompt` column; it takes batch_size.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from soup.errors import ConfigError, SoupError

RewardFn = Callable[..., Any]


@dataclass(frozen=True)
class RewardOutput:
    """What a reward may return instead of a plain list.

    values: one float (or None: not applicable) per completion.
    counts: events to log for this call, e.g. {"timeout": 1, "crashed": 0}; `score` names
      them "<reward>/<key>".
    """

    values: list[float | None]
    counts: dict[str, int] = field(default_factory=dict)


class RewardError(SoupError):
    """A reward failed or returned something unusable.

    reward: its name. index: the completion it is about, or None when the whole call failed;
    the caller knows which data row produced that completion and can prefix file:line.
    """

    def __init__(self, message: str, *, reward: str, index: int | None = None):
        super().__init__(message)
        self.reward, self.index = reward, index


@dataclass(frozen=True)
class RewardSpec:
    """One registered reward.

    name: the registry key (an entry of `task.reward`).
    fn: `fn(completions, *, <columns>, <params>) -> list[float | None] | RewardOutput`.
    columns: the row columns it reads, under the keyword names fn takes.
    doc: the first line of fn's docstring, for listings.
    params: its keyword-only settings; each has a default in fn's signature.
    check: `check(**params)` raises ConfigError for a bad setting; run when a reward is bound.
    """

    name: str
    fn: RewardFn
    columns: tuple[str, ...]
    doc: str
    params: tuple[str, ...] = ()
    check: Callable[..., None] | None = None

    def defaults(self) -> dict[str, Any]:
        """Each declared param's default, e.g. {"timeout_s": 5.0}."""
        signature = inspect.signature(self.fn)
        return {name: signature.parameters[name].default for name in self.params}

    def column_names(self, **params: Any) -> dict[str, str]:
        """{keyword fn takes: data column it reads}, after any `<column>_column` rename."""
        return {column: params.get(f"{column}_column", column) for column in self.columns}


@dataclass(frozen=True)
class Reward:
    """A reward ready to score: `reward(completions, **columns)` -> values (or RewardOutput).

    columns: the data columns it needs (empty for a custom file, which gets them all).
    fn: the same call, `fn(completions, **columns)`: it takes every column of the rows and
      passes on only those the reward reads, with its params bound.
    """

    name: str
    columns: tuple[str, ...]
    fn: RewardFn = field(repr=False)
    doc: str = ""

    def __call__(self, completions: list[str], **columns: list[Any]) -> Any:
        return self.fn(completions, **columns)


REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, *, columns: tuple[str, ...] = (), params: tuple[str, ...] = (),
                    check: Callable[..., None] | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: add `fn` to REWARDS under `name`; returns fn unchanged.

    Checked at import, so a broken registration fails every test run: the name is new, fn
    has a docstring, and every column and param is a keyword-only parameter of fn (params
    with a default). `check(**params)`, if given, runs when a run binds the reward, to refuse
    a bad setting (an invalid regex, say) before any generation.
    """

    def decorate(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward '{name}' is already registered (by {REWARDS[name].fn.__module__}."
                             f"{REWARDS[name].fn.__qualname__}); pick another name")
        doc = inspect.getdoc(fn)
        if not doc:
            raise ValueError(f"reward '{name}' ({fn.__qualname__}) needs a docstring: what it rewards, and how")
        keyword_only = {p.name: p for p in inspect.signature(fn).parameters.values()
                        if p.kind is inspect.Parameter.KEYWORD_ONLY}
        missing = [c for c in (*columns, *params) if c not in keyword_only]
        no_default = [p for p in params if p in keyword_only and keyword_only[p].default is inspect.Parameter.empty]
        if missing or no_default:
            raise ValueError(f"reward '{name}': {missing or no_default} must be keyword-only parameters of "
                             f"{fn.__qualname__}" + (" with defaults" if no_default else ""))
        REWARDS[name] = RewardSpec(name=name, fn=fn, columns=tuple(columns), doc=doc.splitlines()[0],
                                   params=tuple(params), check=check)
        return fn

    return decorate


def get_reward(name: str, **params: Any) -> Reward:
    """The reward `name` with `params` bound: a registered name, a path ending in .py, or the
    directory of a reward model (looked for in that order).

    ConfigError for an unknown name, a path that does not exist, a param the reward does not
    take, or a bad setting.
    """
    if name.endswith(".py"):
        if params:
            raise ConfigError(f"task.reward={name}: a custom reward file takes no params (got {', '.join(params)}).\n"
                              "  fix: read settings inside reward_fn, or drop the params.")
        return Reward(name=name, columns=(), fn=load_reward_file(name), doc=f"custom reward from {name}")
    if name not in REWARDS and _is_reward_model(name):
        from soup.rewards.reward_model import PARAMS, reward_model_reward  # imports torch + transformers

        unknown = sorted(set(params) - set(PARAMS))
        if unknown:
            raise ConfigError(f"task.reward={name}: a reward model does not take parameter(s) {', '.join(unknown)}; "
                              f"it accepts: {', '.join(PARAMS)}.\n  fix: remove the setting(s).")
        return reward_model_reward(name, **params)
    spec = get_spec(name)
    renames = {f"{column}_column" for column in spec.columns}
    unknown = sorted(set(params) - set(spec.params) - renames)
    if unknown:
        accepted = ", ".join((*spec.params, *sorted(renames))) or "(none)"
        raise ConfigError(f"reward '{name}' does not take parameter(s) {', '.join(unknown)}; it accepts: {accepted}."
                          "\n  fix: remove the setting(s) or pick a reward that uses them.")
    settings = {key: value for key, value in params.items() if key in spec.params}
    if spec.check is not None:
        spec.check(**settings)
    names = spec.column_names(**params)

    def call(completions: list[str], **columns: list[Any]) -> Any:
        for keyword, column in names.items():
            if column not in columns:
                raise SoupError(f"reward '{name}' needs the column '{column}', which these rows do not have.\n"
                                f"  fix: add '{column}' to every row, or set {name}'s {keyword}_column to the "
                                "column that holds it.")
        return spec.fn(completions, **{keyword: columns[column] for keyword, column in names.items()}, **settings)

    return Reward(name=name, columns=tuple(names.values()), fn=call, doc=spec.doc)


def get_spec(name: str) -> RewardSpec:
    """The spec registered under `name`; ConfigError listing the valid names otherwise."""
    try:
        return REWARDS[name]
    except KeyError:
        pass
    if any(mark in name for mark in ("/", "\\")) or name.startswith(("~", ".")):
        path = Path(name).expanduser().resolve()
        problem = "a file, not a reward model directory" if path.exists() else "no such directory"
        raise ConfigError(f"task.reward={name}: {problem} (looked for {path}).\n"
                          "  fix: give the directory of a saved reward model (config.json, weights, tokenizer), "
                          f"the path of a .py file that defines reward_fn, or one of: {', '.join(reward_names())}.")
    raise ConfigError(f"no reward named '{name}'.\n  fix: use one of: {', '.join(reward_names())}, "
                      "the path of a .py file that defines reward_fn(completions, **columns), "
                      "or the directory of a saved reward model.")


def reward_names() -> list[str]:
    """Sorted registry keys."""
    return sorted(REWARDS)


def required_columns(name: str, **params: Any) -> tuple[str, ...]:
    """The row columns reward `name` (with these params) reads, for the data check before any
    generation; () for a custom .py reward, which gets whatever the rows have; ("prompt",) for
    a reward model directory."""
    if name.endswith(".py"):
        return ()
    if name not in REWARDS and _is_reward_model(name):
        return ("prompt",)
    spec = get_spec(name)
    return tuple(spec.column_names(**params).values())


def _is_reward_model(name: str) -> bool:
    """A `task.reward` entry that names an existing directory: a reward model's."""
    return Path(name).expanduser().is_dir()


def load_reward_file(path: str | Path) -> RewardFn:
    """`reward_fn` from the Python file at `path`: the user's own code, named in their config.

    The file runs once, as a module of its own (not importable by name elsewhere).
    ConfigError when the file is missing, fails to import, or defines no callable reward_fn.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"task.reward={path}: no such file (looked for {file.resolve()}).\n"
                          "  fix: give the path of a .py file that defines reward_fn(completions, **columns).")
    # A name unique to the file's path: two reward files may share a stem.
    module_name = f"soup_reward_{file.stem}_{hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"task.reward={path}: importing it raised {type(exc).__name__}: {exc}\n"
                          f"  fix: make the file import on its own (python {path}).") from exc
    reward_fn = getattr(module, "reward_fn", None)
    if not callable(reward_fn):
        raise ConfigError(f"task.reward={path}: the file defines no reward_fn.\n"
                          "  fix: define reward_fn(completions, **columns) -> list[float], one value per completion.")
    return reward_fn


# The built-in rewards register themselves when their module is imported; importing it here
# (after register_reward exists, so the cycle resolves) makes REWARDS complete whichever
# module a caller imports first. `score` lives in combine.py; it is importable from here too.
importlib.import_module("soup.rewards.builtin")
from soup.rewards.combine import score  # noqa: E402

__all__ = ["REWARDS", "Reward", "RewardError", "RewardFn", "RewardOutput", "RewardSpec", "get_reward", "get_spec",
           "load_reward_file", "register_reward", "required_columns", "reward_names", "score"]
