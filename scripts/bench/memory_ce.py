"""Peak memory and time of the LM-head loss step: full logits + F.cross_entropy vs soup's chunked loss.

    python scripts/bench/memory_ce.py                          # V=128256, 4096 tokens, H=256, fp32: ~3 min
    python scripts/bench/memory_ce.py --chunk-sizes 256 1024 --dtype bf16

What one step is, for every variant: the head and the loss forward, then backward to
the hidden states and the head weight (the gradients the model's step needs), on

    hidden  [tokens, H]   random normal, requires grad
    weight  [vocab, H]    random normal x 0.02, requires grad (an untied LM head, no bias)
    targets [tokens]      uniform over the vocabulary, none ignored

    plain          F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
                   (the peer: what `kernels.cut_ce=off` runs; it holds the [tokens, vocab] fp32
                   logits, their log-softmax, and the gradient of each)
    chunked_<C>    soup.memory.chunked_ce.linear_cross_entropy(..., chunk_size=C)

Defaults: vocab 128256 (Llama 3's), 4096 tokens, H = 256 rather than a real model's
2048-8192, so that the weight (131 MB at fp32) and the plain peak (~6-8 GB) fit a 24 GiB
machine; the logits, which the loss is about, do not depend on H. H only scales the
weight, its gradient (paid by both variants) and the matmul time.

Each variant runs in two fresh subprocesses (this script with --child), one for memory
and one for time, since the allocator setting that makes RSS honest makes steps slow:

    peak_mb  memory process: build the inputs, run one small warm-up step (one-off
             allocations: thread pools, allocator arenas), then one full-size step.
             peak_mb = VmHWM - VmRSS just before that step, with the high-water mark reset
             to the current RSS through /proc/self/clear_refs. MALLOC_MMAP_THRESHOLD_=65536
             makes glibc return freed tensors to the OS, so RSS follows live tensors. It
             counts everything the step allocates, the weight gradient included (V x H x 4 B).
    step_s   time process (glibc's default malloc): one full-size warm-up step, then the
             fastest of --repeats timed steps (grads set to None before each).

Writes --out (default .bench/memory_ce.json) with every variant, the plain / chunked
peak ratio (goal: >= 10x at the recommended chunk size) and the loss of each, which must
agree. Linux only (/proc). Timings are CPU timings and only comparable on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOAL_RATIO = 10.0


# --------------------------------------------------------------------------- child


def _status_bytes(field: str) -> int:
    return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def run_child(variant: str, measure: str, tokens: int, vocab: int, hidden_size: int, dtype_name: str,
              repeats: int) -> dict:
    """One variant in this (fresh) process: its peak memory (measure="memory") or its step time ("time")."""
    import gc

    import torch
    import torch.nn.functional as F

    from soup.memory.chunked_ce import linear_cross_entropy

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]

    def inputs(n, v):
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, hidden_size, generator=gen).to(dtype).requires_grad_()
        weight = (torch.randn(v, hidden_size, generator=gen) * 0.02).to(dtype).requires_grad_()
        return hidden, weight, torch.randint(0, v, (n,), generator=gen)

    def step(hidden, weight, targets):
        if variant == "plain":
            loss = F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")
        else:
            loss, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=int(variant.split("_")[1]))
        loss.backward()
        return float(loss)

    hidden, weight, targets = inputs(tokens, vocab)
    if measure == "time":
        times = []
        for _ in range(1 + repeats):  # the first is the warm-up
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            step(hidden, weight, targets)
            times.append(time.perf_counter() - start)
        return {"step_s": min(times[1:]), "step_times_s": times[1:], "warmup_step_s": times[0],
                "threads": torch.get_num_threads()}
    step(*inputs(64, 1024))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    baseline = _status_bytes("VmRSS")
    loss = step(hidden, weight, targets)
    peak = _status_bytes("VmHWM") - baseline
    return {"variant": variant, "peak_mb": peak / 1e6, "baseline_rss_mb": baseline / 1e6, "loss": loss,
            "logits_fp32_mb": tokens * vocab * 4 / 1e6}


# --------------------------------------------------------------------------- parent


def run_variant(variant: str, args) -> dict:
    """Peak memory from one fresh process, step time from another."""
    result = {}
    for measure in ("memory", "time"):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
        if measure == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        command = [sys.executable, __file__, "--child", variant, "--measure", measure, "--tokens", str(args.tokens),
                   "--vocab", str(args.vocab), "--hidden-size", str(args.hidden_size), "--dtype", args.dtype,
                   "--repeats", str(args.repeats)]
        started = time.time()
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{variant} ({measure}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        result[f"{measure}_process_wall_s"] = time.time() - started
    return result


def print_table(rows: list[dict], plain_peak_mb: float) -> None:
    print(f"{'variant':<14} {'peak MB':>10} {'plain/this':>11} {'step s':>8} {'loss':>16}")
    for row in rows:
        print(f"{row['variant']:<14} {row['peak_mb']:>10.0f} {plain_peak_mb / row['peak_mb']:>10.1f}x "
              f"{row['step_s']:>8.2f} {row['loss']:>16.6g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="labelled tokens in the step (rows N)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary V (default: Llama 3's)")
    parser.add_argument("--hidden-size", type=int, default=256, help="H; small so the plain peak fits in RAM")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[256, 4096],
                        help="rows per chunk; the first is the one the goal ratio is checked at")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after a warm-up (fastest kept)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every variant")
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "memory_ce.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("memory", "time"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_child(args.child, args.measure, args.tokens, args.vocab, args.hidden_size, args.dtype,
                                   args.repeats)))
        return
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("this benchmark reads peak RSS from Linux's /proc (VmHWM, clear_refs)")

    started = time.time()
    rows = []
    for variant in ["plain"] + [f"chunked_{size}" for size in args.chunk_sizes]:
        rows.append(run_variant(variant, args))
        print(f"[bench] {variant}: peak {rows[-1]['peak_mb']:.0f} MB, step {rows[-1]['step_s']:.2f} s", flush=True)
    plain = rows[0]
    ratios = {row["variant"]: plain["peak_mb"] / row["peak_mb"] for row in rows[1:]}
    loss_rel_diff = {row["variant"]: abs(row["loss"] - plain["loss"]) / abs(plain["loss"]) for row in rows[1:]}
    goal_variant = rows[1]["variant"]
    from soup.precision import cpu_record

    cpu = cpu_record()  # a bf16 step time means little without the CPU's bf16 support
    print()
    print(f"tokens={args.tokens} vocab={args.vocab} hidden_size={args.hidden_size} dtype={args.dtype} "
          f"threads={args.threads}; fp32 logits alone: {plain['logits_fp32_mb']:.0f} MB; torch CPU capability "
          f"{cpu['cpu_capability']}, native bf16 {'yes' if cpu['cpu_native_bf16'] else 'no'}")
    print_table(rows, plain["peak_mb"])
    met = ratios[goal_variant] >= GOAL_RATIO
    print(f"goal: plain / {goal_variant} peak >= {GOAL_RATIO:.0f}x: {ratios[goal_variant]:.1f}x "
          f"({'met' if met else 'NOT met'})")

    import torch

    report = {
        "benchmark": "memory_ce",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__, **cpu},
        "settings": {"tokens": args.tokens, "vocab": args.vocab, "hidden_size": args.hidden_size, "dtype": args.dtype,
                     "chunk_sizes": args.chunk_sizes, "repeats": args.repeats, "threads": args.threads,
                     "peak": "VmHWM - VmRSS before the step, fresh process per variant, MALLOC_MMAP_THRESHOLD_=65536",
                     "time": "fastest of `repeats` steps after a warm-up step, another fresh process, default malloc"},
        "variants": rows,
        "peak_ratio_plain_over": ratios,
        "loss_rel_diff_vs_plain": loss_rel_diff,
        "goal": {"ratio": GOAL_RATIO, "variant": goal_variant, "met": met},
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
