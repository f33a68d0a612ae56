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

Under parallelism=fsdp2 the weights and the optimizer state are torch.distributed.checkpoint
shards instead (.metadata and one .distcp file per rank, in place of model.safetensors and
optimizer.pt), written by every rank and listed in the same manifest (soup/fsdp.py); under
deepspeed_zero2/3 they are DeepSpeed's partition files in zero/ (soup/zero.py).

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
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from soup.errors import SoupError

_STEP_DIR = re.compile(r"^step-(\d+)$")
REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
RUN_STATE_FILES = ("scheduler.pt", "rng.pt", "trainer_state.json")


def checkpoint_kind(path: Path) -> str:
    """plain (model.safetensors, optimizer.pt), fsdp2 (torch.distributed.checkpoint shards) or
    deepspeed (DeepSpeed's partitions in zero/)."""
    if (path / ".metadata").is_file():
        return "fsdp2"
    if (path / "zero").is_dir():
        return "deepspeed"
    return "plain"


def required_files(path: Path) -> tuple[str, ...]:
    return {"plain": REQUIRED_FILES, "fsdp2": (".metadata", *RUN_STATE_FILES),
            "deepspeed": RUN_STATE_FILES}[checkpoint_kind(path)]
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

    Only an OSError carries an errno: safetensors wraps it in a SafetensorError ("I/O error:
    No space left on device (os error 28)") and torch.save drops it, raising a RuntimeError
    whose text depends on where the write failed, so the text is read too."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    kept = "nothing half-written was left, and what was there before is untouched"
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota exceeded" in text or (
            isinstance(exc, RuntimeError) and any(failed in text for failed in _TORCH_WRITE_FAILED)):
        try:
            free = f"{shutil.disk_usage(_existing_parent(path)).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        first_line = text.strip().splitlines()[0][:160] if text.strip() else exc.__class__.__name__
        return SoupError(f"{path}: no space left on device ({free}; {first_line}) while writing it; {kept}.\n"
                         "  fix: free space there (or point hydra.run.dir at a disk with room), then resume=auto.")
    if code in (errno.EACCES, errno.EROFS, errno.EPERM) or "Permission denied" in text or "Read-only" in text:
        return SoupError(f"{path}: the folder is not writable ({exc.__class__.__name__}: {text}); {kept}.\n"
                         "  fix: make it writable (or point hydra.run.dir at a writable folder), then resume=auto.")
    return None


# What torch.save raised on a full tmpfs: a write that fell short, a failed write, a failed flush.
_TORCH_WRITE_FAILED = ("unexpected pos", "write failed", "iostream error")


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
        error = storage_error(exc, final)
        if error is not None:
            raise error from exc
        raise
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
        # Any Exception: safetensors reports a full disk as a SafetensorError, not an OSError.
        error = storage_error(exc, final) if isinstance(exc, Exception) else None
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
        save_tensors(optimizer.state_dict(), tmp / "optimizer.pt")
        _write_run_state(tmp, scheduler, trainer_state, extra_state)
    _prune(checkpoints_dir, keep_last, final)
    return final


def _write_run_state(tmp: Path, scheduler, trainer_state: dict, extra_state: dict | None) -> None:
    """What every checkpoint holds besides the weights and optimizer state, then the manifest."""
    save_tensors(scheduler.state_dict(), tmp / "scheduler.pt")
    save_tensors(capture_rng(), tmp / "rng.pt")
    if extra_state:
        save_tensors(extra_state, tmp / "extra.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    write_manifest(tmp)


def _prune(checkpoints_dir: Path, keep_last: int, newest: Path) -> None:
    """Only once `newest` is complete; and never `newest` itself, which a higher-numbered
    checkpoint (a corrupt one resume=auto skipped) would otherwise push out with keep_last=1."""
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def save_sharded_checkpoint(checkpoints_dir: Path, step: int, write_shards, scheduler, trainer_state: dict,
                            keep_last: int, extra_state: dict | None = None) -> Path | None:
    """save_checkpoint for a model sharded across ranks (fsdp2, deepspeed); every rank calls it.
    Rank 0 opens the temporary directory and tells the others; all write their shards into it
    (write_shards(directory)); rank 0 adds its files and the manifest, then renames and
    prunes as save_checkpoint does."""
    from soup.distributed import barrier, broadcast_from_main, current_world

    final = checkpoints_dir / f"step-{step}"
    if not current_world().is_main:
        write_shards(Path(broadcast_from_main(None)))
        barrier()  # rank 0 writes the rest and renames
        barrier()
        return None
    with atomic_directory(final) as tmp:
        write_shards(Path(broadcast_from_main(str(tmp))))
        barrier()
        _write_run_state(tmp, scheduler, trainer_state, extra_state)
    _prune(checkpoints_dir, keep_last, final)
    barrier()
    return final


def save_tensors(state, path: Path) -> None:
    """torch.save, after checking `state` holds only what load_tensors will load back.

    A Python object in a state dict (an optimizer's helper, a numpy scalar) would save
    fine and be refused on resume, days later; a soup bug, so it fails the first save."""
    where = _unloadable(state, "")
    if where is not None:
        raise TypeError(f"{path}: {where} cannot be saved in a checkpoint: torch.load(weights_only=True) "
                        "loads tensors and plain values only. Convert it in its owner's state_dict "
                        "(as soup/optim.py does for GaLore's projector).")
    torch.save(state, path)


_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.device)


def _unloadable(value, where: str) -> str | None:
    """Where in `value` something torch.load(weights_only=True) refuses sits, else None."""
    # Exact types: numpy.float64 is a float and an IntEnum an int, yet both pickle as globals.
    # A tensor subclass is trusted to register itself with torch (DTensor does).
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):
        return None
    if type(value) in (dict, OrderedDict):
        items = value.items()
    elif type(value) in (list, tuple, set):
        items = enumerate(value)
    else:
        return f"{where or 'the state'} (a {type(value).__module__}.{type(value).__qualname__})"
    for key, item in items:
        found = _unloadable(key, f"{where}[{key!r}] key") if type(value) in (dict, OrderedDict) else None
        found = found or _unloadable(item, f"{where}[{key!r}]")
        if found:
            return found
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
                for p in files}
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

    With a manifest (every checkpoint soup writes) each file's size and sha256 must match.
    An older checkpoint without one needs its files present, a trainer_state.json that
    parses and a model.safetensors whose header fits its length; a truncated .pt file in
    it is named when it loads."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist or is not a directory"
    missing = [name for name in required_files(path) if not (path / name).is_file()]
    if missing:
        return f"{path} is not a complete checkpoint (missing {', '.join(missing)})"
    signature = _signature(path)
    if _VERIFIED.get(path.resolve()) == signature:
        return None
    reason = _manifest_problem(path) if (path / MANIFEST).is_file() else _legacy_problem(path)
    if reason is None:
        _VERIFIED[path.resolve()] = signature
    return reason


# resolve_resume verifies the checkpoint it picks and load_checkpoint verifies it again; for a
# large one hashing takes a minute, so a success is remembered while no file's size or mtime changes.
_VERIFIED: dict[Path, tuple] = {}


def _signature(path: Path) -> tuple:
    return tuple(sorted((f.relative_to(path).as_posix(), f.stat().st_size, f.stat().st_mtime_ns)
                        for f in path.rglob("*") if f.is_file()))


def _manifest_problem(path: Path) -> str | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in manifest.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{path / MANIFEST} is unreadable or malformed ({exc.__class__.__name__}: {exc})"
    unlisted = [name for name in required_files(path) if name not in expected]
    if unlisted:
        return f"{path / MANIFEST} does not list {', '.join(unlisted)} (altered)"
    for name, (size, digest) in expected.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} is {file.stat().st_size} bytes, but {size} were written (truncated or altered)"
        if _sha256(file) != digest:
            return f"{file} does not match the checksum written with it (corrupt or altered)"
    return None


def _legacy_problem(path: Path) -> str | None:
    """What the cheap checks find wrong in a checkpoint written before manifests."""
    try:
        _json_object(path / "trainer_state.json")
    except (OSError, ValueError) as exc:
        return f"{path / 'trainer_state.json'} is unreadable or truncated ({exc})"
    try:
        with safe_open(str(path / "model.safetensors"), framework="pt"):  # reads the header only
            pass
    except (SafetensorError, OSError) as exc:
        return f"{path / 'model.safetensors'} is truncated or not a safetensors file ({exc})"
    return None


def resolve_resume(resume: str | None, checkpoints_dir: Path) -> Path | None:
    """The checkpoint a run resumes from.

    None: a fresh run. "auto": the newest intact checkpoint in `checkpoints_dir`, each newer
    corrupt one skipped with a warning; None when the folder holds none (the run starts
    fresh), a SoupError when it holds only corrupt ones (starting over would bury them).
    A path: that checkpoint, or a SoupError naming what is wrong with it."""
    if resume is None:
        return None
    if resume != "auto":
        return _explicit_checkpoint(Path(resume))
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


def _explicit_checkpoint(path: Path) -> Path:
    reason = verify_checkpoint(path)
    if reason is None:
        return path
    newest = latest_checkpoint(path / "checkpoints")
    if newest is not None:  # the run directory instead of one of its checkpoints
        raise SoupError(f"resume={path}: that is a run directory, not a checkpoint.\n  fix: resume={newest} "
                        f"(its newest), or resume=auto with hydra.run.dir={path}.")
    raise SoupError(f"resume={path}: {reason}.\n  fix: resume from another checkpoint of the run "
                    "(or resume=auto, which picks the newest intact one).")


# --------------------------------------------------------------------------- loading
def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler,
                    load_shards=None) -> tuple[dict, dict]:
    """Restore weights, optimizer, scheduler and RNG from `path`; return (trainer_state, extra_state).
    load_shards(path): how a run whose model is sharded across ranks reads its weights and
    optimizer state (fsdp2, deepspeed; None for one whole model).

    Every failure is a SoupError naming the file: corrupt, crafted, or from another model."""
    path = Path(path)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise SoupError(f"resume: {reason}.\n  fix: point resume at an intact checkpoints/step-N directory, "
                        "or use resume=auto.")
    trainer_state = _read_json(path / "trainer_state.json")
    kind = checkpoint_kind(path)
    if (kind == "plain") != (load_shards is None):
        raise SoupError(f"resume: {path} was written by " + ("one whole model" if kind == "plain" else
                        f"parallelism={kind}'s shards") + ", and this run keeps its model otherwise.\n"
                        "  fix: resume with the parallelism and number of ranks that wrote it.")
    if load_shards is not None:
        load_shards(path)
    else:
        _copy_weights(path, _read_safetensors(path / "model.safetensors"), model)
        _restore(path / "optimizer.pt", optimizer.load_state_dict, "this optimizer (optim settings, trainable weights)")
    _restore(path / "scheduler.pt", scheduler.load_state_dict, "this lr schedule")
    _restore(path / "rng.pt", restore_rng, "the generator states soup writes")
    extra = load_tensors(path / "extra.pt") if (path / "extra.pt").exists() else {}
    return trainer_state, extra


def _restore(file: Path, load_state, what: str) -> None:
    """load_state(load_tensors(file)), a state of another shape named with the file."""
    state = load_tensors(file)
    try:
        load_state(state)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise SoupError(f"resume: {file} does not fit {what} ({exc.__class__.__name__}: {exc}).\n"
                        f"  fix: resume with the settings the checkpoint was written with (its config is in "
                        f"{file.parent / 'trainer_state.json'}), or start a new run in another hydra.run.dir.") from exc


def load_tensors(path: Path):
    """torch.load with weights_only=True (tensors and plain containers, no code), errors named."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if path.name == "rng.pt" and "numpy" in str(exc):
            # The first soup pickled np.random.get_state() (a numpy array) into rng.pt.
            raise SoupError(f"resume: {path} was written by an older soup, which stored generator states as "
                            "numpy objects that soup no longer unpickles.\n  fix: start the run again, or resume "
                            "with the soup version that wrote it.") from exc
        raise SoupError(
            f"resume: {path} holds Python objects that soup will not unpickle (torch.load weights_only=True "
            f"refused it: {_refusal(exc)}). Checkpoints soup writes hold only tensors and plain values, so this file "
            "was altered or crafted; nothing in it ran.\n  fix: delete that checkpoint and resume from another "
            "(resume=auto or resume=<run dir>/checkpoints/step-N); resume only checkpoints you trust."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SoupError(f"resume: {path} is unreadable or corrupt ({exc.__class__.__name__}: {exc}).\n"
                        "  fix: delete that checkpoint and resume from another (resume=auto).") from exc


def _refusal(exc: Exception) -> str:
    """The line of torch's weights_only refusal that says what it refused; the rest is boilerplate."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    return (specific or lines or [exc.__class__.__name__])[0][:200]


def _json_object(path: Path) -> dict:
    """The JSON object in `path`; OSError or ValueError (bad UTF-8, bad JSON, not an object)."""
    state = json.loads(path.read_text())
    if not isinstance(state, dict):
        raise ValueError(f"a JSON {type(state).__name__}, not an object")
    return state


def _read_json(path: Path) -> dict:
    try:
        return _json_object(path)
    except (OSError, ValueError) as exc:
        raise SoupError(f"resume: {path} is unreadable or corrupt ({exc}).\n"
                        "  fix: delete that checkpoint and resume from another (resume=auto).") from exc


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SoupError(f"resume: {path} is corrupt (truncated or not a safetensors file: {exc}).\n"
                        "  fix: delete that checkpoint and resume from another (resume=auto).") from exc


def _copy_weights(path: Path, saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Copy the checkpoint's tensors into `model`, after checking they are the ones it trains,
    with the same shapes and dtypes (copy_ would cast a dtype silently, and resume is exact)."""
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
    mismatched = [f"{name}: {_describe(tensor)} in the checkpoint, {_describe(state[name])} in this model"
                  for name, tensor in saved.items()
                  if tensor.shape != state[name].shape or tensor.dtype != state[name].dtype]
    if mismatched:
        more = f"  (and {len(mismatched) - 3} more)\n" if len(mismatched) > 3 else ""
        raise SoupError(f"resume: {path} was written by a model of another shape or dtype:\n"
                        + "".join(f"  - {m}\n" for m in mismatched[:3]) + more + fix)
    with torch.no_grad():
        for name, tensor in saved.items():
            target = params[name] if name in params else state[name]
            target.copy_(tensor)


def _describe(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


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
