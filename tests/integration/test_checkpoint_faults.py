"""Checkpoints that were crafted, truncated, written by another model or onto a full or
read-only disk: each is refused or skipped with a message naming the file, nothing in
them runs, and the last good checkpoint survives.

Checkpoints here are real ones: save_checkpoint on a small model, or a debug=tiny run.
"""

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from soup.checkpoint import (
    MANIFEST,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from soup.errors import SoupError
from tests.conftest import REPO_ROOT


class Net(torch.nn.Module):
    def __init__(self, hidden=4):
        super().__init__()
        self.embed = torch.nn.Embedding(10, hidden)
        self.head = torch.nn.Linear(hidden, 10)


def fresh(hidden=4):
    torch.manual_seed(0)
    model = Net(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def step(model, opt, sched):
    model.head(model.embed(torch.tensor([1, 2]))).square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def checkpoints(tmp_path, steps=(1, 2)) -> list[Path]:
    model, opt, sched = fresh()
    saved = []
    for n in steps:
        step(model, opt, sched)
        saved.append(save_checkpoint(tmp_path / "checkpoints", n, model, opt, sched, {"step": n}, keep_last=5,
                                     extra_state={"task": {}}))
    return saved


class Payload:
    """A pickle that, when unpickled, creates `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- item 1: nothing is unpickled --------------------------------------------------------
@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt", "scheduler.pt", "extra.pt"])
def test_a_crafted_pickle_in_any_checkpoint_file_is_refused_and_runs_nothing(tmp_path, name):
    path = checkpoints(tmp_path, steps=(1,))[0]
    marker = tmp_path / "pwned"
    with open(path / name, "wb") as f:
        pickle.dump({"state": Payload(marker)}, f)
    write_manifest(path)  # a careful attacker updates the checksums too
    with pytest.raises(SoupError) as err:
        load_checkpoint(path, *fresh())
    assert str(path / name) in str(err.value) and "will not unpickle" in str(err.value)
    assert "fix:" in str(err.value)
    assert not marker.exists()


def test_rng_states_are_stored_as_tensors(tmp_path):
    path = checkpoints(tmp_path, steps=(1,))[0]
    rng = torch.load(path / "rng.pt", weights_only=True)
    assert isinstance(rng["python"]["state"], torch.Tensor) and isinstance(rng["numpy"]["keys"], torch.Tensor)


# --- item 4: another model ----------------------------------------------------------------
def test_a_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(tmp_path):
    path = checkpoints(tmp_path, steps=(1,))[0]
    with pytest.raises(SoupError) as err:
        load_checkpoint(path, *fresh(hidden=8))
    message = str(err.value)
    assert "another shape" in message and "embed.weight: (10, 4) in the checkpoint, (10, 8) in this model" in message
    assert str(path) in message and "fix:" in message


# --- item 5: corrupt checkpoints ------------------------------------------------------------
def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_auto_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, capsys, name):
    older, newest = checkpoints(tmp_path)
    truncate(newest / name)
    assert resolve_resume("auto", tmp_path / "checkpoints") == older
    out = capsys.readouterr().out
    assert f"warning: skipping corrupt checkpoint {newest}" in out and str(newest / name) in out


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_an_explicit_corrupt_checkpoint_is_refused_naming_the_file(tmp_path, name):
    _, newest = checkpoints(tmp_path)
    truncate(newest / name)
    with pytest.raises(SoupError) as err:
        resolve_resume(str(newest), tmp_path / "checkpoints")
    assert str(newest / name) in str(err.value) and "truncated" in str(err.value)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_corrupt_checkpoint_without_a_manifest_is_still_named_on_load(tmp_path, name):
    """Checkpoints from before manifests: the load itself names the file instead of a traceback."""
    _, newest = checkpoints(tmp_path)
    (newest / MANIFEST).unlink()
    truncate(newest / name)
    assert verify_checkpoint(newest) is None
    with pytest.raises(SoupError, match="corrupt") as err:
        load_checkpoint(newest, *fresh())
    assert str(newest / name) in str(err.value)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    for path in checkpoints(tmp_path):
        truncate(path / "model.safetensors")
    with pytest.raises(SoupError, match="no checkpoint in .* is intact"):
        resolve_resume("auto", tmp_path / "checkpoints")


# --- item 10: full disk, read-only folder -----------------------------------------------------
@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374"),
])
def test_a_full_disk_names_the_path_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, failure):
    older, newest = checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in newest.iterdir()}
    model, opt, sched = fresh()

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr("soup.checkpoint.torch.save", full)
    with pytest.raises(SoupError) as err:
        save_checkpoint(tmp_path / "checkpoints", 3, model, opt, sched, {"step": 3}, keep_last=1)
    assert "no space left on device" in str(err.value) and str(tmp_path / "checkpoints" / "step-3") in str(err.value)
    assert "fix:" in str(err.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert {p.name: p.read_bytes() for p in newest.iterdir()} == before


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs.get("dir")))

    monkeypatch.setattr("soup.checkpoint.tempfile.mkdtemp", denied)
    with pytest.raises(SoupError, match="not writable") as err:
        save_checkpoint(tmp_path / "checkpoints", 1, *fresh(), {"step": 1}, keep_last=1)
    assert str(tmp_path / "checkpoints" / "step-1") in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_dir_is_named(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints").chmod(0o500)
    try:
        with pytest.raises(SoupError, match="not writable"):
            save_checkpoint(tmp_path / "checkpoints", 1, *fresh(), {"step": 1}, keep_last=1)
    finally:
        (tmp_path / "checkpoints").chmod(0o700)


# --- through a real run: corrupt newest checkpoint, atomic final/ --------------------------------
RUN = ["debug=tiny", "train.max_steps=12", "train.save_every_steps=4", "train.keep_last_checkpoints=5",
       "train.eval_every_steps=0"]


def train(run_dir: Path, *overrides: str):
    from soup.train import run

    overrides = [*RUN, *overrides]
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return run(cfg, run_dir, overrides)


def test_a_run_resumes_past_a_corrupt_newest_checkpoint_bit_identically(tmp_path, capsys):
    straight = tmp_path / "straight"
    train(straight)
    broken = tmp_path / "broken"
    shutil.copytree(straight, broken)
    # As if killed after the step-12 checkpoint, before final/, with step-12 damaged on disk.
    shutil.rmtree(broken / "final")
    (broken / "run.json").unlink()
    truncate(broken / "checkpoints" / "step-12" / "model.safetensors")
    capsys.readouterr()
    train(broken, "resume=auto")
    out = capsys.readouterr().out
    assert f"skipping corrupt checkpoint {broken / 'checkpoints' / 'step-12'}" in out
    assert f"resumed from {broken / 'checkpoints' / 'step-8'} at step 8" in out
    a, b = load_file(str(straight / "final" / "model.safetensors")), load_file(str(broken / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((broken / "run.json").read_text())["stats"]["steps"] == 12


def test_final_is_all_or_nothing(tmp_path, monkeypatch):
    """Item 6: a save of final/ that dies midway (here: the tokenizer save) leaves no final/."""
    from transformers import PreTrainedTokenizerBase

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, "train.max_steps=2")
    assert not (tmp_path / "final").exists()
    assert not list(tmp_path.glob(".tmp-final-*"))


def test_resume_of_a_crafted_checkpoint_exits_2_and_runs_nothing(tmp_path):
    """The reported attack, as a user meets it: a crafted rng.pt, resume=auto, the CLI."""
    from tests.conftest import run_cli

    train(tmp_path)
    shutil.rmtree(tmp_path / "final")  # unfinished, so resume=auto resumes
    newest = tmp_path / "checkpoints" / "step-12"
    marker = tmp_path / "pwned"
    with open(newest / "rng.pt", "wb") as f:
        pickle.dump(Payload(marker), f)
    write_manifest(newest)
    proc = run_cli(*RUN, f"hydra.run.dir={tmp_path}", "resume=auto", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "will not unpickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
