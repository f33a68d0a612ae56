"""What a run leaves behind: per-step metrics, peak memory, run.json and a loss plot.

`metrics.jsonl` is always written, one JSON object per `Tracker.log` call:

    {"step": 10, "split": "train", "loss": 2.31, "lr": 0.0003, "time": 1700000000.0}

It is the run's own record and needs nothing installed; TensorBoard and Weights &
Biases (`tracker=tensorboard|wandb`) are mirrors of it, imported only when asked for.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from soup.errors import ConfigError, require
from soup.precision import cpu_record

TRACKER_NAMES = ("jsonl", "tensorboard", "wandb")

# Packages whose versions decide whether a run reproduces; recorded in run.json.
RECORDED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "hydra-core",
    "omegaconf",
    "tokenizers",
    "safetensors",
    "numpy",
)

# Keys every metrics.jsonl line carries; a metric with one of these names would overwrite them.
_RESERVED_KEYS = ("step", "split", "time", "nonfinite")


# --------------------------------------------------------------------------- trackers


class Tracker:
    """Writes metrics to run_dir/metrics.jsonl and to the optional backend.

    Use as a context manager, or call `close()` (safe to call twice) in a `finally`,
    so a failing job in a Hydra multirun still flushes and closes its backend.
    """

    def __init__(self, run_dir: Path, backend: "_Backend | None" = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._backend = backend
        # Append: a resumed run continues the same file (see truncate_after).
        self._file = open(self.metrics_path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int, split: str = "train") -> None:
        """Record one step's metrics for `split` ("train" or "eval")."""
        if self._file is None:
            raise RuntimeError("Tracker.log called after close()")
        clashes = [k for k in metrics if k in _RESERVED_KEYS]
        if clashes:
            raise ValueError(f"metric names {clashes} are reserved in metrics.jsonl; rename them")

        values = {k: _to_number(v) for k, v in metrics.items()}
        row: dict[str, Any] = {"step": int(step), "split": split}
        # JSON has no NaN/inf, so they become null; `nonfinite` names them so a
        # diverged loss reads differently from a metric that was never logged.
        nonfinite = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
        row.update({k: (None if k in nonfinite else v) for k, v in values.items()})
        if nonfinite:
            row["nonfinite"] = nonfinite
        row["time"] = time.time()
        self._file.write(json.dumps(row) + "\n")
        # Flush every line: a killed run keeps everything up to its last step.
        self._file.flush()

        if self._backend is not None:
            self._backend.log(values, int(step), split)

    def truncate_after(self, step: int) -> None:
        """Drop metrics.jsonl lines with step > `step`.

        The loop calls this after restoring a checkpoint saved at `step`: the killed
        run had logged steps past its last checkpoint, and the resumed run logs them
        again, so without this the file would hold each of those steps twice.
        """
        if self._file is None:
            raise RuntimeError("Tracker.truncate_after called after close()")
        self._file.close()
        kept = [row for row in read_metrics(self.metrics_path) if row["step"] <= step]
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        os.replace(tmp, self.metrics_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if self._backend is not None:
            self._backend.truncate_after(step)

    def describe(self) -> str:
        """Where this run's metrics go, for the run log."""
        mirror = f", mirrored to {self._backend.describe()}" if self._backend is not None else ""
        return f"metrics -> {self.metrics_path}{mirror}"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class NullTracker(Tracker):
    """The tracker of a non-main process: accepts every call, writes nothing.

    Only rank 0 writes, so N processes do not interleave N copies of each line.
    """

    def __init__(self) -> None:  # no run dir, no file, no backend
        self._file = None
        self._backend = None

    def log(self, metrics: dict[str, float], step: int, split: str = "train") -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def describe(self) -> str:
        return "metrics: rank 0 writes them"


def open_tracker(
    tracker_cfg: Any,
    run_dir: Path,
    config: dict,
    *,
    is_main_process: bool = True,
    resume: bool = False,
) -> Tracker:
    """Open the tracker named by `tracker_cfg.name` (jsonl | tensorboard | wandb).

    `config` is the resolved config as a plain dict, handed to the backend so a
    run can be found by its hyperparameters. `resume=True` continues the previous
    wandb run of this run dir instead of starting a new one.
    """
    name = tracker_cfg.name
    if name not in TRACKER_NAMES:
        raise ConfigError(f"tracker={name} is not a tracker; choose one of: {', '.join(TRACKER_NAMES)}")
    if not is_main_process:
        return NullTracker()

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    backend: _Backend | None = None
    if name == "tensorboard":
        backend = _TensorBoardBackend(run_dir, config)
    elif name == "wandb":
        backend = _WandbBackend(run_dir, config, project=tracker_cfg.project, mode=tracker_cfg.mode, resume=resume)
    return Tracker(run_dir, backend)


class _Backend(abc.ABC):
    """A mirror of metrics.jsonl in an external viewer."""

    @abc.abstractmethod
    def log(self, metrics: dict[str, float], step: int, split: str) -> None:
        """Send one step's metrics to the viewer."""

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the run log: where the metrics go."""


class _TensorBoardBackend(_Backend):
    def __init__(self, run_dir: Path, config: dict):
        require("tensorboard", extra="tensorboard", wanted_by="tracker=tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self._SummaryWriter = SummaryWriter
        self.log_dir = run_dir / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._writer.add_text("config", "```\n" + json.dumps(_json_safe(config), indent=2, default=str) + "\n```")

    def log(self, metrics: dict[str, float], step: int, split: str) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(f"{split}/{key}", value, global_step=step)
        self._writer.flush()

    def truncate_after(self, step: int) -> None:
        # purge_step makes TensorBoard hide the killed run's events from step+1 on,
        # the same steps truncate_after removed from metrics.jsonl.
        self._writer.close()
        self._writer = self._SummaryWriter(log_dir=str(self.log_dir), purge_step=step + 1)

    def close(self) -> None:
        self._writer.close()

    def describe(self) -> str:
        return f"tensorboard -> {self.log_dir}"


class _WandbBackend(_Backend):
    def __init__(self, run_dir: Path, config: dict, *, project: str, mode: str, resume: bool):
        wandb = require("wandb", extra="wandb", wanted_by="tracker=wandb")
        # The run id lives in the run dir so that a resumed run (same dir) appends
        # to the same wandb run rather than opening a second one.
        id_path = run_dir / "wandb_run_id"
        run_id = id_path.read_text().strip() if resume and id_path.exists() else None
        self._run = wandb.init(
            project=project,
            mode=mode,
            dir=str(run_dir),
            config=_json_safe(config),
            id=run_id,
            resume="allow" if run_id else None,
        )
        id_path.write_text(self._run.id + "\n")
        self._mode = mode

    def describe(self) -> str:
        # Read back from the run wandb opened, not from the config we passed it.
        return f"wandb run {self._run.id}, project {self._run.project!r}, mode {self._mode} -> {self._run.dir}"

    def log(self, metrics: dict[str, float], step: int, split: str) -> None:
        self._run.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self._run.finish()


def _to_number(value: Any) -> int | float:
    """A Python int/float from an int, float, numpy scalar or 0-d tensor."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor):
        return value.item()
    return float(value)


def read_metrics(metrics_path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file, oldest first.

    A process killed mid-write can leave a torn last line; that one line is
    dropped. A bad line anywhere else means the file is corrupt and raises.
    """
    lines = Path(metrics_path).read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


# --------------------------------------------------------------------------- memory


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process on `device`, in MiB.

    CUDA: the caching allocator's peak of allocated tensors since the last
    `reset_peak_memory`. CPU: the peak resident set size of the whole process
    since it started (the OS keeps no resettable counter), so it includes Python,
    libraries and data, not just tensors.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux but in bytes on macOS.
    return max_rss / 2**20 if sys.platform == "darwin" else max_rss / 1024


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak window on CUDA; a no-op on CPU (RSS peak cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------- run record


def provenance() -> dict:
    """What produced a record (run.json, eval.json): soup/python/package versions, the git commit of
    the soup source (and whether it had uncommitted edits), the device, the host, the command line
    and the time."""
    import soup

    return {
        "soup_version": soup.__version__,
        "python_version": platform.python_version(),
        "packages": {name: _package_version(name) for name in RECORDED_PACKAGES},
        "git": git_state(Path(soup.__file__).parent),
        "device": _device_description(),
        "hostname": socket.gethostname(),
        "command": list(sys.argv),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_run_record(run_dir: Path, config: dict, stats: dict, data_files: list[str]) -> Path:
    """Write run_dir/run.json: what ran, where, on what data, and how it went.

    Enough to tell two runs apart months later: soup/python/package versions, the
    git commit of the soup source (and whether it had uncommitted edits), the
    device (with the CPU's torch capability and bf16 support), the command line,
    the resolved config, the caller's `stats` and a sha256 of every data file.
    Written atomically so a reader never sees half a file.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {
        **provenance(),
        "config": config,
        "stats": stats,
        "data_files": [_file_record(Path(p)) for p in data_files],
    }
    path = run_dir / "run.json"
    tmp = path.with_name(path.name + ".tmp")
    # _json_safe: a diverged run's final loss is NaN, which strict JSON cannot hold.
    tmp.write_text(json.dumps(_json_safe(record), indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(directory: Path) -> dict | None:
    """{"commit": sha, "dirty": bool} of the git checkout holding `directory`, or None.

    None when git is missing, `directory` is not in a checkout, the checkout has
    no commit yet, or git hangs (short timeout: a network filesystem must not
    stall the end of a run).
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=directory, capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    # Untracked files are left out: run outputs and scratch notes land in the
    # checkout without changing the code that ran.
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None else bool(status.strip())
    return {"commit": commit.strip(), "dirty": dirty}


def _device_description() -> dict:
    description: dict[str, Any] = {
        "cpu": _cpu_model(),
        # cpu_capability: torch's SIMD dispatch level; cpu_native_bf16 and cpu_bf16 (native | emulated |
        # slow | unknown): whether bf16 pays off on this CPU, which decides train.precision=auto.
        **cpu_record(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        description["cuda"] = {
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        }
    return description


def _cpu_model() -> str:
    # platform.processor() is often empty or just "x86_64" on Linux; /proc/cpuinfo names the part.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path.resolve()), "size_bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _json_safe(obj: Any) -> Any:
    """`obj` with NaN/inf floats replaced by None, recursively (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- plot


def plot_loss_curves(metrics_path: Path, png_path: Path, title: str | None = None) -> Path | None:
    """Plot train and eval `loss` against step from metrics.jsonl into a PNG, titled `title`
    (soup/train.py: task, model and run dir name; default: the run dir's name).

    Returns `png_path`, or None when the file has no finite loss to plot. Uses
    matplotlib's object API with the Agg canvas, so it never switches the global
    backend under a notebook or another caller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics_path = Path(metrics_path)
    curves: dict[str, tuple[list[int], list[float]]] = {"train": ([], []), "eval": ([], [])}
    for row in read_metrics(metrics_path):
        # Non-finite losses are null in the file and are left out of the curve.
        if row.get("split") in curves and row.get("loss") is not None:
            steps, losses = curves[row["split"]]
            steps.append(row["step"])
            losses.append(row["loss"])
    if not curves["train"][0] and not curves["eval"][0]:
        return None

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if curves["train"][0]:
        ax.plot(*curves["train"], label="train loss", linewidth=1.0)
    if curves["eval"][0]:
        ax.plot(*curves["eval"], label="eval loss", marker="o", linestyle="--")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or metrics_path.parent.name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    # The title goes into the PNG's metadata too, where tools (and tests) can read it.
    fig.savefig(png_path, metadata={"Title": title or metrics_path.parent.name})
    return png_path
