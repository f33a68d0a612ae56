"""What may differ between a checkpoint's config and the config that resumes it.

A checkpoint records the resolved config that wrote it (trainer_state.json, "config").
On resume each key is compared with the new config:

- FREE keys say how to start, not what to compute (resume itself, the progress bar).
- CHANGEABLE keys may change mid-run on purpose: the run's length (the schedule then
  continues towards the new total), the eval/save/log cadence, optim.lr for a restart,
  memory features that leave the numbers as they were, and the trackers. They change
  only with allow_resume_changes=true, and run.json records each change.
- Every other key is fixed: the model, task, data, adapters, precision, batch shape,
  optimizer and schedule define the run, and a checkpoint cannot honour another value.
  Changing one is refused, naming the key, both values and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soup.config.scope import shown
from soup.errors import ConfigError

FREE = ("resume", "allow_resume_changes", "overwrite", "train.progress_bar")
CHANGEABLE = (
    "train.max_steps", "train.epochs",
    "train.eval_every_steps", "train.eval_at_start", "train.eval_batch_size",
    "train.save_every_steps", "train.keep_last_checkpoints", "train.log_every_steps",
    # a run that spiked is resumed with spike recovery turned on or tuned
    "train.spike_factor", "train.spike_window", "train.spike_max_recoveries", "train.spike_lr_factor",
    # a run the eval gate stopped is resumed with the gate loosened, retargeted or off
    "train.eval_gate", "train.eval_gate_every_steps", "train.eval_gate_every_epochs", "train.eval_gate_metrics",
    "train.eval_gate_threshold", "train.eval_gate_action", "train.eval_gate_baseline",
    "optim.lr",
    "checkpointing", "offload", "tracker",
)
# Keys whose change means the learning rate of each step must be recomputed on resume.
SCHEDULE_KEYS = ("train.max_steps", "train.epochs", "optim.lr")

_ABSENT = "<absent>"


@dataclass(frozen=True)
class Change:
    key: str
    before: Any
    after: Any

    def describe(self) -> str:
        return f"{self.key}: {shown(self.before)} (checkpoint) -> {shown(self.after)} (now)"

    def record(self) -> dict:
        return {"key": self.key, "from": self.before, "to": self.after}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a nested config dict; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _matches(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict, current: dict) -> list[Change]:
    """Every key whose value differs between the checkpoint's config and this one, FREE keys left out."""
    before, after = flatten(saved), flatten(current)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if _matches(key, FREE):
            continue
        old, new = before.get(key, _ABSENT), after.get(key, _ABSENT)
        if old != new:
            changes.append(Change(key, old, new))
    return changes


def check_resume_config(saved: dict, current: dict, allow_changes: bool, checkpoint: Path) -> list[Change]:
    """The changes this resume applies; raise ConfigError for any it may not apply."""
    changes = config_changes(saved, current)
    fixed = [c for c in changes if not _matches(c.key, CHANGEABLE)]
    changeable = [c for c in changes if _matches(c.key, CHANGEABLE)]
    if fixed:
        lines = [f"resume: the config differs from the one that wrote {checkpoint}, in keys a resumed run "
                 "cannot honour:", *(f"  - {c.describe()}" for c in fixed)]
        if changeable:
            lines += ["  (these may change with allow_resume_changes=true:",
                      *(f"    {c.describe()}" for c in changeable), "  )"]
        lines.append(f"  fix: resume with the checkpoint's values (its config is in {checkpoint / 'trainer_state.json'}), "
                     "or start a new run in a new hydra.run.dir without resume.")
        raise ConfigError("\n".join(lines))
    if changeable and not allow_changes:
        raise ConfigError("\n".join([
            f"resume: the config differs from the one that wrote {checkpoint}; these keys may change mid-run, "
            "but only when asked:", *(f"  - {c.describe()}" for c in changeable),
            "  fix: add allow_resume_changes=true to apply them (run.json records each change), or resume with "
            "the checkpoint's values."]))
    return changeable
