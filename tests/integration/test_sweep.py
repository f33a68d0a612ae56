"""An optimising sweeper reads what each run returns: `--multirun hydra/sweeper=optuna`.

soup.train returns a run's objective (the final eval loss, else the last train loss; run.json
records both). hydra-optuna-sweeper (the `sweep` extra) asks Optuna for each trial's
parameters, runs the job and tells Optuna the value it returned. The test runs a real
3-trial study on the tiny default, watching Optuna's `Study.tell` from inside the sweeping
process, and checks each trial got its run's objective and that the best one is reported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.conftest import REPO_ROOT, run_cli
from tests.integration.test_slurm import require_extra

pytestmark = pytest.mark.slow


# Runs `python -m soup.train <args>` as that command would, with Optuna's Study.tell wrapped
# to record every (trial, value) the sweeper reports, written to $SOUP_TEST_TOLD at exit.
WATCH_OPTUNA = textwrap.dedent("""
    import json, os, runpy, sys

    import optuna

    told = []
    tell = optuna.study.Study.tell

    def recording_tell(self, trial, values=None, state=None, **kwargs):
        told.append({"number": trial.number, "params": dict(trial.params), "values": values,
                     "state": None if state is None else state.name})
        return tell(self, trial, values=values, state=state, **kwargs)

    optuna.study.Study.tell = recording_tell
    sys.argv = ["soup.train", *sys.argv[1:]]
    try:
        runpy.run_module("soup.train", run_name="__main__", alter_sys=True)
    finally:
        with open(os.environ["SOUP_TEST_TOLD"], "w") as f:
            json.dump(told, f)
""")


def require_optuna_sweeper() -> None:
    """Skip (fail under SOUP_REQUIRE_EXTRAS=1) when the `sweep` extra is not installed."""
    require_extra("sweep", ("optuna", "hydra_plugins.hydra_optuna_sweeper"))


def test_optuna_receives_each_runs_objective_and_reports_the_best_trial(tmp_path):
    require_optuna_sweeper()
    driver = tmp_path / "watch_optuna.py"
    driver.write_text(WATCH_OPTUNA)
    told_path = tmp_path / "told.json"
    sweep_dir = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1", SOUP_TEST_TOLD=str(told_path))
    proc = subprocess.run(
        [sys.executable, str(driver), "--multirun", "hydra/sweeper=optuna", "optim.lr=tag(log, interval(1e-4, 1e-2))",
         "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=0",
         "train.max_steps=3", "train.progress_bar=false", f"hydra.sweep.dir={sweep_dir}",
         "hydra.sweep.subdir=${hydra.job.num}"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    told = json.loads(told_path.read_text())
    assert [t["number"] for t in told] == [0, 1, 2] and all(t["state"] == "COMPLETE" for t in told)
    for trial in told:
        record = json.loads((sweep_dir / str(trial["number"]) / "run.json").read_text())
        assert record["stats"]["status"] == "finished"
        # The run trained with the learning rate Optuna drew ...
        assert record["config"]["optim"]["lr"] == trial["params"]["optim.lr"]
        # ... and Optuna was told the objective the run returned: its final eval loss (the demo holds out 10%).
        assert trial["values"] == [record["stats"]["final_eval_loss"]]
    assert len({t["values"][0] for t in told}) == 3  # three different runs, not one value repeated

    best = min(told, key=lambda t: t["values"][0])
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == best["values"][0]
    assert results["best_params"] == best["params"]
    assert f"Best value: {best['values'][0]}" in proc.stderr + proc.stdout


def test_the_optuna_lr_preset_composes_a_seeded_minimising_study_over_the_learning_rate():
    require_optuna_sweeper()
    proc = run_cli("hydra/sweeper=optuna_lr", "--cfg", "hydra", "--package", "hydra.sweeper")
    sweeper = yaml.safe_load(proc.stdout)  # the hydra.sweeper node alone
    assert sweeper["_target_"] == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper["direction"] == "minimize" and sweeper["sampler"]["seed"] is not None
    assert sweeper["params"] == {"optim.lr": "tag(log, interval(1e-5, 1e-2))"}

