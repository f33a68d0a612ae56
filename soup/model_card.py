"""A model card (README.md) for a model a soup run trained, rendered from the run's own records.

Everything on the card is read from the run directory: run.json (the resolved config, the
stats, the sha256 of every data file, the versions) and metrics.jsonl (the last eval line).
Nothing is typed in by hand, so the card says what ran, not what was meant to run.

    from soup.model_card import write_card
    write_card(run_dir, out_dir, exported="model.gguf (q8_0)")

The card's first line names the run directory, so a tool handed a model folder that carries a
soup card (a merged model) finds the run it came from (find_run_dir).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from soup.errors import SoupError
from soup.runs import dotted
from soup.tracking import read_metrics

CARD_NAME = "README.md"
_MARKER = "<!-- soup model card; run dir: {run_dir} -->"
_MARKER_PATTERN = re.compile(r"<!-- soup model card; run dir: (.*?) -->")


def find_run_dir(model_dir: Path) -> Path | None:
    """The soup run `model_dir` came from, or None.

    It is the run dir itself, a run's final/ (its parent holds run.json), or a folder whose
    README.md is a soup card (it names its run, as a merged model's does)."""
    model_dir = Path(model_dir)
    for candidate in (model_dir, model_dir.parent):
        if (candidate / "run.json").is_file():
            return candidate
    named = card_run_dir(model_dir / CARD_NAME)
    return named if named is not None and (named / "run.json").is_file() else None


def card_run_dir(card_path: Path) -> Path | None:
    """The run dir a soup card names in its first line; None for a file that is not a soup card."""
    if not card_path.is_file():
        return None
    first_line = card_path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    match = _MARKER_PATTERN.fullmatch(first_line.strip())
    return Path(match.group(1)) if match else None


def checked_card_path(out_dir: Path) -> Path:
    """out_dir/README.md, where a card may be written: absent, or a card soup wrote before.

    A README.md that soup did not write (a base model's own card) is never replaced."""
    path = Path(out_dir) / CARD_NAME
    if path.exists() and card_run_dir(path) is None:
        raise SoupError(f"{path} exists and is not a soup model card; it is not overwritten.\n"
                        "  fix: write the export to another folder, or pass --no-card.")
    return path


def write_card(run_dir: Path, out_dir: Path, exported: str | None = None) -> Path:
    """Write out_dir/README.md for the model `run_dir` trained; `exported` names the file it describes."""
    path = checked_card_path(out_dir)
    text = render_card(run_dir, exported)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_card_if_from_run(model_dir: Path, out_dir: Path, exported: str | None = None) -> Path | None:
    """write_card for the run `model_dir` came from (find_run_dir); nothing when it is not a run's."""
    run_dir = find_run_dir(model_dir)
    return write_card(run_dir, out_dir, exported) if run_dir is not None else None


def render_card(run_dir: Path, exported: str | None = None) -> str:
    """The card's markdown: base, task, key hyperparameters, data hashes, eval results, provenance."""
    run_dir = Path(run_dir).resolve()
    record = _read_record(run_dir)
    cfg, stats = record.get("config", {}), record.get("stats", {})
    task = dotted(cfg, "task.name", "?")
    base = base_model_of(cfg)

    lines = [_MARKER.format(run_dir=run_dir), "", f"# {task} fine-tune of {base}", ""]
    lines.append(f"Trained with soup (task `{task}`) in `{run_dir}`"
                 + (f"; this card describes `{exported}`." if exported else "."))
    if stats.get("status") != "finished":
        lines.append(f"\n**The run did not finish** (status: {stats.get('status', 'unknown')}).")
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in hyperparameters(cfg, stats)]

    lines += ["", "## Data", ""]
    files = record.get("data_files", [])
    if files:
        lines += ["| file | bytes | sha256 |", "|---|---|---|"]
        lines += [f"| `{f['path']}` | {f.get('size_bytes', '?')} | `{f['sha256']}` |" for f in files]
    else:
        lines.append("run.json records no data files.")
    train_report = (stats.get("data") or {}).get("train") or {}
    rows = train_report.get("rows_used", train_report.get("rows", "?"))
    lines.append(f"\nformat: {train_report.get('format', dotted(cfg, 'data.format', '?'))}, "
                 f"max_length {dotted(cfg, 'data.max_length', '?')}, training rows used: {rows}")

    lines += ["", "## Evaluation", ""]
    lines += evaluation_lines(run_dir, stats)

    lines += ["", "## Provenance", ""]
    git = record.get("git") or {}
    commit = "unknown"
    if git.get("commit"):
        commit = git["commit"][:12] + (" (uncommitted edits)" if git.get("dirty") else "")
    packages = record.get("packages", {})
    lines += [f"- soup {record.get('soup_version', '?')}, git {commit}, created {record.get('created_at', '?')}",
              "- " + ", ".join(f"{name} {version}" for name, version in packages.items() if version),
              f"- command: `{' '.join(record.get('command', []))}`"]
    return "\n".join(lines) + "\n"


def base_model_of(cfg: dict) -> str:
    """The base a run fine-tuned: model.path, or a description of the built-in tiny model."""
    if dotted(cfg, "model.name") == "tiny":
        tiny = dotted(cfg, "model.tiny", {})
        return (f"a randomly initialised tiny Llama (hidden {tiny.get('hidden_size')}, "
                f"{tiny.get('num_hidden_layers')} layers, byte tokenizer)")
    return str(dotted(cfg, "model.path", "?"))


def hyperparameters(cfg: dict, stats: dict) -> list[tuple[str, str]]:
    """(name, value) rows of the settings that decide what a fine-tune learns."""
    peft = dotted(cfg, "peft.name", "none")
    tuning = "full fine-tune" if peft == "none" else (
        f"{peft} (r {dotted(cfg, 'peft.r')}, alpha {dotted(cfg, 'peft.alpha')}, "
        f"dropout {dotted(cfg, 'peft.dropout')}, targets {dotted(cfg, 'peft.target_modules')})")
    micro, accum = dotted(cfg, "train.micro_batch_size"), dotted(cfg, "train.grad_accum_steps")
    precision = (stats.get("precision") or {}).get("resolved") or dotted(cfg, "train.precision", "?")
    epochs = stats.get("epochs_done")
    rows = [
        ("base model", base_model_of(cfg)),
        ("task", str(dotted(cfg, "task.name", "?"))),
        ("fine-tuning", tuning),
        ("quantisation (training)", str(dotted(cfg, "quant.name", "none"))),
        ("precision", str(precision)),
        ("optimizer", f"{dotted(cfg, 'optim.name')}, lr {dotted(cfg, 'optim.lr')}, "
                      f"weight decay {dotted(cfg, 'optim.weight_decay')}"),
        ("schedule", f"{dotted(cfg, 'sched.name')}, warmup {dotted(cfg, 'sched.warmup_steps')} steps"),
        ("batch", f"{micro} sequences x {accum} accumulation steps per optimizer step "
                  f"({dotted(cfg, 'parallelism.name', 'single')})"),
        ("steps", f"{stats.get('steps', '?')}" + (f" ({epochs} epochs)" if epochs is not None else "")
         + (f", stopped: {stats['stop_reason']}" if stats.get("stop_reason") else "")),
        ("seed", str(dotted(cfg, "seed", "?"))),
    ]
    return rows


def evaluation_lines(run_dir: Path, stats: dict) -> list[str]:
    """The final eval loss (run.json), every metric of the last eval line of metrics.jsonl, and the
    metrics of the run's eval.json (python -m soup.eval) when it has one."""
    lines = []
    eval_loss, train_loss = stats.get("final_eval_loss"), stats.get("final_train_loss")
    if eval_loss is not None:
        lines.append(f"- final eval loss: {_number(eval_loss)}")
    else:
        lines.append("- no eval loss: the run had no eval split (data.val_split / data.val_file)")
    if train_loss is not None:
        lines.append(f"- final train loss: {_number(train_loss)}")
    metrics_path = run_dir / "metrics.jsonl"
    evals = [row for row in read_metrics(metrics_path) if row.get("split") == "eval"] if metrics_path.is_file() else []
    if evals:
        last = evals[-1]
        shown = {k: v for k, v in last.items() if k not in ("step", "split", "time", "nonfinite")}
        lines.append(f"- last eval (step {last['step']}): "
                     + ", ".join(f"{key} {_number(value)}" for key, value in shown.items()))
    suite_path = run_dir / "eval.json"
    if suite_path.is_file():  # python -m soup.eval's latest evaluation of this run
        suite = json.loads(suite_path.read_text(encoding="utf-8"))
        lines.append(f"- python -m soup.eval, suite {suite['suite']['origin']} (sha256 "
                     f"{suite['suite']['sha256'][:12]}), at step {suite.get('step')}: "
                     + ", ".join(f"{key} {_number(value)}" for key, value in suite["metrics"].items()))
    return lines


def _read_record(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        raise SoupError(f"{run_dir}: no run.json there, so it is not a finished soup run directory.\n"
                        "  fix: pass --run <the run directory> (the folder holding run.json and final/), "
                        "or --no-card.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SoupError(f"{path}: not valid JSON ({exc}).\n"
                        "  fix: pass --no-card, or the run dir of an intact run.") from exc


def _number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)

