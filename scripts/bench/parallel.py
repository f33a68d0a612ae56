"""Per-rank memory and step time of soup's parallelism options: one process beside 2 ranks of ddp, fsdp2, ZeRO-2, ZeRO-3.

    python scripts/bench/parallel.py                   # CPU: 5 options x 2 allocators, ~3.5 min on a quiet 2-core machine
    python scripts/bench/parallel.py --options single fsdp2 --malloc default --measured-steps 2   # ~1 min
    python scripts/bench/parallel.py --micro-batch 8   # on a machine with >= 2 GPUs (nccl, train.device=cuda)

What runs (each in its own processes, one after the other, in one invocation):

    single            python scripts/bench/parallel.py --child ... -- <soup overrides> parallelism=single
                      train.micro_batch_size=2m
    ddp, fsdp2,       python -m torch.distributed.run --standalone --nproc_per_node 2 scripts/bench/parallel.py
    deepspeed_zero2,      --child ... -- <soup overrides> parallelism=<option> train.micro_batch_size=m
    deepspeed_zero3

`--child` runs soup's own entry point (`soup.train.cli`, what `python -m soup.train` runs)
with four soup functions wrapped to take readings: `train.train_loop` (memory when the loop
returns), `loop.reset_peak_memory` (called once as the loop starts: memory then, and a reset
of the RSS high-water mark), `loop.clipped_optimizer_step` and `zero.step` (the state count).
Each rank writes them to `rank<R>.json` when it exits. Training is unchanged; only the RSS
peak counter is reset, so soup's own `peak_memory_mb` in these runs is the loop's peak too.

Same for every run: soup's `model=tiny` Llama (hidden 768, MLP 2048, 8 layers, 12 heads,
4 KV heads, the byte tokenizer, tied embeddings: 50.55M parameters), `task=pretrain` on the
bundled demo text with `data.packing=true` (rows of up to 256 tokens; rank r of N takes the
r-th slice of the global batch, so every run trains the same rows: the script compares the
trained tokens of every step and the losses with the single process), fp32, the same global
batch (single: micro_batch_size 2m; each of 2 ranks m; --micro-batch m = 1), no accumulation,
AdamW (soup's default, fused), constant lr, seed 42, no eval (data.val_split=0), no
checkpoints (train.save_every_steps=0), `--warmup-steps` (2) then `--measured-steps` (4).
On CPU each rank gets cores / ranks threads (OMP_NUM_THREADS; the single process all cores),
so every run uses the whole machine; gloo on CPU, nccl on CUDA (soup picks the backend).

Figures, per run and per rank:

    setup peak     peak memory from the process's start to the loop's start: imports, data,
                   the full model (every rank builds it before it is sharded), sharding,
                   DeepSpeed's engine, the optimizer. CPU: VmHWM (/proc/self/status); CUDA:
                   torch.cuda.max_memory_allocated.
    loop peak      peak memory during the training steps alone. CPU: the RSS high-water mark
                   is reset when the loop starts (writing 5 to /proc/self/clear_refs) and VmHWM
                   is read when train_loop returns, before final/ is gathered (which on rank 0
                   builds one more full copy of the model). It is still a whole-process figure:
                   Python, torch, transformers, DeepSpeed and gloo, the data, activations and
                   allocator slack are in it. CUDA: max_memory_allocated after soup's own reset
                   at the loop's start.
    loop peak, mmap64k   (CPU, --malloc both) the same run again with MALLOC_MMAP_THRESHOLD_=65536.
                   glibc raises its mmap threshold (up to 32 MB) once large blocks are freed;
                   after that, blocks such as FSDP2's per-block all-gather and reduce-scatter
                   buffers come from heap arenas and stay resident after they are freed. With
                   a fixed threshold every block of 64 KiB or more is its own mapping, returned
                   on free, so this column is what the ranks use rather than what glibc kept.
                   These runs are not timed (no quiet wait, no retries).
    state          what the rank holds, counted from the objects at the optimizer step of warm-up
                   step `--snapshot-step` (2: gradients and AdamW's state both exist then), each
                   tensor storage once:
                     weights  the module's parameters as this rank holds them (a full copy, an
                              FSDP2 DTensor's local shard, a ZeRO-3 `ds_tensor` partition) and the
                              optimizer's own parameter tensors (DeepSpeed's fp32 master partition,
                              a second copy even in fp32)
                     grads    their .grad tensors and DeepSpeed's gradient partitions
                     optim    the optimizer's state (AdamW: exp_avg, exp_avg_sq)
                   state = weights + grads + optim, the part sharding divides. `expected` is the
                   textbook figure for P parameters and N ranks in fp32: single and ddp 16P
                   (4 weights + 4 grads + 8 AdamW); fsdp2 16P/N; ZeRO-2 4P + 16P/N (full weights,
                   fp32 master, grad and AdamW partitions); ZeRO-3 20P/N (weight partition, fp32
                   master, grads, AdamW).
    buffers        communication buffers the engine keeps between steps: DDP's gradient buckets
                   (held in C++, as many bytes as the gradients; from _get_ddp_logging_data),
                   DeepSpeed's tensors that are neither weights nor gradients, chiefly ZeRO-3's
                   reduce bucket (reduce_bucket_size, 5e8 elements by default: 1.9 GB allocated
                   per rank in fp32). The table shows the resident bytes: on CPU the pages of each
                   buffer that /proc/self/pagemap marks present (an untouched torch.empty costs
                   nothing); the JSON has the allocated bytes too. ZeRO-2 allocates its bucket
                   for each step's backward and drops it, so it is not there at the count.
    step time      mean of soup's `time/step_s` (metrics.jsonl: the loop's own timer around
                   data, forward, backward, communication and optimizer; not logging) over the
                   measured steps; `wall s` is the mean gap between consecutive metrics lines.
    tokens/s       trained tokens (metrics.jsonl `trained_tokens`, all ranks) over the measured
                   steps / the sum of their step times.
    load           CPU used by processes outside the run (torchrun and all its ranks are the
                   run) during the measured steps, as a share of all cores.

What sharding cuts and what it does not: with 2 ranks, fsdp2 and ZeRO-3 halve the weights,
gradients and optimizer state each rank holds (ZeRO-3 plus its fp32 master copy); ZeRO-2
halves the gradients and optimizer state but keeps full weights. Activations (each rank runs
m rows instead of 2m, so they follow the per-rank batch under every 2-rank option, ddp
included), the gathered block of the moment, the engines' buffers and the runtime (Python,
torch, transformers, DeepSpeed, gloo: several hundred MB per process, paid once per rank) are
not cut. So whole-process peak RSS falls by much less than half even where the state halves
exactly: read the halving in the state column, and in the loop peaks of ddp against fsdp2 and
zero3, not in peak / single. On a GPU the runtime is not in the device's memory and the peak
is closer to state + activations + buffers.

Throughput scaling needs GPUs: on this CPU the ranks share the cores the single process uses,
so the step-time ratio shows the cost of communication and of one thread per rank, not a
speed-up. With >= 2 GPUs the script runs unchanged (--device auto picks cuda when torch sees
one; --malloc is then ignored); with fewer GPUs than ranks the multi-rank rows are skipped and
say why.

Load handling as in sft.py for the timed runs: before each, it waits while another benchmark
of this folder runs (--others-pattern) and for --quiet-s of quiet, records the other
processes' CPU use during the measured steps, and re-runs a run above --max-other-load (up to
--max-tries); the JSON keeps every try. Writes --out (default /tmp/bench_parallel.json) after
every run, and each run's directory, log and per-rank readings under --scratch (default
/tmp/bench_parallel/).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# ~50M parameters with the byte tokenizer (tied embeddings): 8 x 6.29M per block + 0.2M embeddings.
MODEL_ARCH = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                  num_key_value_heads=4, max_position_embeddings=1024)
SEED = 42
OPTIONS = ("single", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
OTHER_BENCHMARKS = r"scripts/bench/(sft|dpo|grpo|memory|memory_ce|peft_variants|lora_rss)\.py"
MB = 2**20
STATE_PARTS = ("weights", "grads", "optim")


# =========================================================================== child: one rank


def memory_now() -> dict:
    """This process's memory right now: peak and current RSS (MiB), and on CUDA the allocator's peaks."""
    import resource

    import torch

    reading = {"ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        status = Path("/proc/self/status").read_text()
        for key in ("VmHWM", "VmRSS"):
            found = re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE)
            if found:
                reading[f"{key.lower()}_mb"] = int(found.group(1)) / 1024
    except OSError:  # not Linux: ru_maxrss is the same peak
        reading["vmhwm_mb"] = reading["ru_maxrss_mb"]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        reading.update(cuda_max_allocated_mb=torch.cuda.max_memory_allocated(device) / MB,
                       cuda_max_reserved_mb=torch.cuda.max_memory_reserved(device) / MB,
                       cuda_allocated_mb=torch.cuda.memory_allocated(device) / MB)
    return reading


def engine_category(path: str) -> str:
    """What a tensor DeepSpeed's ZeRO optimizer holds is, from its attribute path: reduce buckets,
    gradient partitions, weight partitions and fp32 master copies (ZeRO-3 hands its fp32 partitions to
    the optimizer only inside step()), or some other buffer."""
    lower = path.lower()
    if "ipg" in lower or "bucket" in lower:
        return "buffers"
    if "grad" in lower:
        return "grads"
    if any(word in lower for word in ("fp32", "bit16", "fp16", "partitioned_groups_flat")):
        return "weights"
    return "buffers"


def resident_bytes(storages: list[tuple[str, int, int]]) -> int:
    """How many bytes of these (device, address, bytes) storages are resident in RAM: on CPU, the pages
    /proc/self/pagemap marks present or swapped (an untouched torch.empty costs nothing); storages on
    a GPU, or where pagemap cannot be read, count whole."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    try:
        pagemap = open("/proc/self/pagemap", "rb")
    except OSError:
        return sum(size for _, _, size in storages)
    with pagemap:
        for device, address, size in storages:
            if device != "cpu" or size < 2**20:
                total += size
                continue
            first, last = address // page, (address + size - 1) // page
            pagemap.seek(first * 8)
            entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype=np.uint64)
            present = int((((entries >> np.uint64(63)) | (entries >> np.uint64(62))) & np.uint64(1)).sum())
            total += min(size, present * page)
    return total


class StateCount:
    """Bytes of the tensors a rank holds, by category; each storage counted once, the first category that claims it."""

    def __init__(self):
        self.seen: set = set()
        self.bytes = {"weights": 0, "grads": 0, "optim": 0, "buffers": 0}
        self.engine_tensors: dict[str, int] = {}
        self.buffer_storages: list[tuple[str, int, int]] = []  # (device, address, bytes)

    @staticmethod
    def _local(tensor):
        from torch.distributed.tensor import DTensor

        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def claim(self, tensor, category: str) -> None:
        import torch

        if not isinstance(tensor, torch.Tensor):
            return
        tensor = self._local(tensor)
        try:
            storage = tensor.untyped_storage()
            size, key = storage.nbytes(), (str(tensor.device), storage.data_ptr())
        except (RuntimeError, NotImplementedError):  # a tensor without storage (meta, fake)
            return
        if size == 0 or key in self.seen:
            return
        self.seen.add(key)
        self.bytes[category] += size
        if category == "buffers":
            self.buffer_storages.append((tensor.device.type, key[1], size))

    def module_and_optimizer(self, module, optimizer) -> None:
        params = list(module.parameters()) + [p for g in optimizer.param_groups for p in g["params"]]
        for p in params:
            self.claim(p, "weights")
            self.claim(getattr(p, "ds_tensor", None), "weights")  # ZeRO-3: this rank's partition
        for p in params:
            self.claim(p.grad, "grads")
        for state in optimizer.state.values():
            for value in state.values():
                self.claim(value, "optim")

    def engine(self, zero_optimizer) -> None:
        """DeepSpeed's ZeRO optimizer: every tensor in its attributes (lists, dicts, its bucket objects)."""
        import torch

        def walk(obj, path: str, depth: int, visited: set):
            if isinstance(obj, torch.Tensor):
                yield path, obj
                return
            if depth > 5 or id(obj) in visited:
                return
            visited.add(id(obj))
            if isinstance(obj, dict):
                items = [(f"{path}[{k!r}]" if not isinstance(k, int) else f"{path}[]", v) for k, v in obj.items()]
            elif isinstance(obj, (list, tuple, set)):
                items = [(f"{path}[]", v) for v in obj]
            elif (type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__")
                  and not isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))) or obj is zero_optimizer:
                items = [(f"{path}.{k}" if path else k, v) for k, v in vars(obj).items()]
            else:
                return
            for sub_path, value in items:
                yield from walk(value, sub_path, depth + 1, visited)

        found: dict[str, list] = {}
        for path, tensor in walk(zero_optimizer, "", 0, set()):
            found.setdefault(re.sub(r"(\[\])+", "[]", path), []).append(tensor)
        for path, tensors in found.items():
            category = engine_category(path)
            before = dict(self.bytes)
            for tensor in tensors:
                self.claim(tensor, category)
            added = sum(self.bytes.values()) - sum(before.values())
            if added:
                self.engine_tensors[f"{category}: {path}"] = added

    def record(self) -> dict:
        out = {f"{k}_bytes": v for k, v in self.bytes.items()}
        out["state_bytes"] = sum(self.bytes[k] for k in STATE_PARTS)
        counted = sum(size for _, _, size in self.buffer_storages)  # the rest (DDP's C++ buckets) counts whole
        out["buffers_resident_bytes"] = self.bytes["buffers"] - counted + resident_bytes(self.buffer_storages)
        if self.engine_tensors:
            out["engine_tensors_bytes"] = dict(sorted(self.engine_tensors.items(), key=lambda kv: -kv[1])[:16])
        return out


def python_visible_tensor_bytes() -> int:
    """Every tensor storage some Python object refers to right now, once each (a cross-check of
    the state count: tensors held only by C++, such as DDP's buckets, are not seen)."""
    import gc
    import warnings

    import torch

    count = StateCount()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            kind = type(obj)
            if kind is torch.Tensor or kind is torch.nn.Parameter or kind.__name__ == "DTensor":
                count.claim(obj, "weights")
    return count.bytes["weights"]


def state_snapshot(model, optimizer=None, engine=None) -> dict:
    import torch

    count = StateCount()
    note = []
    if engine is not None:  # DeepSpeed: soup's optimizer is the engine's base optimizer
        zero_optimizer = engine.optimizer
        count.module_and_optimizer(engine.module, getattr(zero_optimizer, "optimizer", zero_optimizer))
        count.engine(zero_optimizer)
    else:
        module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        count.module_and_optimizer(module, optimizer)
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # its buckets live in C++
            sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))
            buckets = sum(int(s) for s in sizes.split(",") if s.strip().isdigit())
            count.bytes["buffers"] += buckets
            count.engine_tensors["buffers: DDP reducer gradient buckets (C++)"] = buckets
            note.append("buffers: DDP's gradient buckets, from DistributedDataParallel._get_ddp_logging_data()")
    record = count.record()
    record["python_visible_tensor_bytes"] = python_visible_tensor_bytes()
    if note:
        record["note"] = note
    return record


def child_main(argv: list[str]) -> None:
    """One rank (or the single process): soup.train's cli, with readings taken by wrappers around four soup functions."""
    parser = argparse.ArgumentParser(prog="parallel.py --child")
    parser.add_argument("--child", type=Path, required=True, help="folder for rank<R>.json")
    parser.add_argument("--snapshot-step", type=int, default=2)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    soup_args = argv[split + 1:]

    import torch

    import soup.loop
    import soup.train
    import soup.zero

    rank = int(os.environ.get("RANK", "0"))
    record: dict = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "pid": os.getpid(),
                    "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "snapshot_step": args.snapshot_step, "at_start": memory_now()}
    held: dict = {}
    steps = {"n": 0}

    original_loop = soup.train.train_loop

    def train_loop(cfg, model, *rest, **kwargs):
        held["model"] = model
        try:
            return original_loop(cfg, model, *rest, **kwargs)
        finally:
            record["at_loop_end"] = memory_now()

    original_reset = soup.loop.reset_peak_memory

    def reset_peak_memory(device):
        """Called once, when the loop starts (model built and sharded, engine and optimizer made): read the
        setup's peak, then start a new peak window: CUDA's allocator peak (soup's own call) and, on Linux,
        the process's RSS high-water mark (writing 5 to /proc/self/clear_refs; ru_maxrss follows it)."""
        record["at_loop_start"] = memory_now()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            record["rss_peak_reset_at_loop_start"] = True
        except OSError as exc:
            record["rss_peak_reset_at_loop_start"] = f"no: {exc}"
        return original_reset(device)

    def snapshot(**objects) -> None:
        steps["n"] += 1
        if steps["n"] == args.snapshot_step:
            started = time.perf_counter()
            record["at_snapshot"] = memory_now()
            try:
                record["state"] = state_snapshot(**objects)
            except Exception as exc:  # a reading that fails must not stop the training it observes
                record["state_error"] = f"{type(exc).__name__}: {exc}"
            record["snapshot_s"] = time.perf_counter() - started

    original_step = soup.loop.clipped_optimizer_step

    def clipped_optimizer_step(optimizer, scaler, max_grad_norm):
        snapshot(model=held.get("model"), optimizer=optimizer)
        return original_step(optimizer, scaler, max_grad_norm)

    original_zero_step = soup.zero.step

    def zero_step(engine):
        snapshot(model=None, engine=engine)
        return original_zero_step(engine)

    soup.train.train_loop = train_loop
    soup.loop.reset_peak_memory = reset_peak_memory
    soup.loop.clipped_optimizer_step = clipped_optimizer_step
    soup.zero.step = zero_step

    args.child.mkdir(parents=True, exist_ok=True)
    sys.argv = ["soup.train", *soup_args]
    try:
        soup.train.cli()
        record["exit"] = 0
    except SystemExit as exit_:
        record["exit"] = exit_.code
        raise
    except BaseException as exc:
        record["exit"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        record["at_exit"] = memory_now()
        (args.child / f"rank{rank}.json").write_text(json.dumps(record, indent=2) + "\n")


# =========================================================================== parent


sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import LoadSampler  # noqa: E402  (scripts/bench is not a package)


def tree_cpu_s(root: int) -> float:
    """CPU-seconds used by process `root` and all its descendants (reaped children included)."""
    total, stack, seen = 0.0, [root], set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children", encoding="utf-8") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, IndexError, ValueError):
            continue
    return total


class TreeLoadSampler(LoadSampler):
    """sft.py's LoadSampler over a process tree: torchrun and every rank count as the run, the rest as other load."""

    def __init__(self, pid: int, period_s: float = 0.5):
        super().__init__(pid, period_s)

    def own_cpu_s(self) -> float:
        return tree_cpu_s(self.pid)


def wait_for_other_benchmarks(pattern: str, timeout_s: float, poll_s: float = 15.0) -> float:
    """Seconds spent waiting while `pgrep -f pattern` finds another benchmark, at most `timeout_s`."""
    started = time.time()
    while pattern and time.time() - started < timeout_s:
        found = [p for p in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
                 if int(p) != os.getpid()]
        if not found:
            break
        if time.time() - started < poll_s:
            print(f"[bench] waiting while {pattern} runs (pids {' '.join(found)}) ...", flush=True)
        time.sleep(poll_s)
    return time.time() - started


def soup_overrides(option: str, micro_batch: int, steps: int, max_length: int, device: str, run_dir: Path) -> list[str]:
    return [
        "task=pretrain", "data=demo", "data.packing=true", f"data.max_length={max_length}", "data.val_split=0",
        "model=tiny", *(f"model.tiny.{k}={v}" for k, v in MODEL_ARCH.items()),
        f"parallelism={option}", f"train.micro_batch_size={micro_batch}", "train.grad_accum_steps=1",
        f"train.max_steps={steps}", "train.precision=fp32", "train.save_every_steps=0", "train.log_every_steps=1",
        "train.progress_bar=false", f"train.device={device}", "sched=constant", f"seed={SEED}",
        f"hydra.run.dir={run_dir}",
    ]


def run_command(option: str, args: argparse.Namespace, steps: int, run_dir: Path, result_dir: Path) -> list[str]:
    single = option == "single"
    micro_batch = args.micro_batch * args.ranks if single else args.micro_batch
    child = [str(Path(__file__).resolve()), "--child", str(result_dir), "--snapshot-step", str(args.snapshot_step),
             "--", *soup_overrides(option, micro_batch, steps, args.max_length, args.device, run_dir)]
    if single:
        return [sys.executable, *child]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}", *child]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) if path.exists() else ""


def expected_state_bytes(option: str, parameters: int, ranks: int, element: int = 4) -> float:
    """Textbook fp32 + AdamW bytes per rank (see the module docstring)."""
    p = parameters * element
    return {"single": 4 * p, "ddp": 4 * p, "fsdp2": 4 * p / ranks,
            "deepspeed_zero2": p + 4 * p / ranks, "deepspeed_zero3": 5 * p / ranks}[option]


MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # glibc: every block >= 64 KiB its own mmap, returned on free


def run_once(option: str, args: argparse.Namespace, scratch: Path, name: str, malloc: str) -> dict:
    """One run of `option` (all its ranks), its readings and figures; `malloc`: default | mmap (MMAP_ENV)."""
    steps = args.warmup_steps + args.measured_steps
    run_dir, result_dir, log_path = scratch / name, scratch / f"{name}.ranks", scratch / f"{name}.log"
    for path in (run_dir, result_dir):
        if path.exists():
            shutil.rmtree(path)  # metrics.jsonl is appended to: start from an empty run dir
    run_dir.mkdir(parents=True)
    command = run_command(option, args, steps, run_dir, result_dir)
    processes = 1 if option == "single" else args.ranks
    threads = max(1, args.cpu_threads // processes)
    set_env = {"OMP_NUM_THREADS": str(threads), **(MMAP_ENV if malloc == "mmap" else {})}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(set_env, PYTHONUNBUFFERED="1")
    started = time.time()
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)  # its own process group: a hung rank can be ended
        sampler = TreeLoadSampler(process.pid)
        sampler.start()
        try:
            status = process.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)  # the group this script started, by its id
            status = process.wait()
    sampler.done.set()
    sampler.join()
    run = {"option": option, "malloc": malloc, "ranks": processes, "command": command, "env": set_env,
           "status": status, "timed_out": timed_out, "wall_s": time.time() - started, "log": str(log_path),
           "run_dir": str(run_dir)}
    ranks = []
    for rank in range(processes):
        path = result_dir / f"rank{rank}.json"
        ranks.append(json.loads(path.read_text()) if path.exists() else {"rank": rank, "missing": str(path)})
    run["per_rank"] = ranks
    metrics_path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
    rows = [r for r in rows if r["split"] == "train"]
    if status != 0 or len(rows) < steps:
        run["error"] = (f"{'timed out after ' + str(args.run_timeout) + ' s' if timed_out else f'exit {status}'}, "
                        f"{len(rows)} of {steps} steps logged")
        run["log_tail"] = tail(log_path)
        return run
    measured = rows[args.warmup_steps:steps]
    times = [r["time/step_s"] for r in measured]
    tokens = [r["trained_tokens"] for r in measured]
    wall = [b["time"] - a["time"] for a, b in zip(rows[args.warmup_steps - 1:steps - 1], measured)]
    record = json.loads((run_dir / "run.json").read_text())
    run.update(
        parameters=record["stats"]["parameters"],
        step_time_s=statistics.mean(times), step_time_s_median=statistics.median(times),
        wall_step_s=statistics.mean(wall), tokens_per_s=sum(tokens) / sum(times),
        measured_steps=len(measured), measured_trained_tokens=sum(tokens),
        steps_time_s=[r["time/step_s"] for r in rows], steps_trained_tokens=[r["trained_tokens"] for r in rows],
        steps_loss=[r["loss"] for r in rows],
        # After the reset at the loop's start (child: reset_peak_memory), soup's figure is the loop's peak too.
        soup_peak_memory_mb_rank0=measured[-1].get("peak_memory_mb"),
        other_load=sampler.other_load(rows[args.warmup_steps - 1]["time"], measured[-1]["time"]),
        expected_state_bytes=expected_state_bytes(option, record["stats"]["parameters"], processes),
        optimizer_line=next((line for line in tail(log_path, 400).splitlines() if "optimizer steps" in line), None),
    )
    for rank in ranks:
        missing = [k for k in ("at_loop_start", "state", "at_loop_end") if k not in rank]
        if missing:
            run["error"] = (f"rank {rank.get('rank')}: no {', '.join(missing)} reading (see {result_dir})"
                            + (f": {rank['state_error']}" if "state_error" in rank else ""))
    return run


# --------------------------------------------------------------------------- table


def peak_mb(rank: dict, when: str, device: str) -> float | None:
    """The peak memory a rank reached by `when` (at_loop_start: the setup; at_loop_end: the loop alone,
    the peak having been reset when the loop started)."""
    reading = rank.get(when, {})
    return reading.get("cuda_max_allocated_mb") if device == "cuda" else reading.get("vmhwm_mb")


def table_rows(runs: list[dict], device: str) -> list[dict]:
    """One row per option: the kept run of the default allocator (memory and time) and, on CPU, the
    MALLOC_MMAP_THRESHOLD_ run (memory); ratios to the single process's row."""
    kept: dict[tuple[str, str], dict] = {}
    for run in runs:
        if not run.get("discarded"):
            kept[(run["option"], run.get("malloc", "default"))] = run
    base, base_mmap = kept.get(("single", "default")), kept.get(("single", "mmap"))

    def usable(run):
        return run is not None and "error" not in run and "skipped" not in run

    rows = []
    for option in OPTIONS:
        run, mmap_run = kept.get((option, "default")), kept.get((option, "mmap"))
        if run is None:
            continue
        row = {"option": option, "ranks": run["ranks"]}
        if not usable(run):
            row["error"] = run.get("skipped") or run.get("error")
            rows.append(row)
            continue
        ranks = run["per_rank"]
        states = [r["state"] for r in ranks]
        row.update(
            setup_peak_mb_per_rank=[peak_mb(r, "at_loop_start", device) for r in ranks],
            loop_peak_mb_per_rank=[peak_mb(r, "at_loop_end", device) for r in ranks],
            rss_at_snapshot_mb_per_rank=[r["at_snapshot"].get("vmrss_mb") for r in ranks],
            state_mb_per_rank=[s["state_bytes"] / MB for s in states],
            weights_mb_per_rank=[s["weights_bytes"] / MB for s in states],
            grads_mb_per_rank=[s["grads_bytes"] / MB for s in states],
            optim_mb_per_rank=[s["optim_bytes"] / MB for s in states],
            buffers_mb_per_rank=[s["buffers_bytes"] / MB for s in states],
            buffers_resident_mb_per_rank=[s["buffers_resident_bytes"] / MB for s in states],
            python_visible_tensors_mb_per_rank=[s["python_visible_tensor_bytes"] / MB for s in states],
            expected_state_mb=run["expected_state_bytes"] / MB,
            threads_per_process=ranks[0]["torch_threads"],
            step_time_s=run["step_time_s"], wall_step_s=run["wall_step_s"], tokens_per_s=run["tokens_per_s"],
            other_load=run["other_load"], soup_peak_memory_mb_rank0=run["soup_peak_memory_mb_rank0"],
            loss_step1=run["steps_loss"][0], loss_last=run["steps_loss"][-1],
            trained_tokens_per_step=run["steps_trained_tokens"],
        )
        if usable(mmap_run):
            row["loop_peak_mmap64k_mb_per_rank"] = [peak_mb(r, "at_loop_end", device) for r in mmap_run["per_rank"]]
            row["setup_peak_mmap64k_mb_per_rank"] = [peak_mb(r, "at_loop_start", device) for r in mmap_run["per_rank"]]
        elif mmap_run is not None:
            row["mmap64k_error"] = mmap_run.get("error")
        if usable(base):
            base_rank = base["per_rank"][0]
            row.update(
                loop_peak_over_single=max(row["loop_peak_mb_per_rank"]) / peak_mb(base_rank, "at_loop_end", device),
                state_over_single=max(row["state_mb_per_rank"]) / (base_rank["state"]["state_bytes"] / MB),
                step_time_over_single=run["step_time_s"] / base["step_time_s"],
                tokens_per_s_over_single=run["tokens_per_s"] / base["tokens_per_s"],
                same_trained_tokens_as_single=run["steps_trained_tokens"] == base["steps_trained_tokens"],
                max_loss_diff_vs_single=max(abs(a - b) for a, b in zip(run["steps_loss"], base["steps_loss"])),
            )
        if usable(base_mmap) and "loop_peak_mmap64k_mb_per_rank" in row:
            row["loop_peak_mmap64k_over_single"] = (max(row["loop_peak_mmap64k_mb_per_rank"])
                                                    / peak_mb(base_mmap["per_rank"][0], "at_loop_end", device))
        rows.append(row)
    return rows


def _per_rank(values, fmt="{:.0f}") -> str:
    return "/".join(fmt.format(v) if v is not None else "?" for v in values) if values else "-"


def _ratio(value) -> str:
    return f"{value:.2f}x" if value is not None else ""


def print_table(rows: list[dict], device: str) -> None:
    cpu = device != "cuda"
    peak = "RSS" if cpu else "GPU"
    print(f"Memory per rank, MB (r0/r1). {'Peak RSS = VmHWM' if cpu else 'GPU = torch.cuda.max_memory_allocated'}; "
          "setup = model build, sharding, engine;\nloop = the training steps alone (peak reset when the loop starts)"
          + ("; mmap64k = the same run with MALLOC_MMAP_THRESHOLD_=65536." if cpu else "."))
    header = (f"{'option':<16} {'setup ' + peak:>11} {'loop ' + peak:>11} {'/single':>7} "
              + (f"{'loop mmap64k':>13} {'/single':>7} " if cpu else "")
              + f"{'state w+g+o':>12} {'expected':>8} {'/single':>7} {'buffers':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['option']:<16} {r['error'].splitlines()[0]}")
            continue
        buffers = _per_rank(r["buffers_resident_mb_per_rank"])
        print(f"{r['option']:<16} {_per_rank(r['setup_peak_mb_per_rank']):>11} {_per_rank(r['loop_peak_mb_per_rank']):>11} "
              f"{_ratio(r.get('loop_peak_over_single')):>7} "
              + (f"{_per_rank(r.get('loop_peak_mmap64k_mb_per_rank')):>13} "
                 f"{_ratio(r.get('loop_peak_mmap64k_over_single')):>7} " if cpu else "")
              + f"{_per_rank(r['state_mb_per_rank']):>12} {r['expected_state_mb']:>8.0f} "
              f"{_ratio(r.get('state_over_single')):>7} {buffers:>11}")
    print("state = weights + gradients + optimizer state held by the rank at a warm-up step's optimizer step "
          "(each storage once);\nbuffers = DDP's gradient buckets, DeepSpeed's reduce buckets and other engine "
          "tensors" + (", resident bytes (allocated in the JSON)." if cpu else "."))
    for r in rows:
        if "error" not in r:
            print(f"  {r['option']:<16} weights/grads/optim: "
                  + "  ".join(f"r{i} {w:.0f}/{g:.0f}/{o:.0f}" for i, (w, g, o) in
                              enumerate(zip(r["weights_mb_per_rank"], r["grads_mb_per_rank"], r["optim_mb_per_rank"])))
                  + f"; buffers allocated {_per_rank(r['buffers_mb_per_rank'])}")
    print()
    header = (f"{'option':<16} {'ranks':>5} {'threads':>7} {'step s':>7} {'/single':>7} {'wall s':>7} {'tok/s':>7} "
              f"{'/single':>7} {'load':>5} {'loss vs single':>14} {'same tokens':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['option']:<16} {r['ranks']:>5} {r['error'].splitlines()[0]}")
            continue
        load = f"{r['other_load']:.0%}" if r["other_load"] is not None else "?"
        loss = f"{r['max_loss_diff_vs_single']:.1e}" if "max_loss_diff_vs_single" in r else ""
        print(f"{r['option']:<16} {r['ranks']:>5} {r['threads_per_process']:>7} {r['step_time_s']:>7.2f} "
              f"{_ratio(r.get('step_time_over_single')):>7} {r['wall_step_s']:>7.2f} {r['tokens_per_s']:>7.0f} "
              f"{_ratio(r.get('tokens_per_s_over_single')):>7} {load:>5} {loss:>14} "
              f"{str(r.get('same_trained_tokens_as_single', '')):>11}")
    print("step s = mean of soup's time/step_s over the measured steps (wall s: between metrics lines); tok/s = "
          "trained tokens of all ranks / step time;\nload = other processes' CPU use during the measured steps; "
          "loss vs single = largest |loss difference| over all steps.")


# --------------------------------------------------------------------------- report


def machine_record(device: str) -> dict:
    import importlib.metadata

    import torch

    import sft

    machine = sft.machine_info()
    for name in ("deepspeed", "hydra-core"):
        try:
            machine["versions"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            machine["versions"][name] = None
    machine["versions"] = {k: v for k, v in machine["versions"].items() if k not in ("trl", "datasets")}
    machine["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine["device"] = device
    try:
        machine["glibc"] = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        machine["glibc"] = None
    if torch.cuda.is_available():
        machine["cuda"] = {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                           "version": torch.version.cuda}
    return machine


EXPLANATION = {
    "what_sharding_cuts": (
        "fsdp2 and deepspeed_zero3 split the weights, gradients and optimizer state across the ranks, so each of "
        "2 ranks holds about half (the state figures); deepspeed_zero2 splits the gradients and optimizer state but "
        "keeps full weights on every rank; ddp keeps a full copy of all three on every rank, plus its gradient "
        "buckets. In fp32 DeepSpeed also keeps an fp32 master copy of each rank's weight partition beside the "
        "module's weights, so ZeRO-3 holds 20P/N bytes where FSDP2 holds 16P/N."),
    "what_it_does_not_cut": (
        "Activations (they follow the per-rank batch: every 2-rank run has m rows per rank against 2m in the single "
        "process, ddp included), the gathered weights of the block running under fsdp2/zero3 (transient), "
        "communication buffers (DeepSpeed's reduce bucket is reduce_bucket_size elements, 5e8 by default, allocated "
        "whatever the model's size), and the runtime: Python, torch, transformers, DeepSpeed, gloo and the data, "
        "several hundred MB in every process, paid once per rank. Each rank also builds the full model before it is "
        "sharded (the setup peak). Whole-process peak RSS therefore falls much less than the state does; the halving "
        "shows in the state figures and in the loop-peak gap between ddp and fsdp2/zero3."),
    "allocator": (
        "glibc's malloc raises its mmap threshold after large blocks are freed (up to 32 MB), after which blocks "
        "such as FSDP2's per-block all-gather and reduce-scatter buffers come from heap arenas and stay resident "
        "after being freed. With the default allocator peak RSS therefore includes freed memory the allocator kept; "
        "the mmap64k runs (MALLOC_MMAP_THRESHOLD_=65536: every block of 64 KiB or more is its own mapping, returned "
        "on free) show what the ranks actually use."),
    "step_time_on_cpu": (
        "On a CPU the ranks share the cores the single process uses (cores/ranks threads each), so a 2-rank step is "
        "not faster: its ratio to single measures communication (gloo) and per-rank overheads, not scaling. "
        "Throughput scaling needs one GPU per rank."),
}


def write_report(args: argparse.Namespace, started: float, machine: dict, runs: list[dict]) -> dict:
    import sft

    table = table_rows(runs, args.device)
    report = {
        "benchmark": "parallelism_memory_and_step_time",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "note": args.note,
        "soup_source": sft.soup_source(),
        "machine": machine,
        "settings": {
            "model": {"name": "tiny", **MODEL_ARCH, "tie_word_embeddings": True, "tokenizer": "soup byte tokenizer"},
            "task": "pretrain on soup/assets/demo/pretrain.jsonl, data.packing=true",
            "max_length": args.max_length, "precision": "fp32", "optimizer": "soup default: AdamW (fused), lr 3e-4",
            "schedule": "constant", "seed": SEED, "ranks": args.ranks,
            "micro_batch_per_rank": args.micro_batch, "micro_batch_single": args.micro_batch * args.ranks,
            "global_batch_rows": args.micro_batch * args.ranks, "grad_accum_steps": 1,
            "warmup_steps": args.warmup_steps, "measured_steps": args.measured_steps,
            "snapshot_step": args.snapshot_step, "device": args.device, "malloc": args.malloc,
            "threads": {"single": args.cpu_threads, "per_rank": max(1, args.cpu_threads // args.ranks)},
            "eval": "none (data.val_split=0)", "checkpoints": "none (train.save_every_steps=0)",
        },
        "definitions": {
            "setup_peak_mb_per_rank": ("peak memory of the rank up to the loop's start (imports, data, model build, "
                                       "sharding, engine and optimizer): CPU VmHWM, CUDA max_memory_allocated"),
            "loop_peak_mb_per_rank": ("peak memory during the training steps alone: the peak is reset when the loop "
                                      "starts (/proc/self/clear_refs on CPU; soup's own reset_peak_memory on CUDA) and "
                                      "read when train_loop returns, before final/ is gathered and saved"),
            "loop_peak_mmap64k_mb_per_rank": "the same, in a second run with MALLOC_MMAP_THRESHOLD_=65536 (CPU only)",
            "state_mb_per_rank": "weights + grads + optimizer state this rank holds, each storage once",
            "buffers_mb_per_rank": "DDP gradient buckets; DeepSpeed reduce buckets and other engine tensors (allocated)",
            "buffers_resident_mb_per_rank": "the resident part of the buffers (CPU: /proc/self/smaps Rss of each large one)",
            "expected_state_mb": "16P (single, ddp), 16P/N (fsdp2), 4P + 16P/N (zero2), 20P/N (zero3), P params, fp32",
            "python_visible_tensors_mb_per_rank": "all tensor storages Python objects refer to at the snapshot",
            "step_time_s": "mean of soup's time/step_s over the measured steps (default allocator)",
            "tokens_per_s": "trained tokens (all ranks) / summed time/step_s over the measured steps",
            "soup_peak_memory_mb_rank0": ("soup's metrics.jsonl peak_memory_mb at the last measured step (rank 0): "
                                          "ru_maxrss, which the reset at the loop's start also resets"),
            **EXPLANATION,
        },
        "table": table,
        "runs": runs,
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_option(option: str, malloc: str, args: argparse.Namespace, scratch: Path, runs: list[dict],
               write) -> None:
    """Run `option` under `malloc` until a try is undisturbed (timing runs only) or --max-tries is spent."""
    import sft

    tries = args.max_tries if malloc == "default" else 1  # RSS does not depend on other load
    for attempt in range(1, tries + 1):
        others_s = wait_for_other_benchmarks(args.others_pattern, args.others_timeout)
        # The memory-only pass does not wait for quiet: RSS does not depend on other load.
        idle = sft.wait_for_idle(args.idle_timeout, quiet_s=args.quiet_s) if malloc == "default" else {}
        label = option + ("" if malloc == "default" else " (mmap64k)")
        print(f"[bench] {label} (try {attempt}): {args.warmup_steps} + {args.measured_steps} steps ...", flush=True)
        run = run_once(option, args, scratch, f"{option}-{malloc}-try{attempt}", malloc)
        loaded = (run.get("other_load") or 0.0) > args.max_other_load
        run.update(attempt=attempt, others_wait_s=round(others_s, 1), **idle,
                   discarded="error" not in run and loaded and attempt < tries)
        runs.append(run)
        if "error" in run:
            print(f"[bench] {label}: FAILED ({run['error']}); log {run['log']}\n{run.get('log_tail', '')}", flush=True)
        else:
            def fmt(key):
                return "/".join(f"{peak_mb(r, key, args.device):.0f}" for r in run["per_rank"])
            print(f"[bench] {label}: step {run['step_time_s']:.2f} s, {run['tokens_per_s']:.0f} tok/s, peak setup "
                  f"{fmt('at_loop_start')} loop {fmt('at_loop_end')} MB, state "
                  f"{'/'.join(str(round(r['state']['state_bytes'] / MB)) for r in run['per_rank'])} MB, other "
                  f"load {run['other_load']:.0%} ({run['wall_s']:.0f} s)"
                  f"{'; discarded, retrying' if run['discarded'] else ''}", flush=True)
        write()
        if not run["discarded"]:
            return


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_parallel.json"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/bench_parallel"))
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=1,
                        help="rows per rank per step (m); the single process runs ranks x m")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--warmup-steps", type=int, default=2, help="left out of the figures (>= snapshot step)")
    parser.add_argument("--measured-steps", type=int, default=4)
    parser.add_argument("--snapshot-step", type=int, default=2,
                        help="the warm-up step at whose optimizer step the state is counted (>= 2: AdamW's state "
                             "exists from the first step on)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--malloc", choices=["default", "mmap", "both"], default="both",
                        help="CPU: run each option with glibc's default malloc (timed), with "
                             "MALLOC_MMAP_THRESHOLD_=65536 (memory only), or both")
    parser.add_argument("--cpu-threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="threads of the single process; each rank gets this / ranks")
    parser.add_argument("--run-timeout", type=float, default=420.0, help="seconds before a run is killed")
    parser.add_argument("--idle-timeout", type=float, default=120.0,
                        help="longest wait for a quiet machine before each run, in seconds")
    parser.add_argument("--quiet-s", type=float, default=6.0, help="seconds of quiet that count as a quiet machine")
    parser.add_argument("--max-other-load", type=float, default=0.10)
    parser.add_argument("--max-tries", type=int, default=2)
    parser.add_argument("--others-pattern", default=OTHER_BENCHMARKS,
                        help="before each run, wait while `pgrep -f` finds this ('' to skip)")
    parser.add_argument("--others-timeout", type=float, default=300.0)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if not 2 <= args.snapshot_step <= args.warmup_steps:
        parser.error("--snapshot-step must be >= 2 and <= --warmup-steps (its step's time includes the count)")
    if args.ranks < 2:
        parser.error("--ranks must be >= 2")

    import torch

    import sft

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        args.malloc = "default"  # the GPU peak is the caching allocator's, not glibc's
    started = time.time()
    machine = machine_record(args.device)
    print(sft.machine_line(machine) + f"; device {args.device}", flush=True)
    scratch = args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    options = ["single", *[o for o in args.options if o != "single"]] if "single" in args.options else args.options
    passes = {"both": ["default", "mmap"], "default": ["default"], "mmap": ["mmap"]}[args.malloc]
    runs: list[dict] = []

    def write():
        return write_report(args, started, machine, runs)

    for option in options:
        if option != "single" and args.device == "cuda" and torch.cuda.device_count() < args.ranks:
            runs.append({"option": option, "malloc": "default", "ranks": args.ranks, "skipped": (
                f"{torch.cuda.device_count()} GPU(s) for {args.ranks} ranks: soup puts each rank on its own GPU "
                "(nccl refuses two ranks on one device)")})
            print(f"[bench] {option}: skipped, {runs[-1]['skipped']}", flush=True)
            write()
            continue
        for malloc in passes:
            run_option(option, malloc, args, scratch, runs, write)

    report = write()
    print()
    print_table(report["table"], args.device)
    print(sft.machine_line(machine))
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
