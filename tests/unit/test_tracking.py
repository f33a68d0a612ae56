"""Tests for soup/tracking.py: metrics.jsonl, backends, peak memory, run.json, plot."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from soup.errors import ConfigError, MissingDependency
from soup.tracking import (
    NullTracker,
    git_state,
    open_tracker,
    peak_memory_mb,
    plot_loss_curves,
    read_metrics,
    reset_peak_memory,
    write_run_record,
)


def tracker_cfg(name: str, mode: str = "offline") -> SimpleNamespace:
    # Same fields as TrackerConfig; a namespace keeps these tests free of Hydra.
    return SimpleNamespace(name=name, project="soup-test", mode=mode)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------- metrics.jsonl


def test_jsonl_writes_one_line_per_log_with_step_split_and_time(tmp_path):
    with open_tracker(tracker_cfg("jsonl"), tmp_path, {}) as tracker:
        tracker.log({"loss": 2.5, "lr": 1e-3}, step=1)
        tracker.log({"loss": 2.0}, step=2, split="train")
        tracker.log({"loss": 2.25}, step=2, split="eval")

    rows = lines(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"], r["loss"]) for r in rows] == [
        (1, "train", 2.5),
        (2, "train", 2.0),
        (2, "eval", 2.25),
    ]
    assert rows[0]["lr"] == 1e-3
    assert all(isinstance(r["time"], float) for r in rows)


def test_jsonl_line_is_on_disk_before_close(tmp_path):
    tracker = open_tracker(tracker_cfg("jsonl"), tmp_path, {})
    tracker.log({"loss": 1.0}, step=1)
    # A run killed now must still have its line.
    assert lines(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0
    tracker.close()


def test_tensor_and_int_metrics_become_plain_numbers(tmp_path):
    with open_tracker(tracker_cfg("jsonl"), tmp_path, {}) as tracker:
        tracker.log({"loss": torch.tensor(0.5), "tokens": 4096}, step=1)
    row = lines(tmp_path / "metrics.jsonl")[0]
    assert row["loss"] == 0.5 and row["tokens"] == 4096 and isinstance(row["tokens"], int)


def test_reserved_metric_name_is_rejected(tmp_path):
    with open_tracker(tracker_cfg("jsonl"), tmp_path, {}) as tracker:
        with pytest.raises(ValueError, match="reserved"):
            tracker.log({"step": 3.0}, step=3)


def test_close_is_idempotent(tmp_path):
    tracker = open_tracker(tracker_cfg("jsonl"), tmp_path, {})
    tracker.close()
    tracker.close()


def test_nonfinite_values_are_null_and_named(tmp_path):
    with open_tracker(tracker_cfg("jsonl"), tmp_path, {}) as tracker:
        tracker.log({"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.1}, step=1)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    row = json.loads(text)
    assert row["loss"] is None and row["grad_norm"] is None and row["lr"] == 0.1
    assert row["nonfinite"] == ["loss", "grad_norm"]


def test_second_tracker_appends_and_truncate_after_drops_later_steps(tmp_path):
    # First run logs steps 1..5 and is killed after a checkpoint at step 3.
    with open_tracker(tracker_cfg("jsonl"), tmp_path, {}) as tracker:
        for step in range(1, 6):
            tracker.log({"loss": 10.0 - step}, step=step)
        tracker.log({"loss": 7.5}, step=4, split="eval")

    # The resumed run restores step 3 and logs 4..6 again.
    with open_tracker(tracker_cfg("jsonl"), tmp_path, {}, resume=True) as tracker:
        tracker.truncate_after(3)
        for step in range(4, 7):
            tracker.log({"loss": 100.0 + step}, step=step)

    rows = lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [9.0, 8.0, 7.0, 104.0, 105.0, 106.0]


def test_truncate_after_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "loss": 1.0}\n{"step": 2, "spl')
    with open_tracker(tracker_cfg("jsonl"), tmp_path, {}, resume=True) as tracker:
        tracker.truncate_after(1)
        tracker.log({"loss": 0.5}, step=2)
    assert [r["step"] for r in lines(path)] == [1, 2]


def test_corrupt_line_in_the_middle_raises(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(json.JSONDecodeError):
        read_metrics(path)


def test_non_main_process_writes_nothing(tmp_path):
    with open_tracker(tracker_cfg("jsonl"), tmp_path / "run", {}, is_main_process=False) as tracker:
        assert isinstance(tracker, NullTracker)
        tracker.log({"loss": 1.0}, step=1)
        tracker.truncate_after(0)
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_name_lists_valid_names(tmp_path):
    with pytest.raises(ConfigError, match="jsonl, tensorboard, wandb"):
        open_tracker(tracker_cfg("mlflow"), tmp_path, {})


# --------------------------------------------------------------------------- backends


def test_tensorboard_writes_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    with open_tracker(tracker_cfg("tensorboard"), tmp_path, {"optim": {"lr": 0.1}}) as tracker:
        tracker.log({"loss": 1.0}, step=1)
        tracker.log({"loss": 0.9}, step=1, split="eval")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert (tmp_path / "metrics.jsonl").exists()  # jsonl is written beside every backend


def test_tensorboard_scalars_are_named_split_slash_key(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open_tracker(tracker_cfg("tensorboard"), tmp_path, {}) as tracker:
        tracker.log({"loss": 1.0}, step=1)
        tracker.log({"loss": 0.8}, step=2, split="eval")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "eval/loss"}
    assert [e.value for e in acc.Scalars("eval/loss")] == [pytest.approx(0.8)]


def test_tensorboard_truncate_after_hides_the_killed_runs_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open_tracker(tracker_cfg("tensorboard"), tmp_path, {}) as tracker:
        for step in range(1, 6):
            tracker.log({"loss": float(step)}, step=step)
    with open_tracker(tracker_cfg("tensorboard"), tmp_path, {}, resume=True) as tracker:
        tracker.truncate_after(3)
        for step in range(4, 7):
            tracker.log({"loss": 100.0 + step}, step=step)

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 104.0), (5, 105.0), (6, 106.0)
    ]


def _hide_module(monkeypatch, name: str) -> None:
    """Make require(name) fail as if the package were not installed."""
    real_import_module = importlib.import_module

    def fake_import_module(module, package=None):
        if module == name or module.startswith(name + "."):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real_import_module(module, package)

    # require() imports through importlib.import_module, looked up at call time.
    monkeypatch.setattr(importlib, "import_module", fake_import_module)


def test_missing_wandb_names_the_pip_command(tmp_path, monkeypatch):
    _hide_module(monkeypatch, "wandb")
    with pytest.raises(MissingDependency, match=r"pip install 'soup-harness\[wandb\]'"):
        open_tracker(tracker_cfg("wandb"), tmp_path, {})


def test_missing_tensorboard_names_the_pip_command(tmp_path, monkeypatch):
    _hide_module(monkeypatch, "tensorboard")
    with pytest.raises(MissingDependency, match=r"pip install 'soup-harness\[tensorboard\]'"):
        open_tracker(tracker_cfg("tensorboard"), tmp_path, {})


def test_wandb_offline_writes_under_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    with open_tracker(tracker_cfg("wandb"), tmp_path, {"optim": {"lr": 0.1}}) as tracker:
        tracker.log({"loss": 1.0}, step=1)
        tracker.log({"loss": 0.9}, step=1, split="eval")
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert any(offline_runs[0].glob("*.wandb"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert run_id in offline_runs[0].name

    # A resumed run of the same run dir continues the same wandb run id.
    with open_tracker(tracker_cfg("wandb"), tmp_path, {}, resume=True) as tracker:
        tracker.log({"loss": 0.8}, step=2)
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id


# --------------------------------------------------------------------------- memory


def test_peak_memory_on_cpu_is_positive():
    reset_peak_memory(torch.device("cpu"))  # a no-op, but must not fail
    # Any Python process with torch loaded holds well over 10 MiB.
    assert peak_memory_mb(torch.device("cpu")) > 10


# --------------------------------------------------------------------------- run.json


def test_run_record_holds_versions_git_config_stats_and_data_hashes(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"text": "hello"}\n{"text": "world"}\n')
    config = {"optim": {"name": "adamw", "lr": 3e-4}, "seed": 7}
    stats = {"wall_time_s": 1.5, "trained_tokens": 1024, "final_train_loss": float("nan")}

    path = write_run_record(tmp_path / "run", config, stats, [str(data)])

    assert path == tmp_path / "run" / "run.json"
    assert not list(path.parent.glob("*.tmp"))
    record = json.loads(path.read_text())  # strict JSON despite the NaN loss
    import soup

    assert record["soup_version"] == soup.__version__
    assert record["packages"]["torch"] == torch.__version__
    assert set(record["packages"]) >= {"transformers", "peft", "hydra-core", "numpy"}
    assert "git" in record  # None until the repo has a commit; see the git_state tests
    assert record["device"]["torch_threads"] == torch.get_num_threads()
    # What decides whether bf16 pays off here (soup/precision.py), so a bf16 figure can be read later.
    assert record["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["device"]["cpu_bf16"] in ("native", "emulated", "slow", "unknown")
    assert record["device"]["cpu_native_bf16"] == (record["device"]["cpu_bf16"] == "native")
    assert record["hostname"] and isinstance(record["command"], list)
    assert record["config"] == config
    assert record["stats"]["trained_tokens"] == 1024
    assert record["stats"]["final_train_loss"] is None

    (entry,) = record["data_files"]
    assert entry["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert entry["size_bytes"] == len(data.read_bytes())
    assert Path(entry["path"]) == data.resolve()


def test_run_record_package_missing_is_null(tmp_path, monkeypatch):
    import soup.tracking

    monkeypatch.setattr(soup.tracking, "RECORDED_PACKAGES", ("torch", "no-such-package-soup"))
    record = json.loads(write_run_record(tmp_path, {}, {}, []).read_text())
    assert record["packages"]["no-such-package-soup"] is None


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")


@needs_git
def test_git_state_reports_commit_and_dirty(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()

    assert git_state(tmp_path) == {"commit": head, "dirty": False}
    (tmp_path / "scratch.txt").write_text("untracked files do not count\n")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}


@needs_git
def test_git_state_is_none_outside_a_checkout(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert git_state(tmp_path) is None


# --------------------------------------------------------------------------- plot


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_png_of_train_and_eval_loss(tmp_path):
    with open_tracker(tracker_cfg("jsonl"), tmp_path, {}) as tracker:
        for step in range(1, 11):
            tracker.log({"loss": 3.0 / step}, step=step)
        tracker.log({"loss": 0.6}, step=5, split="eval")
        tracker.log({"loss": float("nan")}, step=10, split="eval")

    png = plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png")
    assert png == tmp_path / "plots" / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_plot_returns_none_without_losses(tmp_path):
    empty = tmp_path / "metrics.jsonl"
    empty.write_text("")
    assert plot_loss_curves(empty, tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()

    empty.write_text('{"step": 1, "split": "train", "lr": 0.1}\n')
    assert plot_loss_curves(empty, tmp_path / "loss.png") is None


def test_plot_does_not_change_the_global_backend(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    plot_loss_curves(metrics, tmp_path / "loss.png")
    assert matplotlib.get_backend() == before
