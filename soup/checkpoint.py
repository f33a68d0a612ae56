"""Atomic checkpoints and exact resume.

A checkpoint is written into a temporary directory beside its final place and
renamed when complete, so checkpoints/step-N/ either holds everything or does not
exist; a crash mid-save leaves only a .tmp-* directory, removed on the next save.

checkpoints/step-N/
    model.safetensors   trainable weights (all weights for a full fine-tune)
    optimizer.pt        optimizer state
    scheduler.pt        lr scheduler state
    rng.pt              python, numpy, torch (CPU and CUDA) generator states
    trainer_state.json  step, sampler position, counters
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from soup.errors import SoupError

_STEP_DIR = re.compile(r"^step-(\d+)$")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint must hold: parameters that train, plus buffers for a full fine-tune.

    Frozen weights are rebuilt from the base model (or the seed) on resume.
    """
    params = dict(model.named_parameters())
    if all(p.requires_grad for p in params.values()):
        state = model.state_dict()
    else:
        state = {name: p for name, p in params.items() if p.requires_grad}
    # safetensors refuses tensors that share memory (tied embeddings): keep one name per storage.
    unique, seen = {}, set()
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach().contiguous().cpu()
    return unique


def capture_rng() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    """Write checkpoints_dir/step-<step> atomically and prune to the newest `keep_last`."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    _remove_partial(checkpoints_dir)
    final = checkpoints_dir / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step}-", dir=checkpoints_dir))
    try:
        save_file(trainable_state(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(capture_rng(), tmp / "rng.pt")
        if extra_state:
            torch.save(extra_state, tmp / "extra.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _fsync_dir_files(tmp)
        if final.exists():  # the same step saved twice (e.g. a signal right after a save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(checkpoints_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore weights, optimizer, scheduler and RNG from `path`; return (trainer_state, extra_state)."""
    required = ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"]
    missing = [name for name in required if not (path / name).exists()]
    if missing:
        raise SoupError(f"resume: {path} is not a complete checkpoint (missing {', '.join(missing)}).\n"
                        "  fix: point resume at a checkpoints/step-N directory, or use resume=auto.")
    saved = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    state = model.state_dict()
    unknown = [name for name in saved if name not in state]
    if unknown:
        raise SoupError(f"resume: {path} holds weights this model does not have ({unknown[:3]} ...).\n"
                        "  fix: resume with the same model and peft settings the checkpoint was written with.")
    with torch.no_grad():
        for name, tensor in saved.items():
            target = params[name] if name in params else state[name]
            target.copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    restore_rng(torch.load(path / "rng.pt", weights_only=False))
    extra = torch.load(path / "extra.pt", weights_only=True) if (path / "extra.pt").exists() else {}
    return json.loads((path / "trainer_state.json").read_text()), extra


def _remove_partial(checkpoints_dir: Path) -> None:
    for leftover in checkpoints_dir.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(directory: Path) -> None:
    for file in directory.iterdir():
        _fsync(file)
    _fsync(directory)
