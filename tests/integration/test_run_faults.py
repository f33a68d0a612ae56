"""A run honours what it was asked or refuses: config changes on resume, run dirs that
already hold a run, signals, Hydra's own errors, and what the run dir records.

Most runs here are in-process (Hydra's compose API + soup.train.run) on the debug=tiny
model, a second or two each; the exit-status checks run the CLI as a user does.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soup.errors import ConfigError, SoupError
from tests.conftest import REPO_ROOT, run_cli, run_in_process

BASE = ["debug=tiny", "train.max_steps=12", "train.save_every_steps=4", "train.keep_last_checkpoints=5",
        "train.eval_every_steps=0"]


def train(run_dir: Path, *overrides: str):
    return run_in_process(run_dir, [*BASE, *overrides])


def metrics(run_dir: Path, split: str = "train") -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in metrics(run_dir)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 12-step run with checkpoints at steps 4, 8 and 12."""
    run_dir = tmp_path_factory.mktemp("finished")
    train(run_dir)
    return run_dir


def copy_run(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


# --- item 3: config changes on resume -----------------------------------------------------
def test_a_changed_lr_on_resume_is_refused_without_the_flag(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        train(run_dir, f"resume={run_dir / 'checkpoints' / 'step-4'}", "optim.lr=0.01")
    message = str(err.value)
    assert "optim.lr: 0.0003 (checkpoint) -> 0.01 (now)" in message
    assert "allow_resume_changes=true" in message


@pytest.mark.parametrize("change", [["train.max_steps=15"], ["optim.lr=0.003"],
                                    ["train.max_steps=15", "optim.lr=0.003"]])
def test_an_allowed_change_follows_the_new_schedule_from_the_checkpoint(finished, tmp_path, change):
    """After resuming at step 4 with a new length or lr, every later step's lr is the one a
    fresh run with the new settings uses at that step; run.json records the change."""
    run_dir = copy_run(finished, tmp_path / "run")
    train(run_dir, f"resume={run_dir / 'checkpoints' / 'step-4'}", "allow_resume_changes=true", *change)
    fresh = tmp_path / "fresh"
    train(fresh, *change)
    resumed, expected = lrs(run_dir), lrs(fresh)
    assert sorted(resumed) == sorted(expected)
    for step in range(5, max(expected) + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-12), step
    assert resumed[4] == lrs(finished)[4]  # the steps before the checkpoint are the old run's
    record = json.loads((run_dir / "run.json").read_text())["stats"]
    keys = sorted(c["key"] for c in record["resume_changes"])
    assert keys == sorted(c.split("=")[0] for c in change)
    assert all(c["at_step"] == 4 for c in record["resume_changes"])


@pytest.mark.parametrize("change, shown", [
    (["model.tiny.hidden_size=48"], "model.tiny.hidden_size: 32 (checkpoint) -> 48 (now)"),
    (["task=pretrain"], "task.name: sft (checkpoint) -> pretrain (now)"),
    (["peft=lora"], "peft.name: none (checkpoint) -> lora (now)"),
    (["train.micro_batch_size=2"], "train.micro_batch_size: 4 (checkpoint) -> 2 (now)"),
])
def test_a_change_the_checkpoint_cannot_honour_is_refused_even_with_the_flag(finished, tmp_path, change, shown):
    """Item 4 too: another model shape on resume names the key, not a size-mismatch traceback."""
    run_dir = copy_run(finished, tmp_path / "run")
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as err:
        train(run_dir, "resume=auto", "allow_resume_changes=true", *change)
    assert shown in str(err.value) and "cannot honour" in str(err.value)
    assert (run_dir / "metrics.jsonl").read_text() == before  # refused before anything was written


def test_resuming_past_the_new_end_is_refused(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    with pytest.raises(SoupError, match="at step 8, past this run's length of 6 steps"):
        train(run_dir, f"resume={run_dir / 'checkpoints' / 'step-8'}", "train.max_steps=6",
              "allow_resume_changes=true")


# --- item 7: a run dir that already holds a run ------------------------------------------
def test_a_fresh_run_refuses_a_run_dir_that_holds_a_run(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    with pytest.raises(ConfigError, match="(?s)already holds a finished run .*overwrite=true"):
        train(run_dir)
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_overwrite_deletes_the_old_outputs_and_starts_again(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    (run_dir / "checkpoints" / "step-99").mkdir()  # a checkpoint the new run would never write
    train(run_dir, "overwrite=true")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 13))
    assert not (run_dir / "checkpoints" / "step-99").exists()


def test_overwrite_with_resume_is_an_error():
    with pytest.raises(ConfigError, match="overwrite=true is set, but this run does not read it"):
        train(Path("/nonexistent"), "overwrite=true", "resume=auto")


def test_resume_auto_on_a_finished_run_with_a_longer_length_continues_from_its_last_checkpoint(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path / "run")
    train(run_dir, "resume=auto", "train.max_steps=15", "allow_resume_changes=true")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 16))
    assert json.loads((run_dir / "run.json").read_text())["stats"]["resume_changes"] == [
        {"key": "train.max_steps", "from": 12, "to": 15, "at_step": 12}]


@pytest.mark.parametrize("save_every", [4, 0])
def test_resume_auto_on_a_finished_run_does_nothing_and_says_so(tmp_path, capsys, save_every):
    """With checkpoints or without (train.save_every_steps=0), a finished run stays as it is."""
    run_dir = tmp_path / "run"
    objective = train(run_dir, f"train.save_every_steps={save_every}")
    files = {p: p.read_bytes() for p in (run_dir / "final").iterdir()}
    record, lines = (run_dir / "run.json").read_text(), (run_dir / "metrics.jsonl").read_text()
    capsys.readouterr()
    again = train(run_dir, "resume=auto", f"train.save_every_steps={save_every}")
    assert "holds a finished run (12 steps, final/ saved); resume=auto has nothing to do" in capsys.readouterr().out
    assert again == objective
    assert (run_dir / "run.json").read_text() == record and (run_dir / "metrics.jsonl").read_text() == lines
    assert {p: p.read_bytes() for p in (run_dir / "final").iterdir()} == files


def test_resume_auto_without_a_checkpoint_starts_over_without_doubling_metrics(finished, tmp_path):
    """An unfinished run killed before its first checkpoint: its lines go, the run starts over."""
    run_dir = copy_run(finished, tmp_path / "run")
    import shutil

    for name in ("checkpoints", "final", "run.json"):
        shutil.rmtree(run_dir / name) if (run_dir / name).is_dir() else (run_dir / name).unlink()
    train(run_dir, "resume=auto")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 13))


# --- item 13: what the run dir records -----------------------------------------------------
def test_run_json_records_what_happened(finished):
    stats = json.loads((finished / "run.json").read_text())["stats"]
    assert stats["steps"] == 12 and stats["stop_reason"] == "max_steps"
    # debug=tiny: 58 training rows in micro-batches of 4 -> 15 per epoch; 12 steps of 1 is 0.8 epochs.
    assert stats["epochs_done"] == pytest.approx(12 / 15, abs=1e-4)


def test_loss_png_is_titled_with_task_model_and_run(finished):
    from PIL import Image

    title = Image.open(finished / "loss.png").text["Title"]
    assert title.startswith("sft | tiny llama (hidden 32, 2 layers)") and title.endswith(finished.name)


# --- items 8 and 12: exit statuses of the CLI --------------------------------------------
def test_sigterm_saves_and_exits_128_plus_the_signal(tmp_path):
    """A scheduler must tell a stopped run from a finished one; the resume hint stays."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1")
    args = ["debug=tiny", "train.max_steps=100000", "train.save_every_steps=0", "train.eval_every_steps=0",
            "data.max_rows=16", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "-m", "soup.train", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by signal 15" in out
    hint = next(line for line in out.splitlines() if "resume with:" in line)
    assert "debug=tiny" in hint and "resume=auto" in hint and f"hydra.run.dir={tmp_path}" in hint
    assert json.loads((tmp_path / "run.json").read_text())["stats"]["stop_reason"] == "signal 15"
    assert "resume with:" in (tmp_path / "train.log").read_text()


@pytest.mark.parametrize("override, says", [
    ("task=nope", "Could not find 'task/nope'"),
    ("train.max_steps=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("task=task_schema", "task=task_schema is not one of soup's options"),
    ("+train.max_stepz=5", "did you mean train.max_steps?"),
])
def test_every_user_error_exits_2_without_a_traceback(tmp_path, override, says):
    proc = run_cli(override, "debug=tiny", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert says in proc.stderr and "Traceback" not in proc.stderr


def test_the_cli_train_log_holds_the_soup_lines_and_errors(tmp_path):
    proc = run_cli("debug=tiny", "train.max_steps=2", f"hydra.run.dir={tmp_path}")
    log = (tmp_path / "train.log").read_text()
    soup_lines = [line for line in proc.stdout.splitlines() if line.startswith("[soup]")]
    assert soup_lines and all(line in log for line in soup_lines)
    again = run_cli("debug=tiny", "train.max_steps=2", f"hydra.run.dir={tmp_path}", check=False)
    assert again.returncode == 2
    assert "[soup] error:" in (tmp_path / "train.log").read_text()
