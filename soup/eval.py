"""Entry point: run an evaluation suite on a run's final model, or on any model folder.

    python -m soup.eval checkpoint=outputs/<date>/<time> suite=file suite.file=suite.yaml
    python -m soup.eval checkpoint=path/to/any/hf_model                  # suite=demo, the bundled one
    python -m soup.eval checkpoint=outputs/<date>/<time> suite.tasks.sums.max_new_tokens=64

The config is conf/eval.yaml: soup.train's `model` and `quant` groups, the `suite` group
(conf/suite/: a suite file, whose tasks `suite.tasks.<task>.<field>=` overrides or extends), and
the fields of soup/evals/config.py. A suite (layout: soup/evals/suite.py) lists the tasks: loss /
perplexity on a file, generation scored exactly (the RL rewards' answer parsers, exact match,
regex, JSON, tool calls), multiple choice by log-likelihood, a local judge model with a rubric,
and lm-evaluation-harness tasks from local files.

The checkpoint is loaded as soup.generate loads it (a full model, or an adapter on the base
soup.merge finds for it). When it belongs to a run (checkpoint= the run directory or its final/),
the run's own config gives the loss tasks their tokenization, batch size and precision, so a
loss here is the loss the training loop logged; and the results go into the run directory
(in a --multirun, each job's own directory, so the jobs keep their results apart): eval.json (every metric, the suite's hash, the versions), eval_samples/<task>.jsonl (each
row's prompt, completion, extracted answer and score), and the run's tracker (split "suite",
at the run's last step). Otherwise they go to this command's own directory (outputs/eval/...).

Exit status: 0; 2 for a user mistake (a flag, the suite file, a data row, a checkpoint), with
the flag or file:line and the fix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from soup.config import resolve_device
from soup.console import hydra_cli, hydra_job
from soup.evals.config import register_eval_configs, validate_eval
from soup.evals.runner import (EvalContext, TaskResult, flat_metrics, lower_is_better, run_suite,
                               write_samples)
from soup.evals.suite import Suite, compose_suite

register_eval_configs()
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USER_ERROR = 2  # as soup.train's


@dataclass
class Located:
    """Where the evaluated model is, and the run it came from (if any)."""

    model_dir: Optional[Path]  # None: the model group
    run_dir: Optional[Path]
    run_config: Optional[DictConfig]  # the run's resolved config (run.json), else its .hydra/config.yaml
    step: int = 0  # the run's last step, where the tracker's rows go


def locate(checkpoint: Optional[str]) -> Located:
    if checkpoint is None:
        return Located(None, None, None)
    folder = Path(checkpoint).expanduser().resolve()
    if (folder / "final").is_dir() and not (folder / "config.json").is_file() and \
            not (folder / "adapter_config.json").is_file():
        run_dir, folder = folder, folder / "final"
    else:
        run_dir = folder.parent if ((folder.parent / "run.json").is_file() or
                                    (folder.parent / ".hydra" / "config.yaml").is_file()) else None
    if run_dir is None:
        return Located(folder, None, None)
    try:  # a run killed between final/ and run.json has none: its .hydra/ still holds the config
        record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        record = {}
    config = record.get("config")
    hydra_config = run_dir / ".hydra" / "config.yaml"
    run_config = OmegaConf.create(config) if config else (OmegaConf.load(hydra_config) if hydra_config.is_file()
                                                         else None)
    return Located(folder, run_dir, run_config, int(record.get("stats", {}).get("steps") or 0))


def evaluate_suite(cfg: DictConfig, out_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Validate, read the suite, load the model when a task needs it, run, and write eval.json;
    return its record. Everything checkable before a model loads (flags, the suite) is checked first."""
    from soup.generate import chat_template_text, checkpoint_dir, load_generate_tokenizer, load_model
    from soup.precision import resolve_precision

    validate_eval(cfg, overrides)
    suite = compose_suite(cfg.suite)
    located = locate(cfg.checkpoint)
    device = resolve_device(cfg.device)
    load_cfg = OmegaConf.merge(cfg, {"checkpoint": None if located.model_dir is None else str(located.model_dir)})
    checkpoint = checkpoint_dir(load_cfg)
    tokenizer = load_generate_tokenizer(load_cfg, checkpoint)
    template, template_label = chat_template_text(cfg.chat_template, tokenizer)
    precision = cfg.precision
    if precision == "run":
        precision = located.run_config.train.precision if located.run_config is not None else "fp32"
    precision = resolve_precision(precision, device)
    loaded: dict = {}

    def model():
        if "model" not in loaded:
            loaded["model"], loaded["label"] = load_model(load_cfg, checkpoint, tokenizer, device)
            loaded["model"].eval().requires_grad_(False)
            print(f"[soup] model: {loaded['label']} | device={device} precision={precision} | chat template: "
                  f"{template_label}")
        return loaded["model"]

    ctx = EvalContext(model, tokenizer, device, cfg.batch_size, cfg.seed, precision, located.run_config, template)
    print(f"[soup] suite {suite.origin} ({len(suite.tasks)} tasks: {', '.join(t.name for t in suite.tasks)})"
          + (f" | run {located.run_dir}" if located.run_dir else ""))
    started = time.perf_counter()
    results = run_suite(suite, ctx)
    # The jobs of a --multirun each keep their own results (in their job directory), not one run's eval.json.
    output = Path(cfg.output_dir).expanduser() if cfg.output_dir else (
        out_dir if in_multirun() else (located.run_dir or out_dir))
    record = eval_record(suite, results, located, cfg, precision, loaded.get("label"), time.perf_counter() - started)
    write_eval(output, record, results, located)
    return record


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def eval_record(suite: Suite, results: list[TaskResult], located: Located, cfg: DictConfig, precision: str,
                model_label: Optional[str], seconds: float) -> dict:
    from soup.tracking import provenance

    metrics = flat_metrics(results)
    return {
        "metrics": metrics,
        "lower_is_better": sorted(k for k in metrics if lower_is_better(k)),
        "tasks": {r.name: {"kind": r.kind, "rows": r.rows, "metrics": r.metrics, **r.info} for r in results},
        "suite": {"origin": suite.origin, "sha256": suite.sha256, "tasks": [t.name for t in suite.tasks]},
        "checkpoint": None if located.model_dir is None else str(located.model_dir),
        "model": model_label or "not loaded (every task scored given completions)",
        "run_dir": None if located.run_dir is None else str(located.run_dir),
        "step": located.step,
        "seed": cfg.seed,
        "precision": precision,
        "seconds": round(seconds, 3),
        **provenance(),
    }


def write_eval(output: Path, record: dict, results: list[TaskResult], located: Located) -> None:
    """eval.json (replaced atomically; each evaluation is also appended to eval_history.jsonl),
    eval_samples/, and the tracker (the run's own, else metrics.jsonl in `output`)."""
    from soup.tracking import open_tracker

    output.mkdir(parents=True, exist_ok=True)
    path = output / "eval.json"
    tmp = path.with_name("eval.json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    with open(output / "eval_history.jsonl", "a", encoding="utf-8") as history:
        history.write(json.dumps(record, default=str) + "\n")
    write_samples(results, output / "eval_samples")
    run_config = located.run_config if located.run_dir == output else None
    tracker_cfg = run_config.tracker if run_config is not None else OmegaConf.create({"name": "jsonl"})
    config = OmegaConf.to_container(run_config, resolve=True) if run_config is not None else {}
    with open_tracker(tracker_cfg, output, config, resume=run_config is not None) as tracker:
        tracker.log(record["metrics"], record["step"], split="suite")
        where = tracker.describe()
    print(f"[soup] eval.json -> {path} | samples -> {output / 'eval_samples'} | tracker: {where}")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    hydra_job(lambda run_dir, overrides: evaluate_suite(cfg, run_dir, overrides), USER_ERROR)


def cli() -> None:
    """`python -m soup.eval`, with Hydra's user errors exiting USER_ERROR (soup/console.py)."""
    hydra_cli(main, USER_ERROR)


if __name__ == "__main__":
    cli()
