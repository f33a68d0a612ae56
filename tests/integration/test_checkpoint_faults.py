"""Checkpoints that were crafted, truncated, written by another model or onto a full or
read-only disk: each is refused or skipped with a message naming the file, nothing in
them runs, and the last good checkpoint survives.

Checkpoints here are real ones: save_checkpoint on a small model (milliseconds), or a
debug=tiny run for the few tests that go through train.run or the CLI (marked slow).
"""

import errno
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
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
from tests.conftest import REPO_ROOT, run_in_process


class Net(torch.nn.Module):
    def __init__(self, hidden=4, layers=1):
        super().__init__()
        self.embed = torch.nn.Embedding(10, hidden)
        self.head = torch.nn.Linear(hidden, 10)
        if layers > 1:
            self.extra = torch.nn.Linear(hidden, hidden)


def fresh(hidden=4, layers=1, dtype=torch.float32, frozen_embed=False):
    torch.manual_seed(0)
    model = Net(hidden, layers).to(dtype)
    model.embed.weight.requires_grad_(not frozen_embed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def step(model, opt, sched):
    model.head(model.embed(torch.tensor([1, 2]))).float().square().mean().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def checkpoints(tmp_path, steps=(1, 2), **model_kwargs) -> list[Path]:
    model, opt, sched = fresh(**model_kwargs)
    saved = []
    for n in steps:
        step(model, opt, sched)
        saved.append(save_checkpoint(tmp_path / "checkpoints", n, model, opt, sched, {"step": n}, keep_last=5,
                                     extra_state={"task": {}}))
    return saved


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


class Payload:
    """A pickle that, when unpickled, creates `marker`: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- item 1: nothing is unpickled --------------------------------------------------------
WRITERS = {
    # torch.load's own protocol: refused at the global itself.
    "pickle protocol 2": (lambda obj, f: pickle.dump(obj, f, protocol=2), "GLOBAL posix.system"),
    # Python's default protocol: refused earlier, at an opcode the weights_only unpickler lacks.
    "pickle default protocol": (pickle.dump, "Unsupported operand"),
    "torch.save": (torch.save, "GLOBAL posix.system"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4:UserWarning")  # torch's, about the default protocol
@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("name", ["rng.pt", "optimizer.pt", "scheduler.pt", "extra.pt"])
def test_a_crafted_pickle_in_any_checkpoint_file_is_refused_and_runs_nothing(tmp_path, name, writer):
    path = checkpoints(tmp_path, steps=(1,))[0]
    marker = tmp_path / "pwned"
    write, refused = WRITERS[writer]
    with open(path / name, "wb") as f:
        write({"state": Payload(marker)}, f)
    write_manifest(path)  # a careful attacker updates the checksums too
    with pytest.raises(SoupError) as err:
        load_checkpoint(path, *fresh())
    message = str(err.value)
    assert str(path / name) in message and "will not unpickle" in message and "crafted" in message
    assert refused in message
    assert "fix: delete that checkpoint and resume from another" in message
    assert not marker.exists()


def test_rng_states_are_stored_as_tensors_and_plain_values(tmp_path):
    path = checkpoints(tmp_path, steps=(1,))[0]
    rng = torch.load(path / "rng.pt", weights_only=True)
    assert isinstance(rng["python"]["state"], torch.Tensor) and isinstance(rng["numpy"]["keys"], torch.Tensor)
    assert rng["numpy"]["kind"] == "MT19937"


def test_an_rng_file_of_the_first_soup_is_named_as_older_not_crafted(tmp_path):
    """The first soup pickled np.random.get_state() (a numpy array) into rng.pt."""
    path = checkpoints(tmp_path, steps=(1,))[0]
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               path / "rng.pt")
    write_manifest(path)
    with pytest.raises(SoupError, match="written by an older soup") as err:
        load_checkpoint(path, *fresh())
    assert str(path / "rng.pt") in str(err.value) and "fix:" in str(err.value)


@pytest.mark.parametrize("value, shown", [(np.float64(0.5), "numpy.float64"), (Payload(Path("x")), "Payload")])
def test_a_state_that_would_not_load_back_fails_the_save_not_the_resume(tmp_path, value, shown):
    model, opt, sched = fresh()
    with pytest.raises(TypeError) as err:
        save_checkpoint(tmp_path, 1, model, opt, sched, {}, keep_last=2, extra_state={"task": {"mean": value}})
    assert "extra.pt" in str(err.value) and "['task']['mean']" in str(err.value) and shown in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", ["{\"step\": 1", "[1, 2]", "\xff\xfe"])
def test_a_malformed_trainer_state_is_named(tmp_path, content):
    path = checkpoints(tmp_path, steps=(1,))[0]
    (path / "trainer_state.json").write_bytes(content.encode("latin-1"))
    write_manifest(path)  # written with the bad content: only the load can tell
    with pytest.raises(SoupError, match="unreadable or corrupt") as err:
        load_checkpoint(path, *fresh())
    assert str(path / "trainer_state.json") in str(err.value)


# --- item 4: another model ----------------------------------------------------------------
def test_a_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(tmp_path):
    path = checkpoints(tmp_path, steps=(1,))[0]
    with pytest.raises(SoupError) as err:
        load_checkpoint(path, *fresh(hidden=8))
    message = str(err.value)
    assert "another shape or dtype" in message
    assert "embed.weight: (10, 4) float32 in the checkpoint, (10, 8) float32 in this model" in message
    assert str(path) in message and "fix: resume with the model and peft settings" in message


def test_a_checkpoint_of_another_dtype_is_named_not_cast(tmp_path):
    path = checkpoints(tmp_path, steps=(1,))[0]
    with pytest.raises(SoupError, match=r"embed.weight: \(10, 4\) float32 in the checkpoint, \(10, 4\) bfloat16"):
        load_checkpoint(path, *fresh(dtype=torch.bfloat16))


def test_a_checkpoint_lacking_weights_the_model_trains_names_them(tmp_path):
    path = checkpoints(tmp_path, steps=(1,), frozen_embed=True)[0]  # holds only what trained: the head
    with pytest.raises(SoupError, match=r"lacks weights this model trains \(embed.weight\)") as err:
        load_checkpoint(path, *fresh())
    assert "fix:" in str(err.value)


def test_a_checkpoint_with_weights_the_model_lacks_names_them(tmp_path):
    path = checkpoints(tmp_path, steps=(1,), layers=2)[0]
    with pytest.raises(SoupError, match="holds weights this model does not have") as err:
        load_checkpoint(path, *fresh())
    assert "extra.weight" in str(err.value) and "extra.bias" in str(err.value)


def test_an_optimizer_state_of_another_optimizer_is_named(tmp_path):
    path = checkpoints(tmp_path, steps=(1,))[0]
    model, _, _ = fresh()
    two_groups = torch.optim.AdamW([{"params": [model.embed.weight]}, {"params": list(model.head.parameters())}])
    sched = torch.optim.lr_scheduler.LambdaLR(two_groups, lambda s: 1.0)
    with pytest.raises(SoupError, match="does not fit this optimizer") as err:
        load_checkpoint(path, model, two_groups, sched)
    assert str(path / "optimizer.pt") in str(err.value) and "fix:" in str(err.value)


# --- item 5: corrupt checkpoints ------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_resume_auto_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path, capsys, name):
    older, newest = checkpoints(tmp_path)
    truncate(newest / name)
    assert resolve_resume("auto", tmp_path / "checkpoints") == older
    out = capsys.readouterr().out
    assert f"[soup] warning: skipping corrupt checkpoint {newest}: {newest / name}" in out


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_an_explicit_corrupt_checkpoint_is_refused_naming_the_file(tmp_path, name):
    _, newest = checkpoints(tmp_path)
    truncate(newest / name)
    with pytest.raises(SoupError) as err:
        resolve_resume(str(newest), tmp_path / "checkpoints")
    assert str(newest / name) in str(err.value) and "truncated" in str(err.value) and "fix:" in str(err.value)


def test_a_flipped_byte_of_the_same_size_fails_the_checksum(tmp_path):
    _, newest = checkpoints(tmp_path)
    data = bytearray((newest / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (newest / "optimizer.pt").write_bytes(bytes(data))
    assert verify_checkpoint(newest) == f"{newest / 'optimizer.pt'} does not match the checksum written with it " \
                                        "(corrupt or altered)"


def test_a_checkpoint_verified_once_is_checked_again_after_it_changed(tmp_path):
    _, newest = checkpoints(tmp_path)
    assert verify_checkpoint(newest) is None
    truncate(newest / "model.safetensors")
    assert "model.safetensors" in verify_checkpoint(newest)


@pytest.mark.parametrize("manifest", ["{", "[]", '{"model.safetensors": 3}', "{}"])
def test_a_malformed_manifest_is_named(tmp_path, manifest):
    _, newest = checkpoints(tmp_path)
    (newest / MANIFEST).write_text(manifest)
    assert str(newest / MANIFEST) in verify_checkpoint(newest)


def test_a_missing_file_is_named(tmp_path):
    _, newest = checkpoints(tmp_path)
    (newest / "extra.pt").unlink()  # listed in the manifest, though not a required file
    assert verify_checkpoint(newest) == f"{newest / 'extra.pt'} is missing"
    (newest / "rng.pt").unlink()
    assert "missing rng.pt" in verify_checkpoint(newest)


@pytest.mark.parametrize("name", ["model.safetensors", "trainer_state.json"])
def test_a_corrupt_checkpoint_from_before_manifests_is_skipped_by_its_cheap_checks(tmp_path, capsys, name):
    older, newest = checkpoints(tmp_path)
    (newest / MANIFEST).unlink()
    assert verify_checkpoint(newest) is None  # without a manifest, present files are enough ...
    truncate(newest / name)
    assert str(newest / name) in verify_checkpoint(newest)  # ... unless a header or the JSON is cut short
    assert resolve_resume("auto", tmp_path / "checkpoints") == older
    assert "skipping corrupt checkpoint" in capsys.readouterr().out


def test_a_truncated_tensor_file_from_before_manifests_is_named_on_load(tmp_path):
    _, newest = checkpoints(tmp_path)
    (newest / MANIFEST).unlink()
    truncate(newest / "optimizer.pt")
    assert verify_checkpoint(newest) is None
    with pytest.raises(SoupError, match="unreadable or corrupt") as err:
        load_checkpoint(newest, *fresh())
    assert str(newest / "optimizer.pt") in str(err.value) and "fix:" in str(err.value)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path, capsys):
    saved = checkpoints(tmp_path)
    for path in saved:
        truncate(path / "model.safetensors")
    with pytest.raises(SoupError, match="no checkpoint in .* is intact") as err:
        resolve_resume("auto", tmp_path / "checkpoints")
    assert "fix:" in str(err.value)
    assert capsys.readouterr().out.count("skipping corrupt checkpoint") == 2


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path, capsys):
    assert resolve_resume(None, tmp_path / "checkpoints") is None
    assert resolve_resume("auto", tmp_path / "checkpoints") is None  # the folder does not even exist
    assert f"resume=auto: no checkpoint in {tmp_path / 'checkpoints'}; starting fresh" in capsys.readouterr().out


def test_an_explicit_path_that_is_no_checkpoint_is_named(tmp_path):
    with pytest.raises(SoupError, match="does not exist") as err:
        resolve_resume(str(tmp_path / "nowhere"), tmp_path / "checkpoints")
    assert str(tmp_path / "nowhere") in str(err.value)
    newest = checkpoints(tmp_path)[-1]
    with pytest.raises(SoupError, match="that is a run directory") as err:  # the run dir, not a step-N
        resolve_resume(str(tmp_path), tmp_path / "checkpoints")
    assert f"fix: resume={newest}" in str(err.value)
    assert resolve_resume(str(newest), tmp_path / "elsewhere") == newest


# --- item 10: full disk, read-only folder -----------------------------------------------------
@pytest.mark.parametrize("target, failure", [
    ("soup.checkpoint.torch.save", OSError(errno.ENOSPC, "No space left on device")),
    # What torch.save raises on a full disk, and safetensors' save_file (both seen on a real one).
    ("soup.checkpoint.torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
    ("soup.checkpoint.save_file",
     SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
])
def test_a_full_disk_names_the_path_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, target, failure):
    older, newest = checkpoints(tmp_path)
    before = {p.name: p.read_bytes() for p in newest.iterdir()}
    model, opt, sched = fresh()

    def full(*args, **kwargs):
        raise failure

    monkeypatch.setattr(target, full)
    with pytest.raises(SoupError) as err:
        save_checkpoint(tmp_path / "checkpoints", 3, model, opt, sched, {"step": 3}, keep_last=1)
    message = str(err.value)
    assert "no space left on device" in message and "MiB free" in message
    assert str(tmp_path / "checkpoints" / "step-3") in message and "fix: free space" in message
    assert "resume=auto" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1", "step-2"]  # none pruned
    assert {p.name: p.read_bytes() for p in newest.iterdir()} == before


def test_a_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(kwargs.get("dir")))

    monkeypatch.setattr("soup.checkpoint.tempfile.mkdtemp", denied)
    with pytest.raises(SoupError, match="not writable") as err:
        save_checkpoint(tmp_path / "checkpoints", 1, *fresh(), {"step": 1}, keep_last=1)
    assert str(tmp_path / "checkpoints" / "step-1") in str(err.value)
    assert "hydra.run.dir" in str(err.value) and "resume=auto" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders (see the tmpfs tests below)")
def test_a_read_only_run_dir_is_named(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints").chmod(0o500)
    try:
        with pytest.raises(SoupError, match="not writable") as err:
            save_checkpoint(tmp_path / "checkpoints", 1, *fresh(), {"step": 1}, keep_last=1)
        assert str(tmp_path / "checkpoints" / "step-1") in str(err.value)
    finally:
        (tmp_path / "checkpoints").chmod(0o700)


def test_a_new_checkpoint_is_never_pruned_for_a_higher_numbered_one(tmp_path):
    """After resume=auto skipped a corrupt step-2, the resumed run's step-1 save with
    keep_last=1 must not delete step-1 itself to keep the corrupt step-2."""
    model, opt, sched = fresh()
    save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2}, keep_last=1)
    save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-2"]


# A real full or read-only disk: a small tmpfs in a private mount namespace (needs root and
# unshare; skipped elsewhere). It pins the errors torch and safetensors really raise.
def fill_disk_then_save(disk: str, free_pages: str) -> None:
    """Run in the namespace: a good checkpoint, the disk filled but `free_pages` (or made
    read-only: "ro"), a second save; prints what it raised and what is left, as JSON."""
    disk_path = Path(disk)
    model, opt, sched = fresh()
    step(model, opt, sched)
    save_checkpoint(disk_path / "checkpoints", 1, model, opt, sched, {"step": 1}, keep_last=1)
    n = 0
    try:
        while True:  # pages of filler, so that a few can be given back
            (disk_path / f"fill-{n}").write_bytes(b"\0" * 4096)
            n += 1
    except OSError:
        pass
    if free_pages == "ro":
        subprocess.run(["mount", "-o", "remount,ro", disk], check=True)
    else:
        for i in range(int(free_pages) + 1):  # + the one the failed write may have half-taken
            (disk_path / f"fill-{n - i}").unlink(missing_ok=True)
    step(model, opt, sched)
    try:
        save_checkpoint(disk_path / "checkpoints", 2, model, opt, sched, {"step": 2}, keep_last=1)
    except SoupError as exc:
        left = sorted(p.name for p in (disk_path / "checkpoints").iterdir())
        print(json.dumps({"error": str(exc), "cause": repr(exc.__cause__), "left": left,
                          "step-1": verify_checkpoint(disk_path / "checkpoints" / "step-1")}))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
@pytest.mark.parametrize("free_pages, says, raised", [
    ("0", "no space left on device", "SafetensorError"),  # the first file written: model.safetensors
    ("1", "no space left on device", "RuntimeError"),  # the weights fit; torch.save of the optimizer does not
    ("ro", "not writable", "OSError"),
])
def test_a_real_full_or_read_only_disk(tmp_path, free_pages, says, raised):
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=256k tmpfs {disk} || exit 97; exec {sys.executable} -c "
              f"'from tests.integration.test_checkpoint_faults import fill_disk_then_save as f; "
              f"f(\"{disk}\", \"{free_pages}\")'")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), timeout=120)
    if proc.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert says in result["error"] and str(disk / "checkpoints" / "step-2") in result["error"]
    assert result["cause"].startswith(raised)
    assert result["left"] == ["step-1"] and result["step-1"] is None


# --- through a real run: corrupt newest checkpoint, atomic final/, crafted file via the CLI ------
RUN = ["debug=tiny", "train.max_steps=8", "train.save_every_steps=4", "train.keep_last_checkpoints=5",
       "train.eval_every_steps=0"]


def train(run_dir: Path, *overrides: str):
    return run_in_process(run_dir, [*RUN, *overrides])


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A finished 8-step run with checkpoints at steps 4 and 8."""
    run_dir = tmp_path_factory.mktemp("straight")
    train(run_dir)
    return run_dir


def unfinished_copy(run: Path, target: Path) -> Path:
    """`run` as if killed after its last checkpoint, before final/: resume=auto resumes it."""
    shutil.copytree(run, target)
    shutil.rmtree(target / "final")
    (target / "run.json").unlink()
    return target


@pytest.mark.slow
def test_a_run_resumes_past_a_corrupt_newest_checkpoint_bit_identically(straight, tmp_path, capsys):
    broken = unfinished_copy(straight, tmp_path / "broken")
    truncate(broken / "checkpoints" / "step-8" / "model.safetensors")
    capsys.readouterr()
    train(broken, "resume=auto")
    out = capsys.readouterr().out
    assert f"skipping corrupt checkpoint {broken / 'checkpoints' / 'step-8'}" in out
    assert f"resumed from {broken / 'checkpoints' / 'step-4'} at step 4" in out
    a, b = load_file(str(straight / "final" / "model.safetensors")), load_file(str(broken / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((broken / "run.json").read_text())["stats"]["steps"] == 8
    assert verify_checkpoint(broken / "checkpoints" / "step-8") is None  # rewritten whole


@pytest.mark.slow
def test_resume_of_a_crafted_checkpoint_exits_2_and_runs_nothing(straight, tmp_path):
    """The reported attack, as a user meets it: a crafted rng.pt, resume=auto, the CLI."""
    from tests.conftest import run_cli

    run_dir = unfinished_copy(straight, tmp_path / "run")
    newest = run_dir / "checkpoints" / "step-8"
    marker = tmp_path / "pwned"
    with open(newest / "rng.pt", "wb") as f:
        pickle.dump(Payload(marker), f)
    write_manifest(newest)
    proc = run_cli(*RUN, f"hydra.run.dir={run_dir}", "resume=auto", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "will not unpickle" in proc.stderr and str(newest / "rng.pt") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()


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
