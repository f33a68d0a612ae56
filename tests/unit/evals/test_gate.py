"""The eval gate's bookkeeping (soup/evals/gate.py); tests/integration/test_eval.py runs it in training."""

from __future__ import annotations

import json

import pytest

from soup.errors import ConfigError
from soup.evals.gate import EvalGate
from tests.conftest import compose_config


def gate_of(tmp_path, *extra: str) -> EvalGate:
    (tmp_path / "suite.yaml").write_text("tasks:\n  capitals:\n    kind: multiple_choice\n"
                                         "    file: pkg://demo/choice.jsonl\n")
    cfg = compose_config(["debug=tiny", f"train.eval_gate={tmp_path / 'suite.yaml'}", "train.eval_gate_every_steps=2",
                          *extra])
    return EvalGate(cfg, tokenizer=type("T", (), {"chat_template": None})(), device="cpu")


def test_a_resume_keeps_the_checkpoints_baseline_unless_the_suite_or_baseline_changed(tmp_path):
    gate = gate_of(tmp_path)
    state = {"baseline": {"capitals/acc": 0.5}, "baseline_source": None, "suite_sha256": gate.suite.sha256,
             "history": [{"step": 0, "metrics": {"capitals/acc": 0.5}, "regressions": {}}]}
    gate.load_state_dict(state)
    assert gate.baseline == {"capitals/acc": 0.5} and [c.step for c in gate.history] == [0]
    changed = gate_of(tmp_path)
    changed.load_state_dict({**state, "suite_sha256": "another suite"})
    assert changed.baseline is None  # the first check after the resume is the baseline
    (tmp_path / "eval.json").write_text(json.dumps({"metrics": {"capitals/acc": 0.75}}))
    retargeted = gate_of(tmp_path, f"train.eval_gate_baseline={tmp_path / 'eval.json'}")
    retargeted.load_state_dict(state)
    assert retargeted.baseline == {"capitals/acc": 0.75}


def test_a_watched_metric_the_first_evaluation_lacks_is_named_and_a_later_missing_one_regresses(tmp_path,
                                                                                             monkeypatch):
    from soup.evals import gate as gate_module
    from soup.evals.runner import TaskResult

    reported = {"acc_norm": 0.5}  # what the fake suite reports: no capitals/acc
    monkeypatch.setattr(gate_module, "run_suite", lambda suite, ctx: [
        TaskResult("capitals", "multiple_choice", dict(reported), 4)])
    tracker = type("Tracker", (), {"log": lambda self, metrics, step, split: None})()
    gate = gate_of(tmp_path, "train.eval_gate_metrics=[capitals/acc]")
    with pytest.raises(ConfigError, match=r"capitals/acc, which the suite .* did not report at step 0"):
        gate.check(None, 0, tracker)
    gate.baseline = {"capitals/acc": 0.5, "capitals/acc_norm": 0.5}
    check = gate.check(None, 4, tracker)
    assert list(check.regressions) == ["capitals/acc"] and gate.stops(check)
