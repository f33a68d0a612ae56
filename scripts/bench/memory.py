"""Speed and memory features on CPU: trained tokens/s and peak RSS of one soup SFT run per feature.

    python scripts/bench/memory.py                                   # every feature + TRL: ~20 min on 2 cores
    python scripts/bench/memory.py --features baseline multipack --no-trl --warmup-steps 1 --measured-steps 2

What runs (each in its own subprocess, one after the other, the baseline first):

    baseline                 python -m soup.train, fp32, padded random batches, no feature
    <feature>                the same command plus the feature's overrides (FEATURES below)
    trl-best                 trl.SFTTrainer with packing=True, packing_strategy="bfd" (padding-free),
                             bf16: TRL's best configuration as the issue names it, by sft.py's TRL runner
    trl-padded-bf16          trl.SFTTrainer on padded batches, bf16: TRL's fastest setting on this CPU
                             (sft.py measured its padding-free packing 2.4x slower than padded)

Everything else is sft.py's setup, imported from it: the same ~4.6M-parameter Llama
directory (random init, fixed seed, stories260k tokenizer, pad = eos), the ChatML template,
max_length 512 (truncating; rows whose prompt alone fills 512 tokens are dropped from the
data file for every run), micro-batch 8, no accumulation, AdamW lr 3e-4, constant lr, grad
clip 1.0, no eval, no checkpoints, data.val_split=0, torch's default threads. Its counting
and timing too: trained tokens of a step = labels[..., 1:] != -100; step time = wall time
between consecutive step ends (metrics.jsonl `time`); the first --warmup-steps are left out;
trained_tokens_per_s = sum(tokens) / sum(time) over the measured steps.

Compare trained tokens/s, not steps/s: packing and multipack put a different number of
examples (and of trained tokens) into a step than padded batches of 8 rows do, so only the
rate of trained tokens is the same quantity across rows.

Memory: peak_rss_mb = run.json stats.peak_memory_mb (ru_maxrss of soup's process, after its
final save); process_peak_rss_mb = the same from os.wait4 here. Both are whole-process peaks:
Python, torch and the data (~0.5 GB) are in every row, so a feature's saving shows as the
difference from the baseline, not as a ratio of the totals. Padded features train the same
batches as the baseline; packing and multipack fill every step to ~8 x 512 tokens, so their
activation peak is that of the fullest padded batch, every step.

Load: as sft.py, wait for 10 s of quiet (and for sft.py / dpo.py benchmarks to finish) before
each run; a run during which other processes used more than --max-other-load of the cores is
run again (kept in the JSON as discarded); the fastest try is reported. A feature that fails or passes --run-timeout is
recorded with its error and the log's tail, and the benchmark goes on.
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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sft  # noqa: E402  (scripts/bench/sft.py: model, data, timing, load and TRL helpers)

ROOT = sft.ROOT

# name -> (train.precision, extra Hydra overrides, note)
FEATURES: dict[str, tuple[str, list[str], str]] = {
    "baseline": ("fp32", [], "fp32, padded random batches, no feature"),
    "bf16": ("bf16", [], "autocast bf16, fp32 master weights"),
    "checkpointing=full": ("fp32", ["checkpointing=full"], ""),
    "checkpointing=medium": ("fp32", ["checkpointing=medium"], ""),
    "checkpointing=selective": ("fp32", ["checkpointing=selective"], ""),
    "offload=disk": ("fp32", ["offload=disk"], "saved activations to files in the run dir"),
    "kernels=chunked_ce": ("fp32", ["kernels=chunked_ce"], "vocab is only 512 here"),
    "packing": ("fp32", ["data.packing=true"], "cross-document attention allowed"),
    "packing+cross_doc_mask": ("fp32", ["data.packing=true", "data.packing_cross_doc_attn_mask=true"], ""),
    "multipack": ("fp32", ["data.multipack=true"], "layout packed (the default): rows of examples, binned"),
    "multipack(padded)": ("fp32", ["data.multipack=true", "data.multipack_layout=padded"],
                          "one example per row, padded to the bin's longest"),
    "multipack+bf16": ("bf16", ["data.multipack=true"], "soup's fastest CPU setting"),
    "kernels=compile": ("fp32", ["kernels=compile"], "compile time is in the warm-up steps"),
    "quant=fp8": ("fp32", ["quant=fp8"], "torchao float8 EMULATED on CPU: a correctness path, slow"),
}
SOUP_BEST = "multipack+bf16"
EFFICIENCY_LINE = re.compile(r"^\[soup\] (multipack|packing)[ :].*")
OTHER_BENCHMARKS = r"scripts/bench/(sft|dpo)\.py"


# --------------------------------------------------------------------------- running


def wait_for_other_benchmarks(pattern: str, timeout_s: float, poll_s: float = 30.0) -> float:
    """Seconds spent waiting until no process matches `pattern` (pgrep -f), at most `timeout_s`.

    Another benchmark's trainer takes a core of two; wait_for_idle alone can slip into the
    gap between two of its runs.
    """
    started = time.time()
    while pattern and time.time() - started < timeout_s:
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if not [pid for pid in found if int(pid) != os.getpid()]:
            break
        if time.time() - started < poll_s:
            print(f"[bench] waiting while {pattern} runs (pids {' '.join(found)}) ...", flush=True)
        time.sleep(poll_s)
    return time.time() - started


def run_with_timeout(command: list[str], log_path: Path, timeout_s: float) -> tuple[dict, sft.LoadSampler]:
    """sft.run_measured with a time limit: past `timeout_s` the process is killed (SIGKILL: soup saves a
    checkpoint on SIGTERM, which would only take longer) and `timed_out` is set."""
    started = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = sft.LoadSampler(process.pid)
        sampler.start()
        timer = threading.Timer(timeout_s, process.send_signal, args=(signal.SIGKILL,))
        timer.start()
        _, status, usage = os.wait4(process.pid, 0)
        timer.cancel()
    sampler.done.set()
    sampler.join()
    wall_s = time.time() - started
    return {"status": os.waitstatus_to_exitcode(status), "timed_out": wall_s >= timeout_s,
            "process_peak_rss_mb": usage.ru_maxrss / 1024, "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "process_wall_s": wall_s}, sampler


def run_feature(name: str, model_dir: Path, data_file: Path, run_dir: Path, steps: int, warmup: int,
                timeout_s: float) -> dict:
    """One soup run with feature `name`; on failure, the error instead of figures."""
    precision, overrides, note = FEATURES[name]
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to
    run_dir.mkdir(parents=True)
    command = sft.soup_command(model_dir, data_file, run_dir, steps, precision, packed=False) + overrides
    log_path = run_dir.parent / f"{run_dir.name}.log"
    process, sampler = run_with_timeout(command, log_path, timeout_s)
    log = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    result = {"feature": name, "precision": precision, "overrides": overrides, "note": note, "command": command,
              **process, "log": str(log_path),
              "efficiency_lines": [line for line in log if EFFICIENCY_LINE.match(line)],
              "soup_lines": [line for line in log if line.startswith("[soup] ")]}
    if process["status"] != 0:
        reason = f"timed out after {timeout_s:.0f} s" if process["timed_out"] else f"exit {process['status']}"
        return {**result, "error": reason, "log_tail": sft.tail(log_path, 20)}
    record = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    figures = sft.summarise([r["time"] for r in rows], [r["trained_tokens"] for r in rows], warmup, sampler)
    stats = record["stats"]
    return {**result, **figures, "steps": stats["steps"], "peak_rss_mb": stats["peak_memory_mb"],
            "loss_first_step": rows[0]["loss"], "loss_last_step": rows[-1]["loss"],
            "torch_threads": record["device"]["torch_threads"]}


def measure(label: str, run_once, args: argparse.Namespace) -> list[dict]:
    """Run `run_once(attempt)` on a quiet machine until a try sees little other load; every try is returned."""
    tries = []
    for attempt in range(1, args.max_tries + 1):
        waited_s = wait_for_other_benchmarks(args.others_pattern, args.others_timeout)
        idle = sft.wait_for_idle(args.idle_timeout)
        print(f"[bench] {label} (try {attempt}) ...", flush=True)
        run = run_once(attempt)
        loaded = run.get("other_load", 0.0) > args.max_other_load
        run.update(attempt=attempt, discarded=loaded and attempt < args.max_tries, other_benchmarks_wait_s=waited_s,
                   **idle)
        tries.append(run)
        if "error" in run:
            print(f"[bench] {label}: FAILED ({run['error']})\n{run['log_tail']}", flush=True)
            break
        print(f"[bench] {label}: {run['trained_tokens_per_s']:.0f} trained tokens/s, peak RSS "
              f"{run['peak_rss_mb']:.0f} MB, other load {run['other_load']:.0%} ({run['process_wall_s']:.0f} s)"
              f"{'; discarded, retrying' if run['discarded'] else ''}", flush=True)
        for line in run.get("efficiency_lines", []):
            print(f"         {line}")
        if not run["discarded"]:
            break
    return tries


# --------------------------------------------------------------------------- report


def parse_efficiency(lines: list[str]) -> dict:
    """The numbers in soup's '[soup] multipack: ...' / '[soup] packing: ...' lines."""
    out = {}
    for line in lines:
        if m := re.search(r"multipack \((\w+): .*\): (\d+) bins per epoch, efficiency ([\d.]+) of capacity, "
                          r"([\d.]+) of padded cells \(random batches of examples: ([\d.]+)\)", line):
            out.update(multipack_layout=m[1], multipack_bins_per_epoch=int(m[2]), multipack_of_capacity=float(m[3]),
                       multipack_of_padded_cells=float(m[4]), random_batches_padding_efficiency=float(m[5]))
        elif m := re.search(r"packing: (\d+) examples -> (\d+) rows of <= (\d+) tokens, efficiency ([\d.]+)", line):
            out.update(packing_examples=int(m[1]), packing_rows=int(m[2]), packing_efficiency=float(m[4]))
    return out


def keep(tries: list[dict]) -> dict:
    """The fastest successful try (outside load only ever slows a run, as in sft.py's best-of-N), else the last."""
    done = [run for run in tries if "error" not in run]
    return max(done, key=lambda run: run["trained_tokens_per_s"]) if done else tries[-1]


def build_table(kept: dict[str, dict]) -> list[dict]:
    base = kept.get("baseline")
    table = []
    for name, run in kept.items():
        row = {"feature": name, "note": run.get("note", "")}
        if "error" in run:
            row["error"] = run["error"]
        else:
            row.update(trained_tokens_per_s=run["trained_tokens_per_s"], peak_rss_mb=run["peak_rss_mb"],
                       process_peak_rss_mb=run["process_peak_rss_mb"], other_load=run["other_load"],
                       measured_steps=run["measured_steps"], tokens_per_step=run["measured_trained_tokens"] /
                       run["measured_steps"])
            if base and "error" not in base:
                row["speed_vs_baseline"] = run["trained_tokens_per_s"] / base["trained_tokens_per_s"]
                row["peak_rss_delta_mb"] = run["peak_rss_mb"] - base["peak_rss_mb"]
        row.update(parse_efficiency(run.get("efficiency_lines", [])))
        table.append(row)
    return table


def print_table(table: list[dict]) -> None:
    header = (f"{'feature':<24} {'tok/s':>7} {'vs base':>8} {'peak MB':>8} {'vs base MB':>10} {'tok/step':>8} "
              f"{'load':>5}")
    print(header)
    print("-" * len(header))
    for r in table:
        if "error" in r:
            print(f"{r['feature']:<24} FAILED: {r['error']}")
            continue
        speed = f"{r['speed_vs_baseline']:.2f}x" if "speed_vs_baseline" in r else ""
        delta = f"{r['peak_rss_delta_mb']:+.0f}" if "peak_rss_delta_mb" in r else ""
        print(f"{r['feature']:<24} {r['trained_tokens_per_s']:>7.0f} {speed:>8} {r['peak_rss_mb']:>8.0f} "
              f"{delta:>10} {r['tokens_per_step']:>8.0f} {r['other_load']:>5.0%}")
    print("tok/s = trained tokens / wall time over the measured steps; peak MB = whole-process peak RSS "
          "(run.json);\nload = CPU used by other processes during the run, as a share of all cores.")


def goals(table: list[dict]) -> dict:
    """The issue's goals, reported (not asserted)."""
    rows = {r["feature"]: r for r in table}
    ok = {name: r for name, r in rows.items() if "error" not in r}
    out = {}
    if "multipack" in rows and "multipack_of_capacity" in rows["multipack"]:
        r = rows["multipack"]
        out["multipack_of_capacity"] = {"goal": ">= 0.95", "value": r["multipack_of_capacity"],
                                        "met": r["multipack_of_capacity"] >= 0.95,
                                        "random_batches_padding_efficiency": r["random_batches_padding_efficiency"]}
    if "baseline" in ok:
        base_mb = ok["baseline"]["peak_rss_mb"]
        tiers = {name: ok[name]["peak_rss_mb"] for name in ("checkpointing=full", "checkpointing=medium",
                                                            "checkpointing=selective") if name in ok}
        if tiers:
            out["checkpointing_changes_peak"] = {"baseline_mb": base_mb, "tiers_mb": tiers,
                                                 "deltas_mb": {k: v - base_mb for k, v in tiers.items()}}
        if "offload=disk" in ok:
            mb = ok["offload=disk"]["peak_rss_mb"]
            out["offload_disk_reduces_peak"] = {"baseline_mb": base_mb, "offload_mb": mb, "delta_mb": mb - base_mb,
                                                "met": mb < base_mb}
    if SOUP_BEST in ok and "trl-best" in ok:
        ratio = ok[SOUP_BEST]["trained_tokens_per_s"] / ok["trl-best"]["trained_tokens_per_s"]
        out["soup_over_trl_best"] = {"goal": ">= 2.0", "soup": SOUP_BEST, "trl": "trl-best (packing=bfd, bf16)",
                                     "ratio": ratio, "met": ratio >= 2.0}
    trl_runs = {name: r for name, r in ok.items() if name.startswith("trl-")}
    if SOUP_BEST in ok and trl_runs:
        # The issue names TRL's packing modes as its best; on CPU its padded mode is faster, so
        # soup is also read against whichever TRL run was fastest here.
        fastest = max(trl_runs, key=lambda name: trl_runs[name]["trained_tokens_per_s"])
        out["soup_over_trl_fastest"] = {"soup": SOUP_BEST, "trl": fastest, "ratio": ok[SOUP_BEST][
            "trained_tokens_per_s"] / trl_runs[fastest]["trained_tokens_per_s"]}
    return out


def print_goals(found: dict) -> None:
    if g := found.get("multipack_of_capacity"):
        print(f"multipack fills {g['value']:.1%} of bin capacity (goal >= 95%: {'met' if g['met'] else 'NOT met'}); "
              f"random padded batches use {g['random_batches_padding_efficiency']:.1%} of their cells")
    if g := found.get("checkpointing_changes_peak"):
        print("checkpointing peak RSS vs baseline: " + ", ".join(f"{k.split('=')[1]} {v:+.0f} MB"
                                                                 for k, v in g["deltas_mb"].items()))
    if g := found.get("offload_disk_reduces_peak"):
        print(f"offload=disk peak RSS vs baseline: {g['delta_mb']:+.0f} MB ({'lower' if g['met'] else 'NOT lower'})")
    if g := found.get("soup_over_trl_best"):
        print(f"soup {g['soup']} / TRL best (packing=bfd, bf16): {g['ratio']:.2f}x trained tokens/s "
              f"(goal >= 2x: {'met' if g['met'] else 'NOT met'})")
    if g := found.get("soup_over_trl_fastest"):
        print(f"soup {g['soup']} / TRL's fastest run here ({g['trl']}): {g['ratio']:.2f}x trained tokens/s")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "memory.json")
    parser.add_argument("--scratch", type=Path, default=ROOT / ".bench" / "memory")
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES),
                        help="the baseline is always run (first)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL best-configuration run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="left out of the figures (>= 1)")
    parser.add_argument("--measured-steps", type=int, default=15)
    parser.add_argument("--run-timeout", type=float, default=300.0,
                        help="seconds before a run (e.g. kernels=compile) is killed and recorded as failed")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--max-other-load", type=float, default=0.10)
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
    bf16_runs = [f"{f} (--features)" for f in args.features if FEATURES[f][0] == "bf16"]
    bf16_runs += [] if args.no_trl else ["the TRL rows (--no-trl)"]
    sft.refuse_slow_bf16(parser, bool(bf16_runs), f"leave out the bf16 runs: {', '.join(bf16_runs)}")

    started = time.time()
    scratch = args.scratch.resolve()
    model = sft.build_model_dir(scratch / "model")
    data = sft.build_data_files(scratch / "model", scratch / "data")
    model_dir, runs_dir = Path(model["dir"]), scratch / "runs"
    print(f"model: {model['parameters'] / 1e6:.2f}M params; data: {data['rows_used']} of {data['rows']} rows, "
          f"{data['soup_tokens_per_row']['mean']:.0f} tokens per row on average before truncation to {sft.MAX_LENGTH}",
          flush=True)

    features = ["baseline"] + [f for f in args.features if f != "baseline"]
    tries: dict[str, list[dict]] = {}
    for name in features:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        tries[name] = measure(name, lambda attempt: run_feature(
            name, model_dir, Path(data["soup_file"]), runs_dir / f"{slug}-try{attempt}", steps, args.warmup_steps,
            args.run_timeout), args)
    if not args.no_trl:
        def run_trl(attempt: int) -> dict:
            try:
                run = sft.run_trl(model_dir, Path(data["trl_file"]), runs_dir / f"trl-best-try{attempt}", steps,
                                  args.warmup_steps, "bf16", packed=True)
            except RuntimeError as exc:  # sft.run_trl raises on a failed child; record it, go on
                return {"feature": "trl-best", "error": str(exc).splitlines()[0], "log_tail": str(exc)}
            return {"feature": "trl-best", "note": "TRL SFTTrainer packing=True bfd (padding-free), bf16", **run}
        tries["trl-best"] = measure("trl-best", run_trl, args)

        def run_trl_padded(attempt: int) -> dict:
            try:
                run = sft.run_trl(model_dir, Path(data["trl_file"]), runs_dir / f"trl-padded-bf16-try{attempt}", steps,
                                  args.warmup_steps, "bf16", packed=False)
            except RuntimeError as exc:
                return {"feature": "trl-padded-bf16", "error": str(exc).splitlines()[0], "log_tail": str(exc)}
            return {"feature": "trl-padded-bf16", "note": "TRL SFTTrainer padded batches, bf16 (its fastest on CPU "
                                                          "in sft.py)", **run}
        tries["trl-padded-bf16"] = measure("trl-padded-bf16", run_trl_padded, args)

    kept = {name: keep(runs) for name, runs in tries.items()}
    table = build_table(kept)
    found = goals(table)
    print()
    print_table(table)
    print(sft.machine_line(sft.machine_info()))
    print()
    for run in kept.values():
        for line in run.get("efficiency_lines", []):
            print(line)
    print_goals(found)

    report = {
        "benchmark": "memory_features_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "machine": sft.machine_info(),
        "settings": {"max_length": sft.MAX_LENGTH, "micro_batch_size": sft.MICRO_BATCH, "grad_accum_steps": 1,
                     "lr": sft.LR, "seed": sft.SEED, "warmup_steps": args.warmup_steps,
                     "measured_steps": args.measured_steps, "run_timeout_s": args.run_timeout,
                     "peak_rss": "run.json stats.peak_memory_mb (ru_maxrss, whole process)",
                     "rate": "trained tokens / wall time over the measured steps"},
        "model": model,
        "data": data,
        "table": table,
        "goals": found,
        "runs": tries,
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
