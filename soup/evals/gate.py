"""Eval-gated training: a suite runs on the model being trained, and a regression stops the run.

    python -m soup.train train.eval_gate=suite.yaml train.eval_gate_every_steps=50 \\
        train.eval_gate_metrics=[gsm8k/accuracy] train.eval_gate_threshold=0.02

Every `eval_gate_every_steps` steps (or `eval_gate_every_epochs` epochs) the suite (soup/evals/
suite.py) runs on the policy, in this process, with the run's own tokenizer, chat template, data
settings and precision; its metrics go to the tracker (split "suite"). Each watched metric is
compared with the baseline: another run's eval.json (`eval_gate_baseline`), else this run's
first gate evaluation, made before the first step. A metric worse than its baseline by more than
`eval_gate_threshold` (in the metric's own units: a loss that rose, an accuracy that fell) is a
regression, and `eval_gate_action` decides: stop (a checkpoint, then final/ as at that step; run.json
says stop_reason eval_gate and which metrics regressed), warn (a warning line, training goes on) or
continue (the figures are recorded, nothing is said).

The gate draws no random numbers from the training stream (generation has its own seeded
generator), so a run with action=continue trains exactly as the same run without a gate (with a
schedule-free optimizer, whose switch to its averaged weights and back at each evaluation is not
bit-exact, to rounding).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from soup.errors import ConfigError
from soup.evals.runner import KIND_METRICS, EvalContext, flat_metrics, lower_is_better, run_suite
from soup.evals.suite import Suite, read_suite

ACTIONS = ("stop", "warn", "continue")


def read_baseline(value: str, flag: str = "train.eval_gate_baseline") -> dict[str, float]:
    """The flat metrics of an eval.json (or of a run directory's eval.json)."""
    path = Path(value).expanduser()
    if path.is_dir():
        path = path / "eval.json"
    if not path.is_file():
        raise ConfigError(f"{flag}={value}: no eval.json there ({path}).\n  fix: point it at the eval.json that "
                          "python -m soup.eval wrote (or its run directory), or null to compare with this run's "
                          "first evaluation.")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{flag}={value}: {path} is not an eval.json of soup.eval ({exc!r}).\n  fix: give the "
                          "eval.json python -m soup.eval wrote.") from None
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def suite_metric_names(suite: Suite) -> Optional[set[str]]:
    """Every metric the suite can report, or None when an lm_eval task makes it unknowable up front."""
    if any(task.kind not in KIND_METRICS for task in suite.tasks):
        return None
    return {f"{task.name}/{metric}" for task in suite.tasks for metric in KIND_METRICS[task.kind]
            if metric != "name_accuracy" or task.scorer == "tool_call"}


def check_gate_config(train: DictConfig, need) -> None:
    """The gate's rules, for soup/config/validate.py (`need(ok, message)` collects the problems)."""
    need((train.eval_gate_every_steps > 0) != (train.eval_gate_every_epochs > 0),
         "train.eval_gate runs every N steps or every N epochs: set exactly one of train.eval_gate_every_steps and "
         f"train.eval_gate_every_epochs above 0 (got {train.eval_gate_every_steps} and "
         f"{train.eval_gate_every_epochs}).")
    need(train.eval_gate_every_steps >= 0 and train.eval_gate_every_epochs >= 0,
         "train.eval_gate_every_steps and train.eval_gate_every_epochs are counts: 0 (off) or more.")
    need(train.eval_gate_action in ACTIONS,
         f"train.eval_gate_action={train.eval_gate_action!r} is not an option; valid: {', '.join(ACTIONS)}.")
    need(train.eval_gate_threshold >= 0, f"train.eval_gate_threshold={train.eval_gate_threshold}: how much worse "
                                         "a metric may get before it counts as a regression, so 0 or more.")
    try:
        suite = read_suite(train.eval_gate, "train.eval_gate")
        baseline = read_baseline(train.eval_gate_baseline) if train.eval_gate_baseline else None
    except ConfigError as exc:
        need(False, str(exc))
        return
    known = suite_metric_names(suite)
    for metric in train.eval_gate_metrics:
        need(known is None or metric in known,
             f"train.eval_gate_metrics names {metric!r}, which the suite {suite.origin} does not report.\n"
             f"    fix: one of {', '.join(sorted(known or ()))}.")
        need(baseline is None or metric in baseline,
             f"train.eval_gate_metrics names {metric!r}, which the baseline {train.eval_gate_baseline} does not "
             "hold.\n    fix: a baseline evaluated with the same suite, or null to compare with this run's first "
             "evaluation.")


@dataclass
class GateCheck:
    step: int
    metrics: dict[str, float]
    regressions: dict[str, dict] = field(default_factory=dict)  # metric -> {value, baseline, worse_by}

    def record(self) -> dict:
        return {"step": self.step, "metrics": self.metrics, "regressions": self.regressions}


class EvalGate:
    def __init__(self, cfg: DictConfig, tokenizer, device):
        train = cfg.train
        self.suite = read_suite(train.eval_gate, "train.eval_gate")
        self.every_steps, self.every_epochs = train.eval_gate_every_steps, train.eval_gate_every_epochs
        self.watched = list(train.eval_gate_metrics)
        self.threshold, self.action = train.eval_gate_threshold, train.eval_gate_action
        self.baseline_source = train.eval_gate_baseline
        self.baseline = read_baseline(train.eval_gate_baseline) if train.eval_gate_baseline else None
        template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
        # _judges: a judge model loads once per run, not at every check.
        self.context = dict(tokenizer=tokenizer, device=device, batch_size=train.eval_batch_size, seed=cfg.seed,
                            precision=train.precision, run_cfg=cfg, chat_template=template, _judges={})
        self.history: list[GateCheck] = []

    def describe(self) -> str:
        cadence = (f"every {self.every_steps} steps" if self.every_steps else f"every {self.every_epochs} epochs")
        baseline = self.baseline_source or "its first evaluation (before step 1 in a fresh run)"
        watched = ", ".join(self.watched) or "every metric"
        return (f"eval gate: suite {self.suite.origin} {cadence}; {watched} against {baseline}, threshold "
                f"{self.threshold:g}, on regression: {self.action}")

    @property
    def needs_start(self) -> bool:
        """Whether the baseline is this run's own evaluation before training."""
        return self.baseline is None

    def due(self, step: int, epoch_before: float, epoch_after: float) -> bool:
        if self.every_steps:
            return step % self.every_steps == 0
        return math.floor(epoch_after / self.every_epochs + 1e-9) > math.floor(epoch_before / self.every_epochs + 1e-9)

    def check(self, model, step: int, tracker) -> GateCheck:
        """Run the suite on `model` at `step`; the first evaluation of a gate without a baseline becomes it."""
        ctx = EvalContext(lambda: model, **self.context)
        results = run_suite(self.suite, ctx)
        check = GateCheck(step, flat_metrics(results))
        tracker.log(check.metrics, step, split="suite")
        if self.baseline is None:
            self.baseline = dict(check.metrics)
            print(f"[soup] eval gate: baseline at step {step}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in check.metrics.items()))
            self._check_watched(check)
        else:
            for metric in self.watched or sorted(set(self.baseline) & set(check.metrics)):
                # A watched metric this evaluation lacks (lm_eval drops a non-finite one) is a regression.
                value, base = check.metrics.get(metric, math.nan), self.baseline[metric]
                worse_by = value - base if lower_is_better(metric) else base - value
                if worse_by > self.threshold or not math.isfinite(value):
                    check.regressions[metric] = {"value": value, "baseline": base, "worse_by": worse_by}
            self._report(check)
        self.history.append(check)
        return check

    def _check_watched(self, check: GateCheck) -> None:
        """The baseline evaluation shows every watched metric (an lm_eval task's names are only known now)."""
        missing = [m for m in self.watched if m not in check.metrics]
        if missing:
            raise ConfigError(f"train.eval_gate_metrics names {', '.join(missing)}, which the suite {self.suite.origin} "
                              f"did not report at step {check.step}.\n  fix: one of {', '.join(check.metrics)}.")

    def _report(self, check: GateCheck) -> None:
        if not check.regressions:
            print(f"[soup] eval gate at step {check.step}: no regression beyond {self.threshold:g}")
            return
        shown = "; ".join(f"{m} {r['value']:.4f} (baseline {r['baseline']:.4f}, worse by {r['worse_by']:.4f})"
                          for m, r in check.regressions.items())
        if self.action == "warn":
            print(f"[soup] warning: eval gate at step {check.step}: {shown}; threshold {self.threshold:g}, "
                  "training goes on (train.eval_gate_action=warn)")
        elif self.action == "stop":
            print(f"[soup] eval gate at step {check.step}: {shown}; threshold {self.threshold:g}: stopping "
                  "(train.eval_gate_action=stop)")

    def stops(self, check: GateCheck) -> bool:
        return self.action == "stop" and bool(check.regressions)

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "baseline_source": self.baseline_source, "suite_sha256": self.suite.sha256,
                "history": [c.record() for c in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """The checkpoint's baseline, unless the resume changed the suite or the baseline: then a new
        baseline file is read as given, and without one the first check after the resume is the baseline."""
        same = (state.get("baseline_source") == self.baseline_source and state.get("suite_sha256") == self.suite.sha256)
        if same and state.get("baseline") is not None:
            self.baseline = state["baseline"]
        self.history = [GateCheck(h["step"], h["metrics"], h["regressions"]) for h in state.get("history", [])]

    def summary(self) -> dict:
        """For run.json: the baseline, and every evaluation with its regressions."""
        return {"suite": str(self.suite.origin), "suite_sha256": self.suite.sha256, "action": self.action,
                "threshold": self.threshold, "baseline_source": self.baseline_source or "first evaluation",
                "baseline": self.baseline, "evaluations": [c.record() for c in self.history]}
