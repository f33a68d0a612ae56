"""`--multirun hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml) against a real SLURM.

The jobs go through sbatch to real slurmctld/slurmd daemons and submitit follows them with
sacct, as on a cluster. `bash scripts/slurm/up.sh` starts a one-node cluster with accounting
on this machine (CI does, with SOUP_REQUIRE_SLURM=1); the sweep directories live under
pytest's tmp_path, which every job can read because the cluster is this machine (on a
real multi-node cluster they would have to be on a shared filesystem).

Without a reachable SLURM these tests skip and say why; with SOUP_REQUIRE_SLURM=1 they fail
instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, run_cli, run_in_process
from tests.integration.test_distributed import train_losses

pytestmark = pytest.mark.slow


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is missing too
        return False


# The tiny default job, cut to a few steps.
SHORT = ["train.max_steps=5", "train.progress_bar=false"]


def slurm_unreachable_reason() -> str | None:
    """Why this machine cannot run SLURM jobs now, or None when it can."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (no SLURM client)"
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 30 s"
    if sinfo.returncode != 0:
        return f"sinfo fails: {' / '.join(sinfo.stderr.strip().splitlines()[-3:])}"
    states = sinfo.stdout.split()
    if not any(state.rstrip("*~#") in ("idle", "mix", "alloc") for state in states):
        return f"no node is up (sinfo states: {' '.join(states) or 'none'})"
    sacct = subprocess.run(["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=30)
    if sacct.returncode != 0:
        # submitit reads job states with sacct: without accounting it waits forever.
        return ("sacct fails, so SLURM has no accounting and submitit cannot follow jobs: "
                + " / ".join(sacct.stderr.strip().splitlines()[-3:]))
    return None


def require_extra(extra: str, modules: tuple[str, ...]) -> None:
    """Skip (fail under SOUP_REQUIRE_EXTRAS=1) when one of the extra's modules is not installed."""
    for module in modules:
        if not installed(module):
            reason = f"needs the {extra} extra ({module} is not installed): pip install -e \".[dev]\""
            if os.environ.get("SOUP_REQUIRE_EXTRAS") == "1":
                pytest.fail(reason + " (SOUP_REQUIRE_EXTRAS=1 is set)")
            pytest.skip(reason)


def require_slurm() -> None:
    """Skip, or fail under SOUP_REQUIRE_SLURM=1, unless SLURM jobs can run from here (the
    submitit extra installed, the cluster answering, accounting on)."""
    require_extra("submitit", ("submitit", "hydra_plugins.hydra_submitit_launcher"))
    reason = slurm_unreachable_reason()
    if reason is not None:
        reason = f"needs a reachable SLURM cluster: {reason}. Start one here with: bash scripts/slurm/up.sh"
        if os.environ.get("SOUP_REQUIRE_SLURM") == "1":
            pytest.fail(reason + " (SOUP_REQUIRE_SLURM=1 is set)")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm() -> None:
    require_slurm()


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The run directories of a sweep, in job order (hydra.sweep.subdir starts with the job number)."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()),
                  key=lambda p: int(p.name.split("_")[0]))


def submitit_results(sweep_dir: Path) -> dict[str, object]:
    """SLURM job id -> what the job sent back to the sweeping process (Hydra's JobReturn)."""
    results = {}
    for path in (sweep_dir / ".submitit").glob("*/*_result.pkl"):
        with path.open("rb") as f:
            outcome, value = pickle.load(f)
        assert outcome == "success", f"{path}: {value}"
        results[path.name.rsplit("_", 2)[0]] = value
    return results


def accounting_states(job_id: str) -> list[str]:
    """The states sacct recorded for a job, one per attempt (a requeued job has several), once
    the last one is final: accounting hears of a job's end a moment after submitit does."""
    for _ in range(100):
        out = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job_id],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        if out.split() and out.split()[-1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED"):
            break
        time.sleep(0.2)
    return out.split()


def test_a_two_job_sweep_runs_as_slurm_jobs_each_in_its_own_run_directory(slurm, tmp_path):
    run_cli("--multirun", "hydra/launcher=slurm", "optim.lr=1e-3,3e-3", *SHORT, f"hydra.sweep.dir={tmp_path}",
            timeout=600)
    jobs = job_dirs(tmp_path)
    assert [p.name for p in jobs] == ["0_optim.lr=0.001,train.max_steps=5", "1_optim.lr=0.003,train.max_steps=5"]
    objectives = []
    for job, lr in zip(jobs, (1e-3, 3e-3)):
        record = json.loads((job / "run.json").read_text())
        assert record["stats"]["status"] == "finished" and record["stats"]["steps"] == 5
        assert record["config"]["optim"]["lr"] == lr
        assert (job / "final" / "model.safetensors").exists() and (job / "final" / "config.json").exists()
        metrics = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if m["split"] == "train"] == [1, 2, 3, 4, 5]
        assert (job / ".hydra" / "overrides.yaml").exists()
        objectives.append(record["stats"]["final_eval_loss"])

    # They ran as SLURM jobs, which accounting saw finish, and each one's objective came back.
    results = submitit_results(tmp_path)
    assert len(results) == 2, sorted(results)
    for job_id, returned in results.items():
        assert accounting_states(job_id) == ["COMPLETED"], job_id
        assert returned.return_value in objectives
    assert sorted(r.return_value for r in results.values()) == sorted(objectives)


def squeue_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          timeout=30).stdout.strip()


def start_requeued_jobs_now(job_ids: list[str]) -> None:
    """SLURM holds a requeued job back for two minutes; start these as soon as their last attempts
    are gone instead (pending again, none of their processes left on the node, and a moment for
    slurmd to forget them: an attempt started while the last one is torn down can be killed with it)."""
    def gone(job_id: str) -> bool:
        return (squeue_state(job_id) == "PENDING"
                and subprocess.run(["scontrol", "listpids", job_id], capture_output=True, timeout=30).returncode != 0)

    deadline = time.time() + 120
    while not all(gone(job_id) for job_id in job_ids):
        assert time.time() < deadline, f"not all pending again: {[squeue_state(j) for j in job_ids]}"
        time.sleep(0.1)
    time.sleep(2)
    for job_id in job_ids:
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)


def test_preempted_and_requeued_jobs_resume_from_the_step_they_stopped_at(slurm, tmp_path):
    """Job 0 is requeued by SLURM (`scontrol requeue`, as preemption with PreemptMode=REQUEUE
    does): it gets SIGTERM. Job 1 gets submitit's warning, SIGUSR2 (what SLURM sends
    hydra.launcher.signal_delay_s before the time limit): soup saves, then hands over to
    submitit's handler, which requeues it. Each saves a checkpoint at the step the signal came
    (there are no periodic ones here), and its next attempt, which SLURM marks as a restart,
    resumes from it in the same run directory without resume=auto on the command line."""
    run = ["optim.lr=1e-3,2e-3", "train.max_steps=24", "train.save_every_steps=0", "train.progress_bar=false",
           f"hydra.sweep.dir={tmp_path}"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1")
    sweep = subprocess.Popen([sys.executable, "-m", "soup.train", "--multirun", "hydra/launcher=slurm", *run],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    job_ids: list[str] = []
    try:
        deadline = time.time() + 300
        while len([p for p in tmp_path.glob("*/metrics.jsonl") if p.read_text().count("\n") >= 3]) < 2:
            assert sweep.poll() is None, f"the sweep ended before both jobs trained:\n{sweep.stdout.read()}"
            assert time.time() < deadline, "the jobs did not train 3 steps in 300 s"
            time.sleep(0.1)
        job_ids = sorted((p.name for p in (tmp_path / ".submitit").iterdir() if "_" in p.name and p.is_dir()),
                         key=lambda name: int(name.split("_")[1]))
        requeued, preempted = job_ids
        subprocess.run(["scontrol", "requeue", requeued], check=True, timeout=30)
        subprocess.run(["scancel", "--signal=USR2", preempted], check=True, timeout=30)
        start_requeued_jobs_now(job_ids)
        out, _ = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:  # a failed test leaves neither the sweep nor its jobs behind
            sweep.kill()
            for job_id in job_ids:
                subprocess.run(["scancel", job_id], timeout=30)
    assert sweep.returncode == 0, out[-4000:]

    for job, job_id, signum in zip(job_dirs(tmp_path), job_ids, (signal.SIGTERM, signal.SIGUSR2)):
        log = (tmp_path / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
        stopped = re.search(rf"\[soup\] stopped by signal {int(signum)} at step (\d+); checkpoint: (\S+)", log)
        assert stopped, log[-4000:]
        assert "[soup] SLURM requeued this job (restart 1): resume=auto" in log, log[-4000:]
        step = int(stopped.group(1))
        assert f"[soup] resumed from {job / 'checkpoints' / f'step-{step}'} at step {step}" in log, log[-4000:]
        if signum == signal.SIGUSR2:  # requeued by submitit's handler, after soup's checkpoint
            assert log.index("Requeued job") > log.index(stopped.group(0))
        record = json.loads((job / "run.json").read_text())
        assert record["stats"]["status"] == "finished" and record["stats"]["steps"] == 24
        steps = [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "train"]
        assert steps == list(range(1, 25))  # each step once, as if the job had never stopped
        assert accounting_states(job_id) == ["REQUEUED", "COMPLETED"], job_id


def test_a_two_task_job_trains_with_ddp(slurm, tmp_path):
    """One SLURM job of 2 tasks (hydra.launcher.tasks_per_node=2), each task a rank of
    parallelism=ddp: soup maps SLURM's variables to torch.distributed's (submitit's
    TorchDistributedEnvironment: the rendezvous on the job's first node) and both join one gloo
    group. Rank 0 alone writes the run directory, and the losses are the single-process run's
    with the same global batch (2 ranks x 4 = 8; the tolerance of tests/integration/test_distributed.py)."""
    same = [*SHORT, "train.grad_accum_steps=1", "train.eval_every_steps=0"]
    run_cli("--multirun", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
            "parallelism=ddp", *same, "train.micro_batch_size=4", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            timeout=600)
    (job,) = job_dirs(tmp_path / "sweep")
    assert json.loads((job / "run.json").read_text())["stats"]["status"] == "finished"
    assert (job / "train.log").read_text().count("[soup] parallelism: ddp, 2 ranks (gloo)") == 1
    (job_id,) = submitit_results(tmp_path / "sweep")
    assert accounting_states(job_id) == ["COMPLETED"]
    assert sorted(p.name for p in (tmp_path / "sweep" / ".submitit" / job_id).glob("*_log.out")) == [
        f"{job_id}_0_log.out", f"{job_id}_1_log.out"]  # two SLURM tasks ran it

    run_in_process(tmp_path / "single", [*same, "train.micro_batch_size=8"])
    assert train_losses(job) == pytest.approx(train_losses(tmp_path / "single"), rel=1e-4)
