"""PEFT variants on CPU: what each adapter costs in trainable parameters, step time and memory beside a full fine-tune.

    python scripts/bench/peft_variants.py                     # 9 variants x 2 repeats, about 13 min on 2 cores
    python scripts/bench/peft_variants.py --variants full lora --measured-steps 2 --repeats 1   # a quick look

(Not named peft.py: this folder is sys.path[0] for every script in it, so a peft.py here
would shadow the peft library, and TRL, which imports peft, would fail in sft.py and dpo.py.)

What runs: `python -m soup.train` (task=sft, model=hf), each variant in its own subprocess,
one after the other, with only the peft / quant groups changed:

    full        peft=none: every parameter trains; the reference row, measured in the same run
    lora        peft=lora (r 8, alpha 16, all-linear: q k v o gate up down of every block)
    dora        peft=dora (r 8): LoRA on the direction plus a trained magnitude vector
    rslora      peft=rslora (r 16, its preset): alpha / sqrt(r) scaling
    vera        peft=vera (r 256, its preset): shared frozen random matrices, trained vectors
    olora       peft=olora (r 8): QR init taken out of the base weights
    pissa       peft=pissa (r 8): SVD init taken out of the base weights
    qlora-4bit  quant=4bit peft=lora: bitsandbytes NF4 base (double quant, fp32 compute) + LoRA
    lora-8bit   quant=8bit peft=lora: bitsandbytes LLM.int8() base + LoRA

The model, data and loop are sft.py's (imported from it): the ~4.7M-parameter random Llama
with the stories260k tokenizer, the alpaca demo rows that keep a trained token at 512
tokens, ChatML, max_length 512, micro-batch 8, AdamW lr 3e-4, constant lr, grad clip
1.0, fp32, no eval, no checkpoints, no val split. One change to the model: the MLP is
704 wide instead of 688, because bitsandbytes' CPU 4-bit kernels need every linear
layer's input size to be a multiple of 64 (down_proj reads the MLP width); soup refuses
quant=4bit on CPU otherwise. Every variant trains the same rows in the same order (same
seed, same data), so step times compare directly.

Counting and timing (sft.py's `summarise`): step time = wall time between consecutive
metrics.jsonl `time` stamps, so data, optimizer and logging are inside it; the first
--warmup-steps steps are left out; step_time_s_median is the median over the measured
steps, trained_tokens_per_s = their trained tokens / their summed time.
Parameters come from run.json stats (soup's count_parameters: tied weights once; for the
quantised bases a 4-bit weight is stored two to a byte, so `total` counts its packed
uint8 elements, not the original weights). Memory: train_peak_rss_mb is the process's
peak RSS at the last training step (metrics.jsonl), run_json_peak_rss_mb the same after
the final save (run.json stats.peak_memory_mb), process_peak_rss_mb the whole process's
(os.wait4). On CPU these include ~1 GB of Python, torch and libraries, so the model's own
share (4.7M fp32 weights + grads + AdamW moments ~ 75 MB) moves them by a few percent.

Load: like sft.py, each run waits for 10 s of quiet CPU, measures the other processes'
CPU use during its steps, and is run again (up to --max-tries) when that was above
--max-other-load. Before each run it also waits while another benchmark of this folder
runs (--others-pattern, polled every 30 s). Best of --repeats per variant (the lowest
median step time). A variant that fails is recorded with the tail of its log, and not
run again in later repeats.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft  # noqa: E402  (scripts/bench is not a package)

ROOT = sft.ROOT
# sft.py's Llama with an MLP width that is a multiple of 64 (see the module docstring).
ARCH_CHANGES = {"intermediate_size": 704}
VARIANTS = {
    "full": ["peft=none"],
    "lora": ["peft=lora"],
    "dora": ["peft=dora"],
    "rslora": ["peft=rslora"],
    "vera": ["peft=vera"],
    "olora": ["peft=olora"],
    "pissa": ["peft=pissa"],
    "qlora-4bit": ["quant=4bit", "peft=lora"],
    "lora-8bit": ["quant=8bit", "peft=lora"],
}
REFERENCE = "full"
OTHER_BENCHMARKS = r"scripts/bench/(sft|dpo|memory|memory_ce)\.py"


def build_model_dir(model_dir: Path) -> dict:
    with mock.patch.dict(sft.MODEL_ARCH, ARCH_CHANGES):
        return sft.build_model_dir(model_dir)


def wait_for_other_benchmarks(pattern: str, timeout_s: float, poll_s: float = 30.0) -> float:
    """Seconds spent waiting until no process matches `pattern` (pgrep -f), at most `timeout_s`.

    Another benchmark's trainer takes a core of two; wait_for_idle alone can slip into the
    gap between two of its runs.
    """
    started = time.time()
    while pattern and time.time() - started < timeout_s:
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode != 0:
            break
        time.sleep(poll_s)
    return time.time() - started


def run_variant(variant: str, model_dir: Path, data_file: Path, run_dir: Path, steps: int, warmup: int) -> dict:
    """One soup run of `variant`: its figures, or its exit status and log tail if it failed."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to, so start from an empty run dir
    run_dir.mkdir(parents=True)
    command = [*sft.soup_command(model_dir, data_file, run_dir, steps, "fp32", packed=False),
               "task=sft", *VARIANTS[variant]]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    process, sampler = sft.run_measured(command, log_path)
    result = {"variant": variant, "overrides": VARIANTS[variant], "command": command, "log": str(log_path),
              **process}
    if process["status"] != 0:
        return {**result, "failed": True, "error": sft.tail(log_path, 20)}
    record = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    stats, peft_cfg = record["stats"], record["config"]["peft"]
    figures = sft.summarise([r["time"] for r in rows], [r["trained_tokens"] for r in rows], warmup, sampler)
    return {
        **result, "failed": False,
        "peft": peft_cfg["name"], "r": None if peft_cfg["name"] == "none" else peft_cfg["r"],
        "quant": record["config"]["quant"]["name"],
        "parameters": stats["parameters"], "trainable_parameters": stats["trainable_parameters"],
        "steps": stats["steps"],
        "step_time_s_median": statistics.median(figures["step_time_s"]),
        **figures,
        "train_peak_rss_mb": rows[-1]["peak_memory_mb"],
        "run_json_peak_rss_mb": stats["peak_memory_mb"],
        "loss_first_step": rows[0]["loss"], "loss_last_step": rows[-1]["loss"],
        "torch_threads": record["device"]["torch_threads"],
    }


def best_runs(runs: list[dict], variants: list[str]) -> list[dict]:
    """One row per variant: its fastest kept run (or its failure), with ratios to the full fine-tune."""
    table = []
    for variant in variants:
        kept = [r for r in runs if r["variant"] == variant and not r.get("discarded")]
        ok = [r for r in kept if not r["failed"]]
        if not ok:
            failed = kept[-1] if kept else {"variant": variant, "failed": True, "error": "not run"}
            table.append({k: v for k, v in failed.items() if not k.startswith("step_")})
            continue
        best = min(ok, key=lambda r: r["step_time_s_median"])
        table.append({k: v for k, v in best.items() if k not in ("step_time_s", "step_trained_tokens",
                                                                  "step_other_load")})
    reference = next((r for r in table if r["variant"] == REFERENCE and not r["failed"]), None)
    if reference is not None:
        for row in table:
            if row["failed"]:
                continue
            row["vs_full"] = {
                "trainable_parameters": row["trainable_parameters"] / reference["trainable_parameters"],
                "step_time_s_median": row["step_time_s_median"] / reference["step_time_s_median"],
                "trained_tokens_per_s": row["trained_tokens_per_s"] / reference["trained_tokens_per_s"],
                "train_peak_rss_mb": row["train_peak_rss_mb"] / reference["train_peak_rss_mb"],
                "process_peak_rss_mb": row["process_peak_rss_mb"] / reference["process_peak_rss_mb"],
            }
    return table


def print_table(table: list[dict]) -> None:
    header = (f"{'variant':<11} {'r':>4} {'trainable':>10} {'x full':>7} {'total':>7} {'step s':>7} {'x full':>7} "
              f"{'tok/s':>6} {'x full':>7} {'peak RSS MB':>11} {'x full':>7} {'proc MB':>8} {'load':>5} "
              f"{'loss':>12}")
    print(header)
    print("-" * len(header))
    for r in table:
        if r["failed"]:
            last = r.get("error", "").strip().splitlines()[-1:] or [""]
            print(f"{r['variant']:<11} FAILED (exit {r.get('status')}): {last[0][:110]}")
            continue
        ratio = r.get("vs_full", {})

        def x(key: str) -> str:
            return f"{ratio[key]:.2f}x" if key in ratio else ""

        print(f"{r['variant']:<11} {r['r'] or '-':>4} {r['trainable_parameters'] / 1e6:>9.3f}M "
              f"{x('trainable_parameters'):>7} {r['parameters'] / 1e6:>6.2f}M {r['step_time_s_median']:>7.3f} "
              f"{x('step_time_s_median'):>7} {r['trained_tokens_per_s']:>6.0f} {x('trained_tokens_per_s'):>7} "
              f"{r['train_peak_rss_mb']:>11.0f} {x('train_peak_rss_mb'):>7} {r['process_peak_rss_mb']:>8.0f} "
              f"{r['other_load']:>5.0%} {r['loss_first_step']:>5.2f}->{r['loss_last_step']:<5.2f}")
    print("step s = median wall time of a measured step; tok/s = trained tokens / wall time over the measured steps;\n"
          "peak RSS = process peak at the last training step; proc MB = whole-process peak (incl. final save);\n"
          "x full = ratio to the full fine-tune; load = other processes' CPU use during the run (share of all cores).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "peft.json")
    parser.add_argument("--scratch", type=Path, default=ROOT / ".bench" / "peft")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--warmup-steps", type=int, default=2, help="left out of the figures (>= 1)")
    parser.add_argument("--measured-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the fastest is reported")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--max-other-load", type=float, default=0.10,
                        help="a run during which other processes used more than this share of the cores is "
                             "run again (kept in the JSON as discarded)")
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--others-pattern", default=OTHER_BENCHMARKS,
                        help="before each run, wait while `pgrep -f` finds this ('' to skip)")
    parser.add_argument("--others-timeout", type=float, default=1800.0,
                        help="longest wait for --others-pattern, in seconds, before running anyway")
    args = parser.parse_args()
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be >= 1: a step's time starts at the end of the one before")
    steps = args.warmup_steps + args.measured_steps
    if steps * sft.MICRO_BATCH > 990:
        parser.error("keep (warmup + measured) * 8 rows within one epoch of the 998 rows")
    variants = sorted(args.variants, key=lambda v: v != REFERENCE)  # the reference first

    started = time.time()
    scratch = args.scratch.resolve()
    model = build_model_dir(scratch / "model")
    data = sft.build_data_files(scratch / "model", scratch / "data")
    print(f"model: {model['parameters'] / 1e6:.2f}M params in {model['dir']}; data: {data['rows_used']} of "
          f"{data['rows']} rows (dropped source lines {data['dropped_source_lines']}: prompt fills max_length)")

    runs = []
    for repeat in range(args.repeats):
        for variant in variants:
            if any(r["variant"] == variant and r["failed"] for r in runs):
                continue  # a failure is deterministic here; it is in the JSON once
            for attempt in range(1, args.max_tries + 1):
                others_wait_s = wait_for_other_benchmarks(args.others_pattern, args.others_timeout)
                idle = sft.wait_for_idle(args.idle_timeout)
                run_name = f"{variant}-repeat{repeat + 1}-try{attempt}"
                print(f"[bench] {variant} (repeat {repeat + 1}/{args.repeats}, try {attempt}): {steps} steps ...",
                      flush=True)
                run = run_variant(variant, Path(model["dir"]), Path(data["soup_file"]), scratch / "runs" / run_name,
                                  steps, args.warmup_steps)
                loaded = not run["failed"] and run["other_load"] > args.max_other_load
                run.update(repeat=repeat, attempt=attempt, discarded=loaded and attempt < args.max_tries,
                           others_wait_s=round(others_wait_s, 1), **idle)
                runs.append(run)
                if run["failed"]:
                    print(f"[bench] {variant}: FAILED (exit {run['status']}), log {run['log']}", flush=True)
                    break
                print(f"[bench] {variant}: {run['trainable_parameters'] / 1e6:.3f}M trainable, median step "
                      f"{run['step_time_s_median']:.3f} s, {run['trained_tokens_per_s']:.0f} trained tokens/s, "
                      f"peak RSS {run['train_peak_rss_mb']:.0f} MB, other load {run['other_load']:.0%} "
                      f"({run['process_wall_s']:.0f} s){'; discarded, retrying' if run['discarded'] else ''}",
                      flush=True)
                if not run["discarded"]:
                    break

    table = best_runs(runs, variants)
    print()
    print_table(table)
    machine = sft.machine_info()
    print(sft.machine_line(machine))
    for package in ("peft", "bitsandbytes"):
        machine["versions"][package] = importlib.metadata.version(package)
    report = {
        "benchmark": "peft_variants_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "machine": machine,
        "settings": {"task": "sft", "precision": "fp32", "max_length": sft.MAX_LENGTH,
                     "micro_batch_size": sft.MICRO_BATCH, "grad_accum_steps": 1, "lr": sft.LR,
                     "schedule": "constant", "optimizer": "optim=adamw (torch.optim.AdamW), weight_decay 0", "max_grad_norm": 1.0,
                     "seed": sft.SEED, "warmup_steps": args.warmup_steps, "measured_steps": args.measured_steps,
                     "repeats": args.repeats, "variants": {v: VARIANTS[v] for v in variants},
                     "arch_changes_from_sft_py": ARCH_CHANGES},
        "model": model,
        "data": data,
        "table": table,
        "runs": runs,
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
