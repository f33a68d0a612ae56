"""How `python -m soup.runs` prints runs: aligned tables, `show`'s sections, the loss-curve PNG.

The figures come from soup/runs.py's `summarize` (a dict per run); nothing here reads a run's files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from soup.runs import Run

MISSING = "-"
# A config key one run lacks (soup/runs.py's config_diff). It lives here, not in soup/runs.py:
# under `python -m soup.runs` that module is __main__, and an import of it would make a second ABSENT.
ABSENT = object()


# --------------------------------------------------------------------------- values


def format_loss(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_rate(summary: dict) -> str:
    rate, unit = summary["units_per_s"], summary["unit"]
    return MISSING if rate is None else f"{rate:,.0f} {unit}/s"


def format_git(summary: dict) -> str:
    commit = summary["git_commit"]
    if commit is None:
        return MISSING
    return commit[:10] + ("-dirty" if summary["git_dirty"] else "")


def format_bytes(size: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_value(value) -> str:
    """A config value as it would be typed in an override."""
    if value is ABSENT:
        return "(absent)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def format_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell, two spaces apart; the columns in `right` (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    return "\n".join([line(header), *(line(row) for row in rows)])


# --------------------------------------------------------------------------- list, show, compare


def format_list(summaries: list[dict]) -> str:
    header = ["RUN", "TASK", "MODEL", "STATUS", "STEPS", "TRAIN LOSS", "EVAL LOSS", "WALL", "THROUGHPUT", "GIT"]
    rows = [[s["run"], s["task"] or MISSING, s["model"] or MISSING, s["status"],
             MISSING if s["steps"] is None else str(s["steps"]), format_loss(s["final_train_loss"]),
             format_loss(s["final_eval_loss"]), format_duration(s["wall_time_s"]), format_rate(s), format_git(s)]
            for s in summaries]
    return format_table(header, rows, right={4, 5, 6, 7, 8})


def format_show(run: Run, summary: dict, last_lines: int) -> str:
    record = run.record or {}
    status = summary["status"] + (f" ({summary['stop_reason']})" if summary["stop_reason"] else "")
    out = [f"run:      {run.path}", f"status:   {status}",
           f"task:     {summary['task'] or MISSING}   model: {summary['model'] or MISSING}"]
    if record:
        out += [f"created:  {record.get('created_at', MISSING)} on {record.get('hostname', MISSING)}",
                f"git:      {format_git(summary)}   soup {record.get('soup_version', MISSING)}",
                f"command:  {' '.join(record.get('command') or []) or MISSING}"]
    if run.overrides is not None:
        out.append(f"overrides: {' '.join(run.overrides) or '(none)'}")

    out += ["", f"config, from {run.config_source}:"]
    if run.config:
        out += ["  " + line for line in yaml.safe_dump(run.config, sort_keys=False).splitlines()]

    out += ["", "stats, from run.json:" if record.get("stats") else
            "stats: none yet (run.json is written when the run ends)"]
    for key, value in _flat_items(record.get("stats") or {}):
        out.append(f"  {key}: {format_value(value)}")

    files = record.get("data_files") or []
    out += ["", f"data files (sha256, as run.json recorded them): {'' if files else 'none recorded'}".rstrip()]
    for file in files:
        out.append(f"  {file.get('sha256')}  {file.get('path')}  ({file.get('size_bytes', 0):,} bytes)")

    evaluation = run.path / "eval.json"
    if evaluation.is_file():  # python -m soup.eval's latest evaluation of this run
        suite = json.loads(evaluation.read_text(encoding="utf-8"))
        out += ["", f"eval.json (python -m soup.eval, suite {suite.get('suite', {}).get('origin')}, at step "
                    f"{suite.get('step')}, {suite.get('created_at', MISSING)}):"]
        out += [f"  {key}: {format_value(value)}" for key, value in suite.get("metrics", {}).items()]

    shown = run.metrics[-last_lines:] if last_lines > 0 else []
    out += ["", f"metrics.jsonl, last {len(shown)} of {len(run.metrics)} lines:"]
    out += ["  " + json.dumps(row) for row in shown]
    return "\n".join(out)


def _flat_items(stats: dict, prefix: str = ""):
    for key, value in stats.items():
        if isinstance(value, dict) and value:
            yield from _flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def format_compare(labels: list[str], summaries: list[dict], diff: list[tuple[str, list]]) -> str:
    def best(s: dict) -> str:
        return MISSING if s["best_eval_loss"] is None else f"{s['best_eval_loss']:.4f} (step {s['best_eval_step']})"

    rows = [
        ["status", *(s["status"] for s in summaries)],
        ["steps", *(MISSING if s["steps"] is None else str(s["steps"]) for s in summaries)],
        ["final train loss", *(format_loss(s["final_train_loss"]) for s in summaries)],
        ["final eval loss", *(format_loss(s["final_eval_loss"]) for s in summaries)],
        ["best eval loss", *(best(s) for s in summaries)],
        ["throughput", *(format_rate(s) for s in summaries)],
        ["wall time", *(format_duration(s["wall_time_s"]) for s in summaries)],
        ["peak memory", *(MISSING if not s["peak_memory_mb"] else f"{s['peak_memory_mb']:,.0f} MiB"
                          for s in summaries)],
        ["git", *(format_git(s) for s in summaries)],
    ]
    runs = format_table(["RUN", *labels], [["path", *(s["run"] for s in summaries)]])
    out = [runs, "", format_table(["METRIC", *labels], rows)]
    if diff:
        out += ["", f"config: {len(diff)} key{'s differ' if len(diff) != 1 else ' differs'}",
                format_table(["KEY", *labels], [[key, *(format_value(v) for v in values)] for key, values in diff])]
    else:
        out += ["", "config: identical"]
    return "\n".join(out)


def plot_loss_comparison(runs: list[Run], labels: list[str], png_path: Path) -> Path | None:
    """Every run's train loss (solid) and eval loss (dashed, dots) against step, one colour per run,
    into one PNG; None when no run logged a loss. Agg canvas, as soup/tracking.py's plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"train": {"linewidth": 1.0}, "eval": {"linestyle": "--", "marker": "o", "markersize": 3}}
    plotted = False
    for i, (run, label) in enumerate(zip(runs, labels)):
        for split, style in styles.items():
            # Non-finite losses are null in metrics.jsonl and are left out of the curve.
            points = [(row["step"], row["loss"]) for row in run.metrics
                      if row.get("split") == split and row.get("loss") is not None]
            if points:
                steps, losses = zip(*points)
                ax.plot(steps, losses, color=f"C{i % 10}", label=f"{label} ({split})", **style)
                plotted = True
    if not plotted:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("train (solid) and eval (dashed) loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, metadata={"Title": "soup.runs compare: " + ", ".join(labels)})
    return png_path
