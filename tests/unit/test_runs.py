"""Tests for soup/runs.py and soup/runs_report.py: `python -m soup.runs list|show|compare|clean`.

One real tiny run (in process, so without .hydra/) and fabricated run dirs written by hand
in the shapes soup writes (run.json as soup/tracking.py's write_run_record, metrics.jsonl
as soup/loop.py logs, checkpoints/step-N as soup/checkpoint.py names them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from soup.runs import NOT_STARTED, RUNNING, Run, config_diff, main, run_status
from soup.runs_report import ABSENT
from tests.conftest import REPO_ROOT, run_in_process

REAL_OVERRIDES = ["debug=tiny", "train.max_steps=3", "train.eval_every_steps=1", "train.save_every_steps=1",
                  "train.keep_last_checkpoints=3"]
SWEEP = "multirun/2026-11-24/09-00-00"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHA = "ab" * 32
CHECKPOINT_BYTES = 3000 + 1000  # model.safetensors + optimizer.pt of a fabricated checkpoint


def fabricated_config(lr: float) -> dict:
    return {"task": {"name": "sft"}, "model": {"name": "hf", "path": "../shared/models/stories260k"},
            "data": {"name": "file", "train_file": "sft.jsonl"}, "optim": {"name": "adamw", "lr": lr},
            "train": {"max_steps": 40, "eval_every_steps": 10, "save_every_steps": 10}, "seed": 42}


def write_run(path: Path, *, config: dict, train_losses: dict[int, float], eval_losses: dict[int, float] | None = None,
              stats: dict | None = None, checkpoints: tuple[int, ...] = (), final: bool = False,
              torn_last_line: bool = False) -> Path:
    """A run dir as `python -m soup.train` leaves it (.hydra/ written, run.json only when `stats`)."""
    path.mkdir(parents=True)
    (path / ".hydra").mkdir()
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optim.lr={config['optim']['lr']}"]))
    rows = []
    for step, loss in train_losses.items():
        rows.append({"step": step, "split": "train", "loss": loss, "lr": config["optim"]["lr"], "grad_norm": 1.0,
                     "trained_tokens": 512, "trained_tokens_per_s": 2000.0 + step, "time/step_s": 0.25,
                     "peak_memory_mb": 300.0, "epoch": step / 40, "time": 1.7e9 + step})
        if eval_losses and step in eval_losses:
            rows.append({"step": step, "split": "eval", "loss": eval_losses[step], "ppl": 2.718 ** eval_losses[step],
                         "time": 1.7e9 + step + 0.5})
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (path / "metrics.jsonl").write_text(text + ('{"step": 99, "spl' if torn_last_line else ""))
    for step in checkpoints:
        checkpoint = path / "checkpoints" / f"step-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "model.safetensors").write_bytes(b"\0" * 3000)
        (checkpoint / "optimizer.pt").write_bytes(b"\0" * 1000)
    if final:
        (path / "final").mkdir()
        (path / "final" / "model.safetensors").write_bytes(b"\0" * 3000)
    if stats is not None:
        record = {"soup_version": "0.1.0", "python_version": "3.11.9", "packages": {"torch": "2.5.1"},
                  "git": {"commit": COMMIT, "dirty": True}, "device": {"cpu": "x86_64", "cuda": None},
                  "hostname": "node1", "command": ["soup/train.py", f"optim.lr={config['optim']['lr']}"],
                  "created_at": "2026-11-24T09:10:00+0000", "config": config, "stats": stats,
                  "data_files": [{"path": "/data/sft.jsonl", "size_bytes": 12345, "sha256": SHA}]}
        (path / "run.json").write_text(json.dumps(record, indent=2))
    return path


def fabricated_stats(status: str, steps: int, train_loss: float, eval_loss: float | None) -> dict:
    return {"status": status, "steps": steps, "epochs_done": steps / 40,
            "stop_reason": "max_steps" if status == "finished" else "signal 15", "resume_changes": [],
            "trained_tokens": 512 * steps, "trained_tokens_per_s": 2048.0, "train_time_s": steps * 0.25,
            "wall_time_s": 125.0, "peak_memory_mb": 310.0, "final_train_loss": train_loss,
            "final_eval_loss": eval_loss, "parameters": 1000, "precision": {"requested": "fp32", "resolved": "fp32"},
            "trainable_parameters": 1000, "data": {"train": {"split": "train", "rows_used": 400}, "val": None}}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> Path:
    """An outputs/ folder: the real run, a two-job sweep, a crashed run, a run that never trained, and notes."""
    root = tmp_path_factory.mktemp("runs") / "outputs"
    run_in_process(root / "2026-11-23" / "12-00-00", REAL_OVERRIDES)
    # job 0: best eval at step 20, newest checkpoint step 40 -> clean deletes step-10 and step-30
    write_run(root / SWEEP / "0_optim.lr=0.001", config=fabricated_config(0.001),
              train_losses={10: 2.2, 20: 1.9, 30: 1.8, 40: 1.75}, eval_losses={10: 2.0, 20: 1.5, 30: 1.7, 40: 1.8},
              stats=fabricated_stats("finished", 40, 1.75, 1.8), checkpoints=(10, 20, 30, 40), final=True)
    # job 1: stopped by a signal at step 20; its two checkpoints are the best-eval and the newest one
    write_run(root / SWEEP / "1_optim.lr=0.0003", config=fabricated_config(0.0003),
              train_losses={10: 2.1, 20: 2.0}, eval_losses={10: 1.2, 20: 1.3},
              stats=fabricated_stats("interrupted", 20, 2.0, 1.3), checkpoints=(10, 20))
    (root / SWEEP / "multirun.yaml").write_text("hydra: {}\n")
    write_run(root / "2026-11-25" / "08-00-00", config=fabricated_config(0.01), train_losses={1: 3.0, 5: 2.5},
              checkpoints=(5,), torn_last_line=True)
    hydra_only = root / "2026-11-25" / "08-30-00" / ".hydra"
    hydra_only.mkdir(parents=True)
    (hydra_only / "config.yaml").write_text(yaml.safe_dump(fabricated_config(0.01)))
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run\n")
    return root


def listed(root: Path, capsys) -> dict[str, dict]:
    assert main(["list", "--root", str(root), "--json"]) == 0
    return {Path(entry["run"]).relative_to(root).as_posix(): entry for entry in json.loads(capsys.readouterr().out)}


# --------------------------------------------------------------------------- list


def test_list_finds_every_run_dir_under_the_root_and_nothing_else(outputs, capsys):
    assert sorted(listed(outputs, capsys)) == ["2026-11-23/12-00-00", "2026-11-25/08-00-00", "2026-11-25/08-30-00",
                                               f"{SWEEP}/0_optim.lr=0.001", f"{SWEEP}/1_optim.lr=0.0003"]


def test_list_json_fields_of_a_finished_run_come_from_its_run_json(outputs, capsys):
    job = listed(outputs, capsys)[f"{SWEEP}/0_optim.lr=0.001"]
    assert job == {"run": str(outputs / SWEEP / "0_optim.lr=0.001"), "task": "sft",
                   "model": "../shared/models/stories260k", "status": "finished", "stop_reason": "max_steps",
                   "steps": 40, "final_train_loss": 1.75, "final_eval_loss": 1.8, "best_eval_loss": 1.5,
                   "best_eval_step": 20, "wall_time_s": 125.0, "unit": "tokens", "units_per_s": 2048.0,
                   "peak_memory_mb": 310.0, "git_commit": COMMIT, "git_dirty": True}


def test_list_reads_a_run_without_run_json_from_its_metrics(outputs, capsys):
    runs = listed(outputs, capsys)
    crashed = runs["2026-11-25/08-00-00"]
    # the torn last line (a killed run's half-written step 99) is dropped
    assert (crashed["status"], crashed["steps"], crashed["final_train_loss"]) == (RUNNING, 5, 2.5)
    assert (crashed["unit"], crashed["units_per_s"], crashed["git_commit"]) == ("tokens", 2005.0, None)
    never = runs["2026-11-25/08-30-00"]
    assert (never["status"], never["steps"], never["task"]) == (NOT_STARTED, None, "sft")


def test_list_of_the_real_run_matches_its_run_json(outputs, capsys):
    real = listed(outputs, capsys)["2026-11-23/12-00-00"]
    record = json.loads((outputs / "2026-11-23" / "12-00-00" / "run.json").read_text())
    assert (real["status"], real["steps"], real["task"], real["model"]) == ("finished", 3, "sft", "tiny")
    assert real["final_train_loss"] == record["stats"]["final_train_loss"]
    assert real["final_eval_loss"] == record["stats"]["final_eval_loss"] is not None
    assert real["units_per_s"] == record["stats"]["trained_tokens_per_s"]
    assert real["git_commit"] == (record["git"] or {}).get("commit")


def test_list_table_has_a_header_and_one_aligned_line_per_run(outputs, capsys):
    assert main(["list", "--root", str(outputs)]) == 0
    lines = capsys.readouterr().out.rstrip("\n").splitlines()
    assert len(lines) == 1 + 5
    column = lines[0].index("STATUS")
    statuses = sorted(line[column:].split()[0] for line in lines[1:])
    assert statuses == sorted(["finished", "finished", "interrupted", RUNNING, NOT_STARTED])
    job = next(line for line in lines if "0_optim.lr=0.001" in line)
    assert job.split()[1:] == ["sft", "../shared/models/stories260k", "finished", "40", "1.7500", "1.8000", "2m05s",
                               "2,048", "tokens/s", "0123456789-dirty"]


def test_a_run_resumed_after_its_run_json_reads_as_running():
    record = {"stats": {"status": "finished", "steps": 2}}
    resumed = Run(Path("r"), record, {}, "run.json", None, [{"step": 3, "split": "train", "loss": 1.0}])
    assert run_status(resumed) == RUNNING


# --------------------------------------------------------------------------- show


def test_show_prints_config_stats_data_hashes_and_the_last_metrics_lines(outputs, capsys):
    job = outputs / SWEEP / "0_optim.lr=0.001"
    assert main(["show", str(job), "--lines", "2"]) == 0
    out = capsys.readouterr().out
    assert "config, from run.json (resolved):" in out
    assert "  optim:\n    name: adamw\n    lr: 0.001\n" in out
    assert "overrides: optim.lr=0.001" in out
    assert "  status: finished\n" in out and "  data.train.rows_used: 400\n" in out
    assert f"  {SHA}  /data/sft.jsonl  (12,345 bytes)" in out
    assert "metrics.jsonl, last 2 of 8 lines:" in out
    shown = [json.loads(line) for line in out.rstrip("\n").splitlines()[-2:]]
    assert [(row["step"], row["split"], row["loss"]) for row in shown] == [(40, "train", 1.75), (40, "eval", 1.8)]


def test_show_of_a_run_without_hydra_dir_reads_the_config_from_run_json(outputs, capsys):
    real = outputs / "2026-11-23" / "12-00-00"
    assert not (real / ".hydra").exists()  # run_in_process, like any in-process run, writes none
    assert main(["show", str(real)]) == 0
    out = capsys.readouterr().out
    assert "config, from run.json (resolved):" in out and "    max_steps: 3\n" in out


def test_show_of_a_run_without_run_json_reads_hydra_config(outputs, capsys):
    assert main(["show", str(outputs / "2026-11-25" / "08-30-00")]) == 0
    out = capsys.readouterr().out
    assert "config, from .hydra/config.yaml" in out and "    lr: 0.01\n" in out
    assert "stats: none yet" in out and "metrics.jsonl, last 0 of 0 lines:" in out


# --------------------------------------------------------------------------- compare


def test_config_diff_keeps_only_the_keys_that_differ_as_dotted_paths():
    first = {"optim": {"lr": 1e-3, "name": "adamw"}, "train": {"max_steps": 40}, "tags": [1, 2]}
    second = {"optim": {"lr": 3e-4, "name": "adamw"}, "train": {"max_steps": 40}, "tags": [1, 3], "seed": 1}
    assert config_diff([first, second]) == [("optim.lr", [1e-3, 3e-4]), ("tags", [[1, 2], [1, 3]]),
                                            ("seed", [ABSENT, 1])]


def test_compare_prints_the_changed_key_and_the_figures_and_writes_one_png(outputs, tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["compare", str(outputs / SWEEP / "0_optim.lr=0.001"), str(outputs / SWEEP / "1_optim.lr=0.0003"),
                 "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "config: 1 key differs" in out
    diff_line = next(line for line in out.splitlines() if line.startswith("optim.lr"))
    assert diff_line.split() == ["optim.lr", "0.001", "0.0003"]
    # runs labelled by their paths below the sweep dir they share
    assert out.splitlines()[0].split() == ["RUN", "0_optim.lr=0.001", "1_optim.lr=0.0003"]
    assert next(line for line in out.splitlines() if line.startswith("best eval loss")).split() == [
        "best", "eval", "loss", "1.5000", "(step", "20)", "1.2000", "(step", "10)"]
    assert next(line for line in out.splitlines() if line.startswith("status")).split() == [
        "status", "finished", "interrupted"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_compare_with_the_real_run_names_a_changed_and_a_missing_key(outputs, tmp_path, capsys):
    real = outputs / "2026-11-23" / "12-00-00"
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(real / "metrics.jsonl", copy / "metrics.jsonl")
    record = json.loads((real / "run.json").read_text())
    record["config"]["optim"]["lr"] = 0.5
    del record["config"]["train"]["max_steps"]
    (copy / "run.json").write_text(json.dumps(record))
    assert main(["compare", str(real), str(copy), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "config: 2 keys differ" in out
    assert next(line for line in out.splitlines() if line.startswith("optim.lr")).split()[2] == "0.5"
    assert next(line for line in out.splitlines() if line.startswith("train.max_steps")).split()[1:] == [
        "3", "(absent)"]
    assert (tmp_path / "c.png").stat().st_size > 0


# --------------------------------------------------------------------------- clean


@pytest.fixture
def sweep_copy(outputs, tmp_path) -> Path:
    root = tmp_path / "outputs"
    shutil.copytree(outputs / SWEEP, root / SWEEP)
    return root


def checkpoint_names(run: Path) -> list[str]:
    return sorted(path.name for path in (run / "checkpoints").iterdir())


def test_clean_dry_run_lists_the_checkpoints_it_would_delete_and_deletes_nothing(sweep_copy, capsys):
    assert main(["clean", "--root", str(sweep_copy)]) == 0
    out = capsys.readouterr().out
    job = sweep_copy / SWEEP / "0_optim.lr=0.001"
    assert "  would delete  checkpoints/step-10  (3.9 KiB)" in out and "checkpoints/step-30  (3.9 KiB)" in out
    assert "  keep          checkpoints/step-20  (best eval loss 1.5000)" in out
    assert "  keep          checkpoints/step-40  (newest: resume=auto continues from it)" in out
    assert "1_optim.lr=0.0003" not in out  # it keeps both its checkpoints
    assert f"would delete 2 checkpoints in 1 run: 7.8 KiB ({2 * CHECKPOINT_BYTES:,} bytes)" in out
    assert checkpoint_names(job) == ["step-10", "step-20", "step-30", "step-40"]


def test_clean_apply_keeps_final_the_best_eval_and_the_newest_checkpoint(sweep_copy, capsys):
    assert main(["clean", "--root", str(sweep_copy), "--apply"]) == 0
    job0, job1 = sweep_copy / SWEEP / "0_optim.lr=0.001", sweep_copy / SWEEP / "1_optim.lr=0.0003"
    assert checkpoint_names(job0) == ["step-20", "step-40"]
    assert (job0 / "final" / "model.safetensors").stat().st_size == 3000
    assert checkpoint_names(job1) == ["step-10", "step-20"]
    capsys.readouterr()
    assert main(["clean", "--root", str(sweep_copy)]) == 0
    assert "nothing to delete" in capsys.readouterr().out


def test_clean_of_the_real_run_keeps_its_newest_and_best_eval_checkpoints(outputs, tmp_path, capsys):
    run = tmp_path / "outputs" / "real"
    shutil.copytree(outputs / "2026-11-23" / "12-00-00", run)
    assert checkpoint_names(run) == ["step-1", "step-2", "step-3"]  # soup/checkpoint.py's naming
    evals = {row["step"]: row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if row["split"] == "eval"}
    best = min(evals, key=evals.get)
    assert main(["clean", "--root", str(tmp_path / "outputs"), "--apply"]) == 0
    assert checkpoint_names(run) == sorted({f"step-{best}", "step-3"})
    assert (run / "final" / "config.json").is_file()


# --------------------------------------------------------------------------- user errors


def test_show_of_a_folder_that_is_not_a_run_dir_is_a_user_error(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"[soup] error: {tmp_path} is not a run directory") and "\n  fix: " in err


def test_show_of_a_folder_inside_a_run_names_the_run_dir(outputs, capsys):
    job = outputs / SWEEP / "0_optim.lr=0.001"
    assert main(["show", str(job / "final")]) == 2
    assert f"  fix: pass the run directory it is inside: {job}" in capsys.readouterr().err
    assert main(["show", str(outputs / SWEEP)]) == 2
    assert "holds 2 run directories" in capsys.readouterr().err


def test_list_and_clean_of_a_root_without_runs_are_user_errors(tmp_path, capsys):
    for command in ("list", "clean"):
        assert main([command, "--root", str(tmp_path)]) == 2
        assert capsys.readouterr().err.startswith(f"[soup] error: {tmp_path} holds no run directory")
    assert main(["list", "--root", str(tmp_path / "absent")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_the_command_line_exits_2_with_one_message_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "soup.runs", "show", str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("[soup] error: ") and "  fix: " in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_show_prints_the_metrics_of_the_runs_eval_json(outputs, capsys):
    job = outputs / SWEEP / "0_optim.lr=0.001"
    (job / "eval.json").write_text(json.dumps({"metrics": {"gsm8k/accuracy": 0.625}, "step": 40,
                                               "suite": {"origin": "/suites/math.yaml"}, "created_at": "2026-11-29"}))
    try:
        assert main(["show", str(job)]) == 0
    finally:
        (job / "eval.json").unlink()
    out = capsys.readouterr().out
    assert "eval.json (python -m soup.eval, suite /suites/math.yaml, at step 40, 2026-11-29):" in out
    assert "  gsm8k/accuracy: 0.625" in out
