"""python -m soup.eval on real runs, and train.eval_gate inside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from soup.evals.config import register_eval_configs
from tests.conftest import REPO_ROOT, require_shared, run_cli, run_in_process

pytestmark = pytest.mark.slow


def compose_eval(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_eval_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        return compose(config_name="eval", overrides=overrides)


def evaluate(overrides: list[str], out_dir: Path) -> dict:
    from soup.eval import evaluate_suite

    return evaluate_suite(compose_eval(overrides), out_dir, overrides)


@pytest.mark.shared
def test_an_eval_of_stories260k_reports_the_loss_the_training_loop_logged(tmp_path):
    rows = require_shared("data/sft/self_instruct_seed_tasks.alpaca.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:120]) + "\n")
    (tmp_path / "held_out.jsonl").write_text("\n".join(rows[150:]) + "\n")
    run_dir = tmp_path / "run"
    run_in_process(run_dir, ["experiment=stories260k_sft", f"data.train_file={tmp_path / 'train.jsonl'}",
                             f"data.val_file={tmp_path / 'held_out.jsonl'}", "data.val_split=0",
                             "train.max_steps=3", "train.eval_every_steps=0", "train.eval_at_start=false",
                             "train.progress_bar=false"])
    logged = json.loads((run_dir / "run.json").read_text())["stats"]["final_eval_loss"]
    (tmp_path / "suite.yaml").write_text("tasks:\n  held_out:\n    kind: loss\n    file: held_out.jsonl\n")

    record = evaluate([f"checkpoint={run_dir}", "suite=file", f"suite.file={tmp_path / 'suite.yaml'}"],
                      tmp_path / "eval")

    # The run's own tokenization (chatml, max_length 256, overlong drop, response tokens) and batch size.
    assert record["metrics"]["held_out/loss"] == pytest.approx(logged, rel=1e-6)
    assert record["metrics"]["held_out/ppl"] == pytest.approx(torch.tensor(logged).exp().item(), rel=1e-6)
    assert record["tasks"]["held_out"]["data"]["chat_template"] == "chatml" and record["step"] == 3
    # eval.json, its samples and the run's tracker: the run directory, not the eval's own
    assert json.loads((run_dir / "eval.json").read_text())["metrics"] == record["metrics"]
    suite_rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["split"] == "suite"]
    assert len(suite_rows) == 1 and suite_rows[0]["step"] == 3
    assert suite_rows[0]["held_out/loss"] == pytest.approx(logged, rel=1e-6)
    assert not (tmp_path / "eval" / "eval.json").exists()
    from soup.model_card import render_card

    assert f"python -m soup.eval, suite soup.eval's suite group (file: {tmp_path / 'suite.yaml'})" in render_card(run_dir)


def gate_run(run_dir: Path, *gate: str) -> dict:
    run_in_process(run_dir, ["debug=tiny", "train.max_steps=6", "data.max_rows=48", "train.save_every_steps=0",
                             "train.progress_bar=false", *gate])
    return json.loads((run_dir / "run.json").read_text())["stats"]


@pytest.fixture
def strict_gate(tmp_path) -> list[str]:
    """A two-task suite, and a baseline no tiny model reaches: every accuracy 1.0."""
    (tmp_path / "suite.yaml").write_text("tasks:\n  capitals:\n    kind: multiple_choice\n"
                                         "    file: pkg://demo/choice.jsonl\n    max_rows: 6\n"
                                         "  sums:\n    kind: generation\n    file: pkg://demo/grpo.jsonl\n"
                                         "    max_rows: 4\n    max_new_tokens: 4\n")
    (tmp_path / "baseline.json").write_text(json.dumps({"metrics": {"capitals/acc": 1.0, "sums/accuracy": 1.0}}))
    return [f"train.eval_gate={tmp_path / 'suite.yaml'}", "train.eval_gate_every_steps=2",
            f"train.eval_gate_baseline={tmp_path / 'baseline.json'}", "train.eval_gate_metrics=[capitals/acc]"]


def test_a_regression_stops_the_run_cleanly_with_a_checkpoint(tmp_path, strict_gate, capsys):
    stats = gate_run(tmp_path / "run", *strict_gate)
    assert (stats["stop_reason"], stats["steps"], stats["status"]) == ("eval_gate", 2, "finished")
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir() and (tmp_path / "run" / "final").is_dir()
    (check,) = stats["eval_gate"]["evaluations"]
    assert check["step"] == 2 and list(check["regressions"]) == ["capitals/acc"]
    assert check["regressions"]["capitals/acc"]["baseline"] == 1.0
    assert "stopped by the eval gate at step 2" in capsys.readouterr().out


def test_a_gate_that_warns_trains_exactly_as_the_run_without_it(tmp_path, strict_gate, capsys):
    # The gate generates with its own seeded generator: the training stream never sees it.
    gated = gate_run(tmp_path / "gated", *strict_gate, "train.eval_gate_action=warn")
    out = capsys.readouterr().out
    plain = gate_run(tmp_path / "plain")
    assert gated["steps"] == plain["steps"] == 6 and gated["stop_reason"] == "max_steps"
    assert [c["step"] for c in gated["eval_gate"]["evaluations"]] == [2, 4, 6]
    assert out.count("warning: eval gate at step") == 3
    trained = [load_file(str(tmp_path / name / "final" / "model.safetensors")) for name in ("gated", "plain")]
    assert all(torch.equal(trained[0][key], trained[1][key]) for key in trained[1])
    suite_rows = [json.loads(line) for line in (tmp_path / "gated" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["split"] == "suite"]
    assert [row["step"] for row in suite_rows] == [2, 4, 6] and "sums/accuracy" in suite_rows[0]


def test_without_a_baseline_the_first_evaluation_before_step_one_is_it(tmp_path, capsys):
    (tmp_path / "suite.yaml").write_text("tasks:\n  held:\n    kind: loss\n    file: pkg://demo/sft.jsonl\n"
                                         "    max_rows: 16\n")
    stats = gate_run(tmp_path / "run", f"train.eval_gate={tmp_path / 'suite.yaml'}", "train.eval_gate_every_steps=3")
    steps = [c["step"] for c in stats["eval_gate"]["evaluations"]]
    assert steps == [0, 3, 6] and stats["eval_gate"]["baseline_source"] == "first evaluation"
    losses = [c["metrics"]["held/loss"] for c in stats["eval_gate"]["evaluations"]]
    assert stats["eval_gate"]["baseline"] == {"held/loss": losses[0], "held/ppl": pytest.approx(
        torch.tensor(losses[0]).exp().item())}
    assert losses[2] < losses[0]  # training helped: no regression, no stop
    assert stats["stop_reason"] == "max_steps"


def test_the_cli_names_a_missing_suite_and_exits_2(tmp_path):
    proc = run_cli("suite=file", "suite.file=no_such_suite.yaml", f"hydra.run.dir={tmp_path}", module="soup.eval",
                   check=False)
    assert proc.returncode == 2
    assert "no_such_suite.yaml" in proc.stderr and "fix:" in proc.stderr
