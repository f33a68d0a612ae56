"""Resume is exact: a run stopped (gracefully or by SIGKILL) and resumed ends bit-identical."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, run_cli

pytestmark = pytest.mark.slow

# Small enough to be quick, big enough that a step takes a few ms so a signal lands mid-run.
RUN = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_hidden_layers=2",
       "data.max_rows=200", "data.max_length=128", "train.micro_batch_size=4", "train.grad_accum_steps=2",
       "train.max_steps=40", "train.save_every_steps=5", "train.eval_every_steps=10",
       "train.keep_last_checkpoints=2", "train.progress_bar=false"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs after resume"


def start(run_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, "-m", "soup.train", *RUN, f"hydra.run.dir={run_dir}"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared:\n{proc.stdout.read()}"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("straight")
    run_cli(*RUN, f"hydra.run.dir={run_dir}")
    return run_dir


def test_graceful_stop_saves_a_checkpoint_and_resume_is_bit_identical(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for(tmp_path / "checkpoints" / "step-10", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out  # stopped, not finished: a scheduler can tell
    assert "stopped by signal" in out
    assert not (tmp_path / "final").exists()
    run_cli(*RUN, f"hydra.run.dir={tmp_path}", "resume=auto")
    assert_bit_identical(uninterrupted, tmp_path)


def test_sigkill_between_checkpoints_then_resume_is_bit_identical(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for(tmp_path / "checkpoints" / "step-15", proc)
    time.sleep(0.05)  # land somewhere after the save, before the run ends
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "final").exists()
    result = run_cli(*RUN, f"hydra.run.dir={tmp_path}", "resume=auto")
    assert "resumed from" in result.stdout
    assert_bit_identical(uninterrupted, tmp_path)
    # metrics.jsonl holds each step once, as if the run had never stopped.
    steps = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"split": "train"' in line]
    assert len(steps) == 40


def test_resume_from_an_explicit_checkpoint_path(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for(tmp_path / "checkpoints" / "step-20", proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    run_cli(*RUN, f"hydra.run.dir={tmp_path}", f"resume={tmp_path / 'checkpoints' / 'step-20'}")
    assert_bit_identical(uninterrupted, tmp_path)
