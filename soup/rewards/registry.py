"""Reward functions by name, a custom one from a .py file, and their weighted sum.

A reward takes the completions (text) and the row's other columns, one value per
completion, and returns one float per completion, or None where it does not apply:

    @register_reward("my_reward", columns=("answer",))
    def my_reward(completions: list[str], *, answer: list[str], **_) -> list[float | None]:
        \"\"\"One line: what it rewards. ...\"\"\"

`columns` are the row columns it needs: the data is checked for them before any
generation. A custom reward is a file the user names (`reward_fn(completions, **columns)`
in it); soup never imports a name it finds in data.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from soup.errors import ConfigError, SoupError

RewardFn = Callable[..., list]


@dataclass(frozen=True)
class RewardSpec:
    name: str
    fn: RewardFn
    columns: tuple[str, ...]
    doc: str


REWARDS: dict[str, RewardSpec] = {}


def register_reward(name: str, columns: tuple[str, ...] = ()):
    def decorate(fn: RewardFn) -> RewardFn:
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        REWARDS[name] = RewardSpec(name, fn, tuple(columns), doc)
        return fn

    return decorate


def get_reward(name: str) -> RewardSpec:
    """A registered reward, or one from a `.py` file path."""
    from soup.rewards import builtin  # noqa: F401  (registers the built-in rewards)

    if name.endswith(".py"):
        return RewardSpec(name, load_reward_file(name), (), f"custom reward from {name}")
    if name not in REWARDS:
        raise ConfigError(f"task.reward: no reward named {name!r}; registered: {', '.join(sorted(REWARDS))}, "
                          "or a path to a .py file defining reward_fn(completions, **columns).")
    return REWARDS[name]


def load_reward_file(path: str) -> RewardFn:
    """reward_fn from the Python file at `path` (the user's own code, named explicitly)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"task.reward={path}: no such file (resolved to {file.resolve()}).\n"
                          "  fix: name a .py file that defines reward_fn(completions, **columns) -> list[float].")
    spec = importlib.util.spec_from_file_location(f"soup_custom_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"task.reward={path}: importing it failed ({type(exc).__name__}: {exc}).\n"
                          "  fix: make the file import on its own (python that_file.py).") from exc
    fn = getattr(module, "reward_fn", None)
    if not callable(fn):
        raise ConfigError(f"task.reward={path}: the file defines no reward_fn.\n"
                          "  fix: define reward_fn(completions, **columns) -> list[float], one per completion.")
    return fn


@dataclass
class Scores:
    """total: the weighted sum per completion (a None counts as 0); per_reward: each
    reward's values (None where it did not apply), for its own mean and std."""

    total: list[float]
    per_reward: dict[str, list[float | None]] = field(default_factory=dict)


def score(rewards: list[tuple[RewardSpec, float]], completions: list[str], columns: dict[str, list[Any]]) -> Scores:
    """Every reward on every completion, checked, and their weighted sum."""
    total = [0.0] * len(completions)
    per_reward = {}
    for spec, weight in rewards:
        try:
            values = spec.fn(completions, **columns)
        except Exception as exc:
            raise SoupError(f"reward {spec.name!r} raised {type(exc).__name__}: {exc}\n"
                            "  fix: make the reward return a value (or None) for every completion.") from exc
        checked = _checked(spec.name, values, len(completions))
        per_reward[spec.name] = checked
        for i, value in enumerate(checked):
            total[i] += weight * (value or 0.0)
    return Scores(total, per_reward)


def _checked(name: str, values: Any, expected: int) -> list[float | None]:
    fix = f"  fix: reward {name!r} must return one float (or None) per completion."
    if not isinstance(values, (list, tuple)) or len(values) != expected:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise SoupError(f"reward {name!r} returned {got} for {expected} completions.\n{fix}")
    checked = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SoupError(f"reward {name!r} returned {value!r} ({type(value).__name__}) for completion {i}.\n{fix}")
        if not math.isfinite(value):
            raise SoupError(f"reward {name!r} returned {value} for completion {i}.\n{fix}")
        checked.append(float(value))
    return checked
