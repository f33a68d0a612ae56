"""Atomic, verified checkpoints and exact resume.

A checkpoint is written into a temporary directory beside its final place and
renamed when complete (atomic_directory), so checkpoints/step-N/ either holds
everything or does not exist; a crash mid-save leaves only a .tmp-* directory,
removed on the next save. The run's final/ model is written the same way.

checkpoints/step-N/
    model.safetensors   trainable weights (all weights for a full fine-tune)
    optimizer.pt        optimizer state
    scheduler.pt        lr scheduler state
    rng.pt              python, numpy, torch (CPU and CUDA) generator states, as tensors
    extra.pt            task state, grad scaler (when there is any)
    trainer_state.json  step, sampler position, counters, the config that wrote it
    manifest.json       size and sha256 of every file above, written last

Nothing here unpickles code: every .pt file loads with torch.load(weights_only=True),
which accepts tensors and plain containers only, so a crafted file is refused rather
than run. A resume verifies the manifest first: resume=auto skips a corrupt newest
checkpoint (with a warning naming it) for the newest intact one, and an explicit
resume=PATH refuses a corrupt one, naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from soup.errors import SoupError

_STEP_DIR = re.compile(r"^step-(\d+)$")
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
MANIFEST = "manifest.json"


def _trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold, one name per storage: parameters that train,
    plus buffers for a full fine-tune. Frozen weights are rebuilt from the base model
    (or the seed) on resume."""
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        state = model.state_dict()
    else:
        state = {name: p for name, p in params.items() if p.requires_grad}
    # safetensors refuses tensors that share memory (tied embeddings): keep one name per storage.
    unique, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = tensor
    return unique


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """_trainable_tensors, detached, contiguous and on the CPU, ready to save."""
    return {name: t.detach().contiguous().cpu() for name, t in _trainable_tensors(model).items()}


# --------------------------------------------------------------------------- RNG, as tensors
def capture_rng() -> dict:
    """Every generator's state as tensors and plain numbers (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- writing
def storage_error(exc: BaseException, path: Path) -> SoupError | None:
    """A SoupError naming `path` when `exc` is a full disk or a folder that cannot be written, else None.

    torch.save reports a failed write as a RuntimeError ("unexpected pos ...", "file write
    failed"), not an OSError, so its text is read too."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    fix_space = "free space there (or point hydra.run.dir at a disk with room), then resume=auto"
    if code == errno.ENOSPC or "No space left" in text or (isinstance(exc, RuntimeError) and
                                                          ("unexpected pos" in text or "write failed" in text)):
        try:
            free = f"{shutil.disk_usage(_existing_parent(path)).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        return SoupError(f"{path}: no space left on device ({free}) while writing it; the last complete "
                         f"checkpoint is kept.\n  fix: {fix_space}.")
    if code in (errno.EACCES, errno.EROFS, errno.EPERM) or "Permission denied" in text or "Read-only" in text:
        return SoupError(f"{path}: the folder is not writable ({exc.__class__.__name__}: {text}).\n"
                         "  fix: make it writable, or point hydra.run.dir at a writable folder.")
    return None


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it becomes `final` (replacing an
    old one only once the new one is complete), on failure it is removed. A full disk or a
    folder that cannot be written becomes a SoupError naming the path."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for leftover in final.parent.glob(f".tmp-{final.name}-*"):  # a crash mid-save left it
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    except OSError as exc:
        raise storage_error(exc, final) or exc
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # e.g. the same step saved twice, or a resumed run's new final/
            old = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-old-", dir=final.parent))
            os.rename(final, old / final.name)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = storage_error(exc, final) if isinstance(exc, (OSError, RuntimeError)) else None
        if error is not None:
            raise error from exc
        raise


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    keep_last: int,
    extra_state: dict | None = None,
) -> Path:
    """Write checkpoints_dir/step-<step> atomically and prune to the newest `keep_last`.

    Older checkpoints are pruned only after the new one is complete, so a failed save
    never costs the last good checkpoint."""
    final = checkpoints_dir / f"step-{step}"
    with atomic_directory(final) as tmp:
        for leftover in checkpoints_dir.glob(".tmp-step-*"):
            if leftover != tmp:
                shutil.rmtree(leftover, ignore_errors=True)
        save_file(trainable_state(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(capture_rng(), tmp / "rng.pt")
        if extra_state:
            torch.save(extra_state, tmp / "extra.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        write_manifest(tmp)
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --------------------------------------------------------------------------- finding and verifying
def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is an intact checkpoint, else what is wrong, naming the file.

    With a manifest (every checkpoint soup writes) each file's size and sha256 must match;
    an older checkpoint without one only needs its files present."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist or is not a directory"
    missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
    if missing:
        return f"{path} is not a complete checkpoint (missing {', '.join(missing)})"
    if not (path / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{path / MANIFEST} is unreadable ({exc})"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{file} is {size} bytes, but {expected['size']} were written (truncated or altered)"
        if _sha256(file) != expected["sha256"]:
            return f"{file} does not match the checksum written with it (corrupt or altered)"
    return None


def resolve_resume(resume: str | None, checkpoints_dir: Path) -> Path | None:
    """The checkpoint a run resumes from: None for a fresh run; resume=auto: the newest intact
    one in `checkpoints_dir` (None when there is none: the run starts fresh), skipping corrupt
    ones with a warning; resume=PATH: that checkpoint, refused when it is not intact."""
    if resume is None:
        return None
    if resume != "auto":
        reason = verify_checkpoint(Path(resume))
        if reason is not None:
            raise SoupError(f"resume={resume}: {reason}.\n  fix: resume from another checkpoint of the run "
                            "(or resume=auto, which picks the newest intact one).")
        return Path(resume)
    found = list_checkpoints(checkpoints_dir)
    if not found:
        print(f"[soup] resume=auto: no checkpoint in {checkpoints_dir}; starting fresh")
        return None
    for candidate in reversed(found):
        reason = verify_checkpoint(candidate)
        if reason is None:
            return candidate
        print(f"[soup] warning: skipping corrupt checkpoint {candidate}: {reason}")
    raise SoupError(f"resume=auto: no checkpoint in {checkpoints_dir} is intact (see the warnings above).\n"
                    "  fix: start the run again (overwrite=true without resume), or restore a checkpoint from a backup.")


# --------------------------------------------------------------------------- loading
def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore weights, optimizer, scheduler and RNG from `path`; return (trainer_state, extra_state)."""
    path = Path(path)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise SoupError(f"resume: {reason}.\n  fix: point resume at an intact checkpoints/step-N directory, "
                        "or use resume=auto.")
    trainer_state = _read_json(path / "trainer_state.json")
    saved = _read_safetensors(path / "model.safetensors")
    _copy_weights(path, saved, model)
    optimizer.load_state_dict(load_tensors(path / "optimizer.pt"))
    scheduler.load_state_dict(load_tensors(path / "scheduler.pt"))
    rng = load_tensors(path / "rng.pt")
    if not isinstance(rng.get("python"), dict):
        raise SoupError(f"resume: {path / 'rng.pt'} was written by an older soup, which stored generator states "
                        "as Python objects that soup no longer unpickles.\n  fix: start the run again, or resume "
                        "with the soup version that wrote it.")
    restore_rng(rng)
    extra = load_tensors(path / "extra.pt") if (path / "extra.pt").exists() else {}
    return trainer_state, extra


def load_tensors(path: Path):
    """torch.load with weights_only=True (tensors and plain containers, no code), errors named."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = str(exc).strip().splitlines()[0][:200]
        raise SoupError(
            f"resume: {path} holds Python objects that soup will not unpickle (torch.load weights_only=True "
            f"refused it: {refused}). Checkpoints soup writes hold only tensors and plain values, so this file "
            "was altered or crafted; nothing in it ran.\n  fix: delete that checkpoint and resume from another "
            "(resume=auto or resume=<run dir>/checkpoints/step-N); resume only checkpoints you trust."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SoupError(f"resume: {path} is unreadable or corrupt ({exc.__class__.__name__}: {exc}).\n"
                        "  fix: delete that checkpoint and resume from another (resume=auto).") from exc


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SoupError(f"resume: {path} is unreadable or corrupt ({exc}).\n"
                        "  fix: delete that checkpoint and resume from another (resume=auto).") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SoupError(f"resume: {path} is corrupt (truncated or not a safetensors file: {exc}).\n"
                        "  fix: delete that checkpoint and resume from another (resume=auto).") from exc


def _copy_weights(path: Path, saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Copy the checkpoint's tensors into `model`, after checking they are the ones it trains."""
    params = dict(model.named_parameters())
    state = model.state_dict()
    expected = _trainable_tensors(model)
    fix = ("  fix: resume with the model and peft settings the checkpoint was written with (its config is in "
           f"{path / 'trainer_state.json'}), or start a new run in another hydra.run.dir.")
    unknown = [name for name in saved if name not in state]
    if unknown:
        raise SoupError(f"resume: {path} holds weights this model does not have ({', '.join(unknown[:3])}"
                        f"{' ...' if len(unknown) > 3 else ''}).\n{fix}")
    absent = [name for name in expected if name not in saved]
    if absent:
        raise SoupError(f"resume: {path} lacks weights this model trains ({', '.join(absent[:3])}"
                        f"{' ...' if len(absent) > 3 else ''}).\n{fix}")
    mismatched = [f"{name}: {tuple(tensor.shape)} in the checkpoint, {tuple(state[name].shape)} in this model"
                  for name, tensor in saved.items() if tuple(tensor.shape) != tuple(state[name].shape)]
    if mismatched:
        raise SoupError(f"resume: {path} was written by a model of another shape:\n"
                        + "".join(f"  - {m}\n" for m in mismatched[:3]) + fix)
    with torch.no_grad():
        for name, tensor in saved.items():
            target = params[name] if name in params else state[name]
            target.copy_(tensor)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for file in directory.rglob("*"):
        _fsync(file)
    _fsync(directory)
