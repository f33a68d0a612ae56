import json

import pytest
import torch

from soup.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
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
