"""Preemption on SLURM through submitit: the warning signal (SIGUSR2) saves a checkpoint at
the step it arrives, then submitit's own handler (which requeues the job) runs; the requeued
job (SLURM_RESTART_COUNT > 0) resumes instead of refusing its own run dir."""

import json
import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT, run_in_process

# Stands in for submitit: a USR2 handler installed before soup starts, which records its call.
WRAPPER = """
import signal, sys
from pathlib import Path
marker = Path(sys.argv.pop(1))
signal.signal(signal.SIGUSR2, lambda signum, frame: marker.write_text(str(signum)))
from soup.train import cli
cli()
"""


def test_the_preemption_warning_saves_a_checkpoint_then_hands_over_to_the_scheduler(tmp_path):
    marker = tmp_path / "requeued"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1")
    args = ["debug=tiny", "train.max_steps=100000", "train.save_every_steps=0", "train.eval_every_steps=0",
            "data.max_rows=16", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(marker), *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() or not metrics.read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR2, out
    step = json.loads((tmp_path / "run" / "run.json").read_text())["stats"]["steps"]
    assert (tmp_path / "run" / "checkpoints" / f"step-{step}").is_dir()  # saved at the step the warning came
    assert marker.read_text() == str(int(signal.SIGUSR2))  # and only then the scheduler's handler ran


def test_a_requeued_job_resumes_its_run(tmp_path, monkeypatch):
    base = ["debug=tiny", "train.max_steps=4", "train.save_every_steps=2", "train.eval_every_steps=0"]
    run_in_process(tmp_path, base)
    (tmp_path / "run.json").unlink()  # as if the job had been preempted after step 4's checkpoint
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_in_process(tmp_path, base)  # no resume=auto on the command line: the requeue implies it
    assert json.loads((tmp_path / "run.json").read_text())["stats"]["status"] == "finished"
