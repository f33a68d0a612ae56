"""A run directory before training starts: empty, holding an unfinished run, or finished.

A fresh run (resume=null) never writes over another run's outputs: it refuses a run
dir that holds them unless overwrite=true, which deletes them first. resume=auto on a
finished run is a no-op that says so; a finished run is one whose run.json says
"finished" and whose final/ model is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from soup.errors import ConfigError

# What soup writes into a run dir. Hydra's own .hydra/ and train.log are not a run's outputs:
# Hydra creates them before soup starts, so they are there for every run, fresh or not.
RUN_OUTPUTS = ("checkpoints", "final", "initial_adapter", "metrics.jsonl", "run.json", "loss.png",
               "tensorboard", "wandb", "wandb_run_id", "offload")


def existing_outputs(run_dir: Path) -> list[str]:
    """The RUN_OUTPUTS present in `run_dir` (an empty metrics.jsonl does not count)."""
    found = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if not path.exists():
            continue
        if path.is_file() and path.stat().st_size == 0:
            continue
        if path.is_dir() and not any(path.iterdir()):
            continue
        found.append(name)
    return found


def finished_record(run_dir: Path) -> dict | None:
    """run.json of a finished run in `run_dir`, or None when the run did not finish."""
    record_path = run_dir / "run.json"
    if not record_path.is_file() or not (run_dir / "final").is_dir():
        return None
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("stats", {}).get("status") == "finished" else None


def prepare_fresh_run_dir(run_dir: Path, overwrite: bool) -> list[str]:
    """Make `run_dir` ready for a fresh run; return the outputs deleted (overwrite=true).

    Raises ConfigError when it holds another run's outputs and overwrite is false."""
    outputs = existing_outputs(run_dir)
    if not outputs:
        return []
    if not overwrite:
        state = "a finished run" if finished_record(run_dir) else "an unfinished run"
        raise ConfigError(
            f"{run_dir} already holds {state} ({', '.join(outputs)}); a fresh run would overwrite its "
            "checkpoints and append to its metrics.\n"
            "  fix: resume it (the same overrides plus resume=auto), pass overwrite=true to delete its outputs "
            "and start again, or choose another hydra.run.dir."
        )
    for name in outputs:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    # train.log restarts too, so it tells only this run; Hydra appends to it from here on.
    log = run_dir / "train.log"
    if log.exists():
        log.write_text("")
    return outputs


def objective_of(record: dict) -> float | None:
    """The value a finished run returned to the sweeper: the final eval loss, else the final train loss."""
    stats = record.get("stats", {})
    value = stats.get("final_eval_loss")
    return value if value is not None else stats.get("final_train_loss")
