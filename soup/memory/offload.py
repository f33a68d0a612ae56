"""Activation offloading: tensors saved for backward leave the device during forward.

Autograd keeps, for every op, the tensors its backward needs ("saved tensors"); with
long sequences these activations dominate training memory. A pair of
torch.autograd.graph.saved_tensors_hooks moves each one out when forward saves it
(pack) and brings it back when backward needs it (unpack), so peak memory holds
about one block's activations instead of all of them.

    kind=cpu   CUDA tensors go to pinned host memory (copy non_blocking on the current
               stream, so stream order keeps it correct) and return on unpack. CUDA only.
    kind=disk  each tensor goes to its own file in scratch_dir: created exclusively
               (O_CREAT | O_EXCL, mode 0o600; the descriptor stays open until torch.save
               has written it, so no other file can take its place), read back with
               torch.load(weights_only=True) (no arbitrary unpickling) and deleted
               right after. The scratch dir must resolve inside the run dir.

Kept in memory: tensors below min_bytes, weights (nn.Parameters, trainable leaves and
views of them: they live anyway, so copying them out would only cost time), tensor
subclasses and sparse tensors. A tensor saved by several ops (a block's normed input
feeds q, k and v) is written once and shared. Offloading is synchronous: it trades
throughput for memory.

Use: the offload wraps the model (memory features wrap the model, not the loop):

    offload = ActivationOffload("disk", run_dir / "offload_scratch", run_dir)
    handle = wrap_model_forward(model, offload)
    try:
        ...train (forward inside the hooks, backward reads the files back)...
    finally:
        handle.remove()
        offload.close()
    log(offload.summary())

`with offload:` alone also works around any forward. An exception raised inside it
removes every file at once; close() (idempotent) and an atexit fallback remove the
rest, and the scratch dir when we created it and it is empty. Under checkpointing,
checkpointed blocks keep only their inputs (held by the checkpoint, not saved
tensors), so offloading acts on the rest of the model.

Backward twice over one graph (retain_graph=True) is not supported with kind=disk:
each file is read once.
"""

from __future__ import annotations

import atexit
import copy
import os
import secrets
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

from soup.errors import ConfigError

KINDS = ("cpu", "disk")


def _file_name() -> str:
    return f"act-{secrets.token_hex(8)}.pt"


def _is_weight(tensor: torch.Tensor) -> bool:
    """A parameter, a trainable leaf, or a view of one (Linear saves weight.t())."""
    base = tensor._base if tensor._base is not None else tensor
    return isinstance(tensor, nn.Parameter) or isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)


def _contained_scratch_dir(scratch_dir: Path, run_dir: Path) -> Path:
    """scratch_dir (relative ones are under run_dir), resolved; it must lie inside run_dir."""
    run = Path(run_dir).resolve()
    scratch = Path(scratch_dir)
    if not scratch.is_absolute():
        scratch = run / scratch
    resolved = scratch.resolve()  # follows symlinks, so a link out of the run dir is caught
    if resolved != run and run not in resolved.parents:
        raise ValueError(
            f"offload.scratch_dir: {scratch_dir} resolves to {resolved}, outside the run directory {run}.\n"
            "  fix: give a path inside the run directory (relative paths are taken from it), e.g. offload_scratch."
        )
    return resolved


class _Offloaded:
    """What pack returns for an offloaded tensor; shared by every op that saved it."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.pending_unpacks = 1
        self.consumed = False  # disk: read back by every saver and deleted


class _OnHost(_Offloaded):
    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor.numel() * tensor.element_size())
        self.device = tensor.device
        # Contiguous pinned copy, as torch.autograd.graph.save_on_cpu makes; the copy is
        # queued on the current stream, so kernels that later reuse the freed GPU block
        # run after it, and backward's copy back runs on that same stream.
        self.host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)

    def load(self) -> torch.Tensor:
        return self.host.to(self.device, non_blocking=True)


class _OnDisk(_Offloaded):
    def __init__(self, path: Path, nbytes: int, offload: ActivationOffload):
        super().__init__(nbytes)
        self.path, self.offload = path, offload
        self.tensor: torch.Tensor | None = None  # read back, held until every saver has unpacked it
        self.lock = threading.Lock()  # CUDA backward unpacks on autograd's device threads
        # A graph freed without backward (forward under grad, then no backward) drops
        # this object: its file goes with it.
        weakref.finalize(self, offload._remove_file, path, nbytes)

    def load(self) -> torch.Tensor:
        with self.lock:
            if self.tensor is None:
                if self.consumed or not self.path.exists():
                    raise RuntimeError(
                        f"offloaded activation {self.path.name} was already read back and deleted (or the offload was "
                        "closed); backward twice over one graph (retain_graph=True) is not supported with offload=disk"
                    )
                self.tensor = torch.load(self.path, weights_only=True)
                self.offload._remove_file(self.path, self.nbytes)
            tensor = self.tensor
            self.pending_unpacks -= 1
            if self.pending_unpacks == 0:
                self.tensor, self.consumed = None, True
            return tensor


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks that move activations to pinned host memory or disk.

    kind: cpu | disk. scratch_dir: where disk files go (relative to run_dir when not
    absolute); must resolve inside run_dir, else ValueError. min_bytes: smaller saved
    tensors stay in memory. `with offload:` applies the hooks to the forward inside;
    summary() is a line for the run log.
    """

    def __init__(self, kind: str, scratch_dir: Path | None = None, run_dir: Path | None = None, min_bytes: int = 1024):
        if kind not in KINDS:
            raise ConfigError(f"offload={kind!r} is not an offload kind.\n  fix: choose one of {', '.join(KINDS)} (or none).")
        if kind == "cpu" and not torch.cuda.is_available():
            raise ConfigError(
                "offload=cpu moves CUDA activations to pinned host memory, but no CUDA device is available "
                "(on a CPU-only machine activations already live in host memory).\n"
                "  fix: offload=disk to put them on disk, or offload=none."
            )
        super().__init__(self._pack, self._unpack)
        self.kind, self.min_bytes = kind, min_bytes
        self.scratch_dir: Path | None = None
        self._created_dir = False
        self._lock = threading.Lock()
        self._live_files: set[Path] = set()
        self._recent: dict[int, tuple[weakref.ref, int, _Offloaded]] = {}
        self._closed = False
        self._pid = os.getpid()
        self.offloaded_tensors = self.offloaded_bytes = self.shared_saves = self.kept_tensors = 0
        self.live_bytes = self.peak_live_bytes = 0
        if kind == "disk":
            if scratch_dir is None or run_dir is None:
                raise ValueError("offload=disk needs scratch_dir and run_dir")
            self.scratch_dir = _contained_scratch_dir(scratch_dir, run_dir)
            if not self.scratch_dir.exists():
                self.scratch_dir.mkdir(mode=0o700, parents=True)
                self._created_dir = True
        atexit.register(self.close)

    # --- the hooks -------------------------------------------------------------------

    def _pack(self, tensor: torch.Tensor):
        if self._closed:
            raise RuntimeError("ActivationOffload is closed; a forward ran after close()")
        nbytes = tensor.numel() * tensor.element_size()
        # Tensor subclasses (torchao float8, NF4) stay: torch.load(weights_only=True)
        # would refuse them, and a plain copy would drop what makes them special.
        if (nbytes < self.min_bytes or _is_weight(tensor)
                or type(tensor) is not torch.Tensor or tensor.layout is not torch.strided
                or (self.kind == "cpu" and tensor.device.type != "cuda")):
            self.kept_tensors += 1
            # detach: a packed value holding the tensor itself would make a reference
            # cycle through its grad_fn (see saved_tensors_hooks' docs).
            return tensor.detach()
        seen = self._recent.get(id(tensor))
        # The same live, unmodified tensor saved again (q, k and v all save their input):
        # share the copy. A tensor kept across steps may have had its copy consumed.
        if seen is not None and seen[0]() is tensor and seen[1] == tensor._version and not seen[2].consumed:
            record = seen[2]
            record.pending_unpacks += 1
            self.shared_saves += 1
            return record
        record = _OnHost(tensor) if self.kind == "cpu" else self._write(tensor, nbytes)
        key = id(tensor)
        self._recent[key] = (weakref.ref(tensor, lambda _, key=key: self._recent.pop(key, None)), tensor._version, record)
        self.offloaded_tensors += 1
        self.offloaded_bytes += nbytes
        return record

    def _unpack(self, packed) -> torch.Tensor:
        return packed.load() if isinstance(packed, _Offloaded) else packed

    # --- disk files ------------------------------------------------------------------

    def _write(self, tensor: torch.Tensor, nbytes: int) -> _OnDisk:
        tensor = tensor.detach()  # the data only: the graph is autograd's to keep
        if tensor.untyped_storage().nbytes() > nbytes:
            tensor = tensor.clone()  # a view of a bigger buffer: torch.save would write all of it
        for _ in range(100):
            path = self.scratch_dir / _file_name()
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
            except FileExistsError:
                continue
            break
        else:
            raise FileExistsError(f"offload=disk: could not create a new file in {self.scratch_dir} after 100 names")
        with self._lock:
            self._live_files.add(path)
            self.live_bytes += nbytes
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        with os.fdopen(fd, "wb") as f:
            torch.save(tensor, f)
        return _OnDisk(path, nbytes, self)

    def _remove_file(self, path: Path, nbytes: int) -> None:
        with self._lock:
            if path not in self._live_files:
                return
            self._live_files.discard(path)
            self.live_bytes -= nbytes
        path.unlink(missing_ok=True)

    # --- lifetime --------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        super().__exit__(exc_type, exc, tb)
        if exc_type is not None:
            self.close()

    def close(self) -> None:
        """Remove every remaining file, and the scratch dir if we made it and it is empty."""
        if self._closed or os.getpid() != self._pid:  # a forked worker owns none of the files
            return
        self._closed = True
        atexit.unregister(self.close)
        with self._lock:
            paths, self._live_files = self._live_files, set()
            self.live_bytes = 0
        for path in paths:
            path.unlink(missing_ok=True)
        if self._created_dir:
            try:
                self.scratch_dir.rmdir()
            except OSError:  # not empty: something else wrote there; leave it
                pass

    @property
    def live_files(self) -> int:
        return len(self._live_files)

    def summary(self) -> str:
        """One line for the run log: what went where, and what stayed."""
        target = f"files in {self.scratch_dir}" if self.kind == "disk" else "pinned host memory"
        line = (f"offload: {self.kind}, {self.offloaded_tensors} activations ({self.offloaded_bytes / 1e6:.1f} MB) "
                f"to {target}; {self.shared_saves} repeat saves shared; "
                f"{self.kept_tensors} small or weight tensors kept in memory")
        if self.kind == "disk":
            line += f"; peak scratch {self.peak_live_bytes / 1e6:.1f} MB"
        return line


class _OffloadedForward:
    """A model's forward run inside the offload's hooks (a callable, so deepcopy rebinds it)."""

    def __init__(self, forward, offload: ActivationOffload):
        self.forward, self.offload = forward, offload

    def __call__(self, *args, **kwargs):
        with self.offload:
            return self.forward(*args, **kwargs)

    def __deepcopy__(self, memo):
        # A copied model (a frozen reference, say) shares the run's offload and its files.
        return _OffloadedForward(copy.deepcopy(self.forward, memo), self.offload)


class OffloadHandle:
    """Returned by wrap_model_forward; remove() gives the model its own forward back."""

    def __init__(self, model: nn.Module):
        self.model = model

    def remove(self) -> None:
        if isinstance(self.model.__dict__.get("forward"), _OffloadedForward):
            del self.model.forward


def wrap_model_forward(model: nn.Module, offload: ActivationOffload) -> OffloadHandle:
    """Run every `model(...)` forward inside `offload`'s hooks; backward reads the activations back."""
    if isinstance(model.__dict__.get("forward"), _OffloadedForward):
        raise ValueError(f"{type(model).__name__}'s forward is already wrapped by an ActivationOffload")
    model.forward = _OffloadedForward(model.forward, offload)
    return OffloadHandle(model)
