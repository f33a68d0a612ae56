import collections
import errno
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch

from soup.checkpoint import (
    atomic_directory,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_tensors,
    save_checkpoint,
    save_tensors,
)
from soup.errors import SoupError


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # shared storage, as tied LM heads are


def fresh(seed=0):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return model, opt, sched


def one_step(model, opt, sched):
    loss = model.head(model.embed(torch.tensor([1, 2, 3]))).square().mean() + torch.randn(()) * 0
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = fresh()
    one_step(model, opt, sched)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep_last=2)
    expected_noise = torch.randn(3)
    one_step(model, opt, sched)
    expected = model.embed.weight.clone()

    model2, opt2, sched2 = fresh(seed=123)
    state, extra = load_checkpoint(path, model2, opt2, sched2)
    assert state == {"step": 1} and extra == {}
    assert torch.equal(torch.randn(3), expected_noise)  # RNG restored
    one_step(model2, opt2, sched2)
    assert torch.equal(model2.embed.weight, expected)
    assert model2.head.weight.data_ptr() == model2.embed.weight.data_ptr()
    assert sched2.last_epoch == sched.last_epoch


def test_keeps_only_the_newest_k_and_ignores_partial_directories(tmp_path):
    model, opt, sched = fresh()
    (tmp_path / ".tmp-step-9-abc").mkdir()  # what a crash mid-save leaves
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert latest_checkpoint(tmp_path).name == "step-3"
    assert not list(tmp_path.glob(".tmp-*"))
    assert json.loads((tmp_path / "step-3" / "trainer_state.json").read_text()) == {"step": 3}


def test_checkpoints_sort_numerically(tmp_path):
    model, opt, sched = fresh()
    for step in (9, 10):
        save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, keep_last=5)
    assert latest_checkpoint(tmp_path).name == "step-10"


def test_failed_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    model, opt, sched = fresh()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("soup.checkpoint.torch.save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=2)
    assert list(tmp_path.iterdir()) == []


def test_incomplete_checkpoint_is_refused_with_the_fix(tmp_path):
    (tmp_path / "step-1").mkdir()
    model, opt, sched = fresh()
    with pytest.raises(SoupError, match="resume=auto"):
        load_checkpoint(tmp_path / "step-1", model, opt, sched)


# --- atomic_directory: the all-or-nothing folder checkpoints and final/ are written through
def test_atomic_directory_writes_beside_the_target_and_renames_when_complete(tmp_path):
    final = tmp_path / "final"
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-final-")
        (tmp / "weights").write_text("new")
        assert not final.exists()
    assert (final / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_atomic_directory_replaces_an_old_target_only_once_the_new_one_is_complete(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "weights").write_text("old")
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("new")
        assert (final / "weights").read_text() == "old"
    assert (final / "weights").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


@pytest.mark.parametrize("failure", [ValueError("a bug"), KeyboardInterrupt()])
def test_atomic_directory_failure_keeps_the_old_target_and_removes_the_temporary(tmp_path, failure):
    final = tmp_path / "final"
    final.mkdir()
    (final / "weights").write_text("old")
    with pytest.raises(type(failure)):  # not a storage problem: raised as it was
        with atomic_directory(final) as tmp:
            (tmp / "weights").write_text("half")
            raise failure
    assert (final / "weights").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_atomic_directory_removes_what_a_killed_save_left(tmp_path):
    (tmp_path / ".tmp-final-x1y2").mkdir()  # kill -9 mid-save
    (tmp_path / ".tmp-final-old-z3").mkdir()  # kill -9 between the two renames
    (tmp_path / ".tmp-step-3-abc").mkdir()  # another target's: not this one's to remove
    with atomic_directory(tmp_path / "final"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step-3-abc", "final"]


def test_atomic_directory_names_a_full_disk(tmp_path):
    with pytest.raises(SoupError, match="no space left on device") as err:
        with atomic_directory(tmp_path / "final"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(tmp_path / "final") in str(err.value) and "fix:" in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --- save_tensors: what it saves, torch.load(weights_only=True) loads back
def test_plain_states_save_and_load_back(tmp_path):
    state = OrderedDict(a=torch.ones(2), b=[1, 2.5, "x", None, True], c=(torch.Size([2]), torch.float16),
                        d={0: {"step": torch.tensor(3.0)}}, e=torch.device("cpu"), f={1, 2}, g=b"raw")
    save_tensors(state, tmp_path / "state.pt")
    loaded = load_tensors(tmp_path / "state.pt")
    assert loaded.keys() == state.keys() and loaded["b"] == state["b"] and loaded["c"] == state["c"]


@pytest.mark.parametrize("value", [np.float64(1.0), np.zeros(2), collections.defaultdict(int),
                                   collections.namedtuple("Pair", "a b")(1, 2), Tied()])
def test_a_python_object_fails_the_save(tmp_path, value):
    with pytest.raises(TypeError, match=r"\['x'\]\[0\]"):
        save_tensors({"x": [value]}, tmp_path / "state.pt")
    assert not (tmp_path / "state.pt").exists()
