"""The lr range test (soup/lr_finder.py): its schedule and suggestion on a toy curve, and a real sweep."""

import json
import math

import pytest

from soup.lr_finder import lr_schedule, smooth, suggest
from tests.conftest import run_in_process


def test_the_schedule_is_geometric_from_min_to_max():
    lrs = lr_schedule(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))


def test_the_suggestion_is_where_a_toy_curve_falls_fastest():
    """loss(lr) = 2 - tanh(log10(lr) + 3): it falls fastest at lr = 1e-3 and is lowest at the largest lr."""
    lrs = lr_schedule(1e-6, 1.0, 61)
    losses = [2 - math.tanh(math.log10(lr) + 3) for lr in lrs]
    picked = suggest(lrs, losses)
    assert picked["steepest"] == pytest.approx(1e-3, rel=0.13)
    assert picked["min_over_10"] == pytest.approx(0.1)
    assert smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # bias-corrected: no pull towards 0


def test_a_sweep_writes_its_curve_and_suggestion_and_no_run_state(tmp_path, capsys):
    run_in_process(tmp_path, ["debug=tiny", "train.lr_finder=true", "train.lr_finder_steps=12",
                              "train.lr_finder_min_lr=1e-5", "train.lr_finder_max_lr=10.0", "optim.lr=1e-3"])
    record = json.loads((tmp_path / "lr_finder.json").read_text())
    assert record["lrs"][0] == pytest.approx(1e-5) and len(record["lrs"]) == len(record["losses"]) >= 3
    assert record["lrs"][0] <= record["suggested_lr"] <= record["lrs"][-1]
    assert (tmp_path / "lr_finder.png").stat().st_size > 0
    assert not (tmp_path / "final").exists() and not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "run.json").exists()
    assert "suggested optim.lr=" in capsys.readouterr().out
