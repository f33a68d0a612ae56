"""Several rewards on the same completions: each checked, then their weighted sum.

    total[i] = sum_k weight_k * r_k[i],   with r_k[i] = 0 where reward k returned None

None ("does not apply to this completion") adds nothing to the total, as in TRL's GRPO
(nansum over reward functions), and is left out of that reward's own mean and std. A
reward's output is checked before it is used: a wrong length, NaN or inf, a non-number or
an exception ends the run with a RewardError naming the reward, the completion and the fix.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from soup.errors import SoupError
from soup.rewards.registry import RewardError, RewardOutput

_FIX = "  fix: reward '{name}' must return one finite float (or None: not applicable) per completion, in order."


@dataclass(frozen=True)
class Scores:
    """What `score` returns.

    total: [n_completions], the weighted sum (None counted as 0).
    per_reward: {name: [n_completions]}, each reward's values, None where it did not apply.
    counts: {"<reward>/<event>": n}, from rewards that return RewardOutput (the code
      reward's {"code/timeout": 1, ...}).
    """

    total: list[float]
    per_reward: dict[str, list[float | None]]
    counts: dict[str, int]

    def metrics(self) -> dict[str, float]:
        """Log keys as TRL names them: reward, reward_std, rewards/<name>/mean and /std (over
        the completions it applied to; population std), plus the counts as rewards/<key>."""
        out = {"reward": _mean(self.total), "reward_std": _std(self.total)}
        for name, values in self.per_reward.items():
            applied = [v for v in values if v is not None]
            out[f"rewards/{name}/mean"] = _mean(applied)
            out[f"rewards/{name}/std"] = _std(applied)
        out.update({f"rewards/{key}": float(n) for key, n in self.counts.items()})
        return out


def score(rewards: Sequence[tuple], completions: list[str], columns: Mapping[str, Sequence[Any]]) -> Scores:
    """Run every reward on the completions and sum them, weighted.

    rewards: (name, fn, weight) triples, fn(completions, **columns) -> values, e.g.
      (r.name, r, w) for a Reward r from get_reward; or (reward, weight) pairs of anything
      with .name and .fn, such as a Reward. Weights come from task.reward_weights.
    columns: {column: [n_completions]}, the row's other columns, repeated for each
      completion of the row.
    """
    rewards = [entry if len(entry) == 3 else (entry[0].name, entry[0].fn, entry[1]) for entry in rewards]
    n = len(completions)
    for column, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column '{column}' has {len(values)} values for {n} completions")
    names = [name for name, _, _ in rewards]
    if len(set(names)) != len(names):
        raise SoupError(f"rewards listed more than once: {names}.\n"
                        "  fix: list each reward once in task.reward; give it the summed weight.")
    total = [0.0] * n
    per_reward: dict[str, list[float | None]] = {}
    counts: dict[str, int] = {}
    for name, fn, weight in rewards:
        try:
            # Copies: a reward that edits its inputs cannot change what the next one sees.
            output = fn(list(completions), **{column: list(values) for column, values in columns.items()})
        except SoupError:
            raise  # already says what is wrong and the fix
        except Exception as exc:
            raise RewardError(f"reward '{name}' raised {type(exc).__name__}: {exc}\n"
                              f"  fix: make reward '{name}' return a value (or None) for every completion "
                              "instead of raising.", reward=name) from exc
        if isinstance(output, RewardOutput):
            counts.update({f"{name}/{key}": int(value) for key, value in output.counts.items()})
            output = output.values
        values = _checked(name, output, completions)
        per_reward[name] = values
        for i, value in enumerate(values):
            if value is not None:
                total[i] += weight * value
    return Scores(total=total, per_reward=per_reward, counts=counts)


def _checked(name: str, values: Any, completions: list[str]) -> list[float | None]:
    fix = _FIX.format(name=name)
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward '{name}' returned a {type(values).__name__}, not a list.\n{fix}", reward=name)
    if len(values) != len(completions):
        raise RewardError(f"reward '{name}' returned {len(values)} values for {len(completions)} completions.\n{fix}",
                          reward=name)
    checked: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        number = _as_float(value)
        if number is None or not math.isfinite(number):
            shown = f"{value!r}" + ("" if isinstance(value, float) else f" ({type(value).__name__})")
            raise RewardError(f"reward '{name}' returned {shown} for completion {i} "
                              f"({_snippet(completions[i])}).\n{fix}", reward=name, index=i)
        checked.append(number)
    return checked


def _as_float(value: Any) -> float | None:
    """A real number (int, float, numpy scalar, Fraction) as a float; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _snippet(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _std(values: Sequence[float]) -> float:
    if not values:
        return float("nan")
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
