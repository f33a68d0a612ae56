"""List, inspect, compare and tidy run directories, reading only their own files.

    python -m soup.runs list [--root outputs] [--json]
    python -m soup.runs show RUN [--lines 5]
    python -m soup.runs compare RUN RUN [RUN ...] [--out compare.png]
    python -m soup.runs clean [--root outputs] [--apply]

A run directory holds run.json (written when a run ends, finished or stopped by a
signal) or .hydra/config.yaml (written by Hydra before soup starts; a run started in
process, as the tests do, has none); a sweep's directory holds one run directory per
job. Everything shown is read from those files and metrics.jsonl (one line per logged
step, flushed as it goes) each time: there is no index that could disagree with the
runs. Nothing here imports torch, so a listing starts at once.

Status of a run: `finished` or `interrupted` (run.json says so); `running-or-crashed`
(steps logged but no run.json, or more steps than run.json, which a resume since
explains); `not-started` (no step logged: still setting up, or stopped before
training; its train.log says which).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from soup.errors import SoupError
from soup.runs_report import (ABSENT, format_bytes, format_compare, format_list, format_show,
                              plot_loss_comparison)

USER_ERROR = 2
RUNNING = "running-or-crashed"
NOT_STARTED = "not-started"
# soup/checkpoint.py names checkpoints checkpoints/step-N (its _STEP_DIR); that module imports torch.
_STEP_DIR = re.compile(r"^step-(\d+)$")
# The throughput stat and metric each task names after its unit: trained_tokens_per_s, trained_pairs_per_s, ...
_RATE_KEY = re.compile(r"^trained_(\w+)_per_s$")


# --------------------------------------------------------------------------- reading a run dir


@dataclass
class Run:
    """One run directory as its files describe it."""

    path: Path
    record: dict | None            # run.json; None until the run ends
    config: dict                   # the resolved config; {} when the run dir holds none
    config_source: str             # where `config` came from, for `show`
    overrides: list[str] | None    # .hydra/overrides.yaml (only the CLI writes it)
    metrics: list[dict]            # metrics.jsonl rows, oldest first


def is_run_dir(path: Path) -> bool:
    return (path / "run.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def _walk_run_dirs(root: Path) -> list[Path]:
    """Run dirs at or under `root`, sorted; a run dir's own subfolders are not searched."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if is_run_dir(here):
            found.append(here)
            dirnames[:] = []
        else:  # .submitit/ and the like hold logs, not runs
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def find_runs(root: Path) -> list[Path]:
    """Every run dir under `root`; a SoupError when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise SoupError(f"--root {root}: no such directory.\n"
                        "  fix: pass --root <the folder holding your runs> (python -m soup.train writes them "
                        "under outputs/ in the directory it ran from, or where hydra.run.dir points).")
    found = _walk_run_dirs(root)
    if not found:
        raise SoupError(f"{root} holds no run directory (none of its folders has run.json or .hydra/config.yaml).\n"
                        "  fix: pass --root <the folder holding your runs> (python -m soup.train writes them "
                        "under outputs/ in the directory it ran from, or where hydra.run.dir points).")
    return found


def load_run(path: Path) -> Run:
    """The run in `path`; a SoupError naming the fix when `path` is not a run dir."""
    path = Path(path)
    if not path.exists():
        raise SoupError(f"{path}: no such directory.\n"
                        "  fix: pass a run directory; python -m soup.runs list shows those under outputs/.")
    if not path.is_dir() or not is_run_dir(path):
        raise SoupError(_not_a_run_dir(path))
    record = _read_json(path / "run.json") if (path / "run.json").is_file() else None
    hydra_config = path / ".hydra" / "config.yaml"
    if record is not None and isinstance(record.get("config"), dict):
        config, source = record["config"], "run.json (resolved)"
    elif hydra_config.is_file():
        config, source = _read_yaml(hydra_config), ".hydra/config.yaml (as Hydra wrote it, unresolved)"
    else:
        config, source = {}, "none recorded"
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = _read_yaml(overrides_file) if overrides_file.is_file() else None
    metrics_file = path / "metrics.jsonl"
    metrics = read_metrics(metrics_file) if metrics_file.is_file() else []
    return Run(path, record, config or {}, source, overrides, metrics)


def _not_a_run_dir(path: Path) -> str:
    """The error for a folder that is not a run dir, with the fix that fits where it is."""
    problem = (f"{path} is a file, not a run directory." if path.is_file() else
               f"{path} is not a run directory (it holds neither run.json nor .hydra/config.yaml).")
    owner = next((parent for parent in path.parents if is_run_dir(parent)), None)
    if owner is not None:
        return f"{problem}\n  fix: pass the run directory it is inside: {owner}"
    inside = _walk_run_dirs(path)
    if inside:
        more = ", ..." if len(inside) > 1 else ""
        return (f"{problem}\n  fix: it holds {len(inside)} run directories ({inside[0]}{more}): pass one of them; "
                f"python -m soup.runs list --root {path} lists them.")
    return f"{problem}\n  fix: pass a run directory; python -m soup.runs list shows those under outputs/."


def read_metrics(metrics_path: Path) -> list[dict]:
    """soup/tracking.py's read_metrics without importing torch: the rows, oldest first; a torn
    last line (a killed run) is dropped, a bad line elsewhere is a SoupError naming it."""
    lines = Path(metrics_path).read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise SoupError(f"{metrics_path}:{number}: not a JSON line ({exc.msg}); the file is corrupt.\n"
                            "  fix: delete or repair that line (the run writes one JSON object per line).") from exc
    return rows


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SoupError(f"{path} is unreadable or not JSON ({exc}).\n"
                        "  fix: restore it from a copy, or delete it (the run then lists as running-or-crashed)."
                        ) from exc
    if not isinstance(value, dict):
        raise SoupError(f"{path} holds a JSON {type(value).__name__}, not the object soup writes.\n"
                        "  fix: restore it from a copy, or delete it.")
    return value


def _read_yaml(path: Path):
    from omegaconf import OmegaConf

    # resolve=False: a run's config has no interpolations of its own; Hydra's ${now:...} needs Hydra running.
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


# --------------------------------------------------------------------------- what a run did


def run_status(run: Run) -> str:
    logged = max((row["step"] for row in run.metrics), default=None)
    if run.record is None:
        return RUNNING if logged is not None else NOT_STARTED
    stats = run.record.get("stats", {})
    if logged is not None and stats.get("steps") is not None and logged > stats["steps"]:
        return RUNNING  # resumed after run.json was written; run.json is rewritten when it ends
    return stats.get("status", "unknown")


def summarize(run: Run) -> dict:
    """The run's figures: from run.json's stats when it holds the run's end, else from metrics.jsonl
    (the last logged step's loss and throughput)."""
    status = run_status(run)
    stats = run.record.get("stats", {}) if run.record is not None and status != RUNNING else {}
    train = [row for row in run.metrics if row.get("split") == "train"]
    evals = [row for row in run.metrics if row.get("split") == "eval" and row.get("loss") is not None]
    unit, rate = _throughput(stats, train)
    best = min(evals, key=lambda row: row["loss"], default=None)
    git = (run.record or {}).get("git") or {}
    return {
        "run": str(run.path),
        "task": dotted(run.config, "task.name"),
        "model": model_label(run.config),
        "status": status,
        "stop_reason": stats.get("stop_reason"),
        "steps": stats.get("steps", max((row["step"] for row in run.metrics), default=None)),
        "final_train_loss": stats.get("final_train_loss", train[-1].get("loss") if train else None),
        "final_eval_loss": stats.get("final_eval_loss", evals[-1]["loss"] if evals else None),
        "best_eval_loss": best["loss"] if best else None,
        "best_eval_step": best["step"] if best else None,
        "wall_time_s": stats.get("wall_time_s"),
        "unit": unit,
        "units_per_s": rate,
        "peak_memory_mb": stats.get("peak_memory_mb", max((row["peak_memory_mb"] for row in train
                                                           if row.get("peak_memory_mb") is not None), default=None)),
        "git_commit": git.get("commit"),
        "git_dirty": git.get("dirty"),
    }


def model_label(config: dict) -> str | None:
    """model.path for a hub or local model, else the model option's name (tiny)."""
    model = config.get("model") or {}
    return model.get("path") if model.get("name") == "hf" else model.get("name")


def _throughput(stats: dict, train_rows: list[dict]) -> tuple[str | None, float | None]:
    """(unit, units per second): run.json's average over the run, else the last logged step's rate."""
    for source in (stats, train_rows[-1] if train_rows else {}):
        for key, value in source.items():
            match = _RATE_KEY.match(key)
            if match:
                return match.group(1), value
    return None, None


def dotted(config: dict, key: str, default=None):
    """config["a"]["b"] for key "a.b", or `default` where the path is absent (an older run's config)."""
    value = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


# --------------------------------------------------------------------------- compare


def flatten(config: dict, prefix: str = "") -> dict:
    """{"optim.lr": 3e-4, ...}: nested keys as dotted paths; a list is one value."""
    flat = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def config_diff(configs: list[dict]) -> list[tuple[str, list]]:
    """[(dotted key, [value in each config])] for the keys whose values differ, in config order;
    a key missing from a config has the value ABSENT."""
    flats = [flatten(config) for config in configs]
    keys = list(dict.fromkeys(key for flat in flats for key in flat))

    def comparable(value):
        return "<absent>" if value is ABSENT else json.dumps(value, sort_keys=True)

    diff = []
    for key in keys:
        values = [flat.get(key, ABSENT) for flat in flats]
        if len({comparable(v) for v in values}) > 1:
            diff.append((key, values))
    return diff


def run_labels(paths: list[Path]) -> list[str]:
    """Short names for runs side by side: each path below the folder they share."""
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath(resolved))
    labels = [p.relative_to(common).as_posix() for p in resolved]
    if len(set(labels)) < len(labels) or "." in labels:  # the same run twice, or one inside another
        return [str(p) for p in paths]
    return labels


# --------------------------------------------------------------------------- clean


@dataclass
class CleanPlan:
    """What `clean` keeps (with why) and deletes (with its size) in one run's checkpoints/."""

    run: Path
    keep: list[tuple[Path, str]]
    delete: list[tuple[Path, int]]


def plan_clean(run: Run) -> CleanPlan:
    """Keep the newest checkpoint (resume=auto continues from it) and the one with the best eval
    loss (the metrics.jsonl eval line at its step); delete the other checkpoints/step-N.

    final/ is never touched, nor a .tmp-* folder (a save in progress writes there)."""
    checkpoints_dir = run.path / "checkpoints"
    found = []
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir() and not path.is_symlink():
                found.append((int(match.group(1)), path))
    found.sort()
    reasons: dict[int, list[str]] = {}
    if found:
        reasons[found[-1][0]] = ["newest: resume=auto continues from it"]
    # The last eval line of a step wins: a resumed run truncates metrics.jsonl back to its checkpoint.
    eval_loss = {row["step"]: row["loss"] for row in run.metrics
                 if row.get("split") == "eval" and row.get("loss") is not None}
    scored = [(eval_loss[step], step) for step, _ in found if step in eval_loss]
    if scored:
        loss, step = min(scored)
        reasons.setdefault(step, []).insert(0, f"best eval loss {loss:.4f}")
    keep = [(path, ", ".join(reasons[step])) for step, path in found if step in reasons]
    delete = [(path, tree_bytes(path)) for step, path in found if step not in reasons]
    return CleanPlan(run.path, keep, delete)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (symlinks not followed)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


# --------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> None:
    summaries = [summarize(load_run(path)) for path in find_runs(args.root)]
    print(json.dumps(summaries, indent=2) if args.json else format_list(summaries))


def cmd_show(args: argparse.Namespace) -> None:
    run = load_run(args.run)
    print(format_show(run, summarize(run), args.lines))


def cmd_compare(args: argparse.Namespace) -> None:
    runs = [load_run(path) for path in args.runs]
    labels = run_labels([run.path for run in runs])
    print(format_compare(labels, [summarize(run) for run in runs], config_diff([run.config for run in runs])))
    written = plot_loss_comparison(runs, labels, args.out)
    print(f"[soup] loss curves -> {written}" if written else "[soup] no loss logged in these runs: no plot written")


def cmd_clean(args: argparse.Namespace) -> None:
    plans = [plan for plan in (plan_clean(load_run(path)) for path in find_runs(args.root)) if plan.delete]
    if not plans:
        print(f"[soup] nothing to delete under {args.root}: every run keeps all its checkpoints "
              "(only the newest and the best-eval one are there)")
        return
    verb = "delete" if args.apply else "would delete"
    for plan in plans:
        print(plan.run)
        for path, why in plan.keep:
            print(f"  keep          {path.relative_to(plan.run)}  ({why})")
        for path, size in plan.delete:
            print(f"  {verb:<12}  {path.relative_to(plan.run)}  ({format_bytes(size)})")
            if args.apply:
                shutil.rmtree(path)
    count = sum(len(plan.delete) for plan in plans)
    size = sum(size for plan in plans for _, size in plan.delete)
    done = "deleted" if args.apply else "would delete"
    print(f"[soup] {done} {count} checkpoint{'s' if count != 1 else ''} in {len(plans)} "
          f"run{'s' if len(plans) != 1 else ''}: {format_bytes(size)} ({size:,} bytes); final/ and the kept "
          "checkpoints stay" + ("" if args.apply else ". Add --apply to delete them."))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m soup.runs", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,show,compare,clean}")

    listing = commands.add_parser("list", help="one line per run dir under --root")
    listing.add_argument("--root", type=Path, default=Path("outputs"), help="folder searched for runs (outputs)")
    listing.add_argument("--json", action="store_true", help="a JSON list of the same fields, for scripts")
    listing.set_defaults(handler=cmd_list)

    show = commands.add_parser("show", help="a run's config, stats, data file hashes and last metrics")
    show.add_argument("run", type=Path, help="a run directory")
    show.add_argument("--lines", type=int, default=5, help="how many metrics.jsonl lines to print (5)")
    show.set_defaults(handler=cmd_show)

    compare = commands.add_parser("compare", help="config diff, figures side by side, loss curves in one PNG")
    compare.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="two run directories or more")
    compare.add_argument("--out", type=Path, default=Path("compare.png"), help="the PNG (compare.png)")
    compare.set_defaults(handler=cmd_compare)

    clean = commands.add_parser("clean", help="delete checkpoints but the newest and the best-eval one")
    clean.add_argument("--root", type=Path, default=Path("outputs"), help="folder searched for runs (outputs)")
    clean.add_argument("--apply", action="store_true", help="delete (default: only print what would go)")
    clean.set_defaults(handler=cmd_clean)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare" and len(args.runs) < 2:
        parser.error("compare needs two run directories or more")
    try:
        args.handler(args)
    except SoupError as exc:
        print(f"[soup] error: {exc}", file=sys.stderr)
        return USER_ERROR
    except BrokenPipeError:
        # `list | head` stopped reading. Python's documented fix: point stdout at devnull so the
        # flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
