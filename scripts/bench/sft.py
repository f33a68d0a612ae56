"""SFT throughput on CPU: soup beside TRL's SFTTrainer, on the same model, data, batches and steps.

    pip install -e '.[bench]'
    python scripts/bench/sft.py                                   # fp32 + bf16, ~12 min on a quiet 2-core machine
    python scripts/bench/sft.py --precisions fp32 --repeats 1 --measured-steps 4   # a quick look

What runs (each trainer in its own subprocess, one after the other):

    soup         python -m soup.train ... (the real entry point, Hydra overrides below)
    trl          trl.SFTTrainer, padded batches: the like-for-like peer of soup
    soup-packed  soup with data.packing=true data.packing_cross_doc_attn_mask=true: rows of
                 up to 512 tokens holding several examples, attention kept inside each
                 example (a [8, 1, 512, 512] block-diagonal mask with sdpa)
    trl-packed   trl.SFTTrainer with packing=True, packing_strategy="bfd", which turns on
                 padding_free: TRL's fastest documented setting, the peer of soup-packed.
                 Its 8 bins are flattened into one row of ~4096 tokens; with sdpa,
                 transformers then masks attention block-diagonally over that whole row
    The packed pairs train on other batches than the padded pairs (and each packs its
    own way), so only their rates compare.

Same for every trainer: one model directory (a ~4.6M-parameter Llama, random init with
a fixed seed, built once per run under --scratch with the stories260k tokenizer, pad =
eos), the ChatML template string `soup.data.templates.CHATML`, max_length 512
(truncating), micro-batch 8, no accumulation, AdamW (torch.optim.AdamW with its fused
kernel: soup's optim.implementation=fused, TRL's optim="adamw_torch_fused", HF's default;
lr 3e-4, weight decay 0), constant lr, grad clip 1.0, no eval, no checkpoints, no
gradient checkpointing, dataloader in-process, torch's default threads.

Same batches: soup draws its batches with its own seeded permutation; the TRL file holds
the rows in exactly that order and TRL reads it with `train_sampling_strategy=
"sequential"`, so step k of both trainers trains the same 8 rows.

Same trained tokens: soup labels the assistant reply and its `<|im_end|>\\n`. TRL gets each
row as a conversational prompt/completion pair (prompt = [user], completion = [assistant])
with `completion_only_loss=True`, which labels every token after the rendered prompt
(`...<|im_start|>assistant\\n`): the same tokens. (`assistant_only_loss=True` would need a
second template with {% generation %} markers.) One real difference, kept because it is
each trainer's own behaviour: soup lets the tokenizer add its BOS (the template writes
none), TRL's chat path never adds special tokens. So soup's rows are one token longer,
and a row truncated at 512 keeps one trained token fewer in soup than in TRL.

Rows dropped for both: rows whose prompt alone fills max_length leave no trained token.
TRL silently drops them; soup stops with a DataError (data.overlong=truncate), so the
benchmark writes a copy of the data without them (one row of the 999 at 512 tokens).

Counting and timing, identical on both sides:
    trained tokens of a step = labels[..., 1:] != -100 summed over the step's batch
        (soup: its metrics.jsonl `trained_tokens`; TRL: counted in a wrapper around its
        data collator, handed to the step in order)
    step time = wall time from the end of the previous step to the end of this one, so
        data loading, collation, logging and the optimizer are all inside it
        (soup: the `time` stamps of consecutive metrics.jsonl lines; TRL: a callback's
        on_step_end)
    the first --warmup-steps steps are left out on both sides (allocator and caches warm up)
    trained_tokens_per_s = sum(tokens) / sum(step time) over the measured steps;
        the per-step mean and median of tokens / step time are reported beside it
    peak_rss_mb = the process's peak resident set size (getrusage ru_maxrss) taken inside
        the trainer's process right after training (soup: run.json stats.peak_memory_mb,
        taken after its final save); process_peak_rss_mb = the same for the whole
        process lifetime, from os.wait4 in this script

Load: on a shared 2-core machine one busy neighbour slows a 2-thread trainer 3-8x. Before
each run the script waits for 10 s of quiet; a sampler thread records the CPU time every
other process used during each step (other_load); a run above --max-other-load is run
again. --repeats runs the whole set that many times, interleaved, and the table keeps each
row's fastest run (outside load only ever slows a run); every run stays in the JSON. For
soup vs TRL padded, `paired_steps` also compares the two on the same-batch steps that both
ran undisturbed.

soup never imports TRL; this script imports TRL only inside the TRL subprocess.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
TOKENIZER_DIR = SHARED / "models" / "stories260k"
DATA_FILE = SHARED / "data" / "sft" / "llamafactory_alpaca_en_demo.alpaca.jsonl"

# ~4.6M parameters: big enough that the model, not Python, dominates a step.
MODEL_ARCH = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=512, rope_theta=10000.0,
                  tie_word_embeddings=False)
MODEL_INIT_SEED = 0
SEED = 42
MAX_LENGTH = 512
MICRO_BATCH = 8
LR = 3e-4
IGNORE_INDEX = -100
TRAINERS = ("soup", "trl", "soup-packed", "trl-packed")
PACKED = ("soup-packed", "trl-packed")
PEER = {"trl": "soup", "trl-packed": "soup-packed"}  # the soup row each TRL row is compared with


# --------------------------------------------------------------------------- inputs


def build_model_dir(model_dir: Path) -> dict:
    """Save one randomly initialised Llama + tokenizer (pad = eos, no chat template) to `model_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = None
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_ARCH)
    torch.manual_seed(MODEL_INIT_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"dir": str(model_dir), "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "init_seed": MODEL_INIT_SEED, **MODEL_ARCH}


def build_data_files(model_dir: Path, data_dir: Path) -> dict:
    """Write the alpaca file soup reads and the prompt/completion file TRL reads, same rows.

    Drops rows that keep no trained token after truncation to MAX_LENGTH (see the module
    docstring). The TRL file is in soup's epoch-0 batch order.
    """
    from transformers import AutoTokenizer

    from soup.data.formats import to_messages
    from soup.data.readers import read_rows
    from soup.data.sampler import ResumableBatchSampler
    from soup.data.templates import CHATML
    from soup.data.tokenize import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = DATA_FILE.read_text(encoding="utf-8").splitlines()
    kept_lines, conversations, dropped_lines, lengths = [], [], [], []
    for row in read_rows(DATA_FILE):
        messages = to_messages(row, "alpaca")
        input_ids, labels = tokenize_chat(messages, tokenizer, CHATML, train_on_responses_only=True)
        if all(label == IGNORE_INDEX for label in labels[:MAX_LENGTH]):
            dropped_lines.append(row.line)
            continue
        kept_lines.append(lines[row.line - 1])
        conversations.append({"prompt": messages[:-1], "completion": messages[-1:]})
        lengths.append(len(input_ids))

    data_dir.mkdir(parents=True, exist_ok=True)
    soup_file = data_dir / "alpaca_en_demo.fits512.alpaca.jsonl"
    soup_file.write_text("\n".join(kept_lines) + "\n", encoding="utf-8")
    order = ResumableBatchSampler(len(conversations), MICRO_BATCH, SEED).epoch_order(0)
    trl_file = data_dir / "alpaca_en_demo.fits512.soup_order.prompt_completion.jsonl"
    trl_file.write_text("".join(json.dumps(conversations[i]) + "\n" for i in order), encoding="utf-8")
    return {
        "source": str(DATA_FILE), "rows": len(lines), "rows_used": len(conversations),
        "dropped_source_lines": dropped_lines, "soup_file": str(soup_file), "trl_file": str(trl_file),
        "soup_tokens_per_row": {"mean": statistics.mean(lengths), "median": statistics.median(lengths),
                                "max": max(lengths), "over_max_length": sum(n > MAX_LENGTH for n in lengths)},
    }


# --------------------------------------------------------------------------- figures


def summarise(step_end_s: list[float], step_tokens: list[int], warmup: int, sampler: LoadSampler) -> dict:
    """Throughput over the steps after `warmup`, from wall-clock step end times and trained tokens.

    step_end_s[0] is the end of step 1; step k's time is end_k - end_{k-1}, so warmup >= 1.
    """
    ends = step_end_s[warmup - 1:]
    times = [b - a for a, b in zip(ends, ends[1:])]
    tokens = step_tokens[warmup:]
    rates = [n / t for n, t in zip(tokens, times)]
    return {
        "trained_tokens_per_s": sum(tokens) / sum(times),
        "trained_tokens_per_s_step_mean": statistics.mean(rates),
        "trained_tokens_per_s_step_median": statistics.median(rates),
        "measured_steps": len(times),
        "measured_trained_tokens": sum(tokens),
        "measured_time_s": sum(times),
        "other_load": sampler.other_load(ends[0], ends[-1]),
        "step_time_s": times,
        "step_trained_tokens": tokens,
        "step_other_load": [sampler.other_load(a, b) for a, b in zip(ends, ends[1:])],
    }


def busy_cpu_s() -> float:
    """CPU-seconds all cores have spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat", encoding="utf-8") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(timeout_s: float, busy_below: float = 0.15, quiet_s: float = 10.0, window_s: float = 2.0) -> dict:
    """Wait until under `busy_below` of all cores has been busy for `quiet_s` in a row (or `timeout_s` passes).

    On a shared machine (other work's tests running beside the benchmark) a burst of load
    slows whichever trainer it overlaps; waiting for a quiet machine, and recording the
    load seen during each run (other_load), keeps that visible instead of hidden in a ratio.
    """
    started, quiet_since = time.time(), time.time()
    while True:
        before = busy_cpu_s()
        time.sleep(window_s)
        load = (busy_cpu_s() - before) / (window_s * os.cpu_count())
        if load >= busy_below:
            quiet_since = time.time()
        if time.time() - quiet_since >= quiet_s or time.time() - started > timeout_s:
            return {"idle_wait_s": round(time.time() - started, 1), "quiet_s": round(time.time() - quiet_since, 1)}


def process_cpu_s(pid: int) -> float:
    """CPU-seconds (user + system, all threads) process `pid` has used so far."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoadSampler(threading.Thread):
    """Samples (wall time, busy CPU-s of all cores, CPU-s of the trainer) every `period_s`.

    other_load(a, b) is what every other process used between wall times a and b, as a
    fraction of all cores: 0 means the trainer had the machine to itself.
    """

    def __init__(self, pid: int, period_s: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.period_s = pid, period_s
        self.samples: list[tuple[float, float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.samples.append((time.time(), busy_cpu_s(), self.own_cpu_s()))
            except (OSError, IndexError):
                return  # the process has exited
            self.done.wait(self.period_s)

    def own_cpu_s(self) -> float:
        """CPU-seconds the measured run has used so far."""
        return process_cpu_s(self.pid)

    def other_load(self, a: float, b: float) -> float:
        before = [s for s in self.samples if s[0] <= a] or self.samples[:1]
        after = [s for s in self.samples if s[0] >= b] or self.samples[-1:]
        (t0, busy0, own0), (t1, busy1, own1) = before[-1], after[0]
        if t1 <= t0:
            return 0.0
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((t1 - t0) * os.cpu_count())


def run_measured(command: list[str], log_path: Path) -> tuple[dict, LoadSampler]:
    """Run `command` (output to `log_path`): exit status, peak RSS, CPU time and a load sampler."""
    started = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = LoadSampler(process.pid)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
    sampler.done.set()
    sampler.join()
    return {"status": os.waitstatus_to_exitcode(status), "process_peak_rss_mb": usage.ru_maxrss / 1024,
            "process_cpu_s": usage.ru_utime + usage.ru_stime, "process_wall_s": time.time() - started}, sampler


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- soup


def soup_command(model_dir: Path, data_file: Path, run_dir: Path, steps: int, precision: str,
                 packed: bool) -> list[str]:
    packing = ["data.packing=true", "data.packing_cross_doc_attn_mask=true"] if packed else []
    return [
        sys.executable, "-m", "soup.train",
        "model=hf", f"model.path={model_dir}",
        "data=file", f"data.train_file={data_file}", "data.format=alpaca", "data.chat_template=chatml",
        f"data.max_length={MAX_LENGTH}", "data.val_split=0",
        f"train.micro_batch_size={MICRO_BATCH}", "train.grad_accum_steps=1", f"train.max_steps={steps}",
        f"train.precision={precision}", "train.max_grad_norm=1.0",
        "train.save_every_steps=0", "train.log_every_steps=1", "train.progress_bar=false", "train.device=cpu",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.implementation=fused", "sched=constant", f"seed={SEED}",
        f"hydra.run.dir={run_dir}", *packing,
    ]


def run_soup(model_dir: Path, data_file: Path, run_dir: Path, steps: int, warmup: int, precision: str,
             packed: bool) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to, so start from an empty run dir
    run_dir.mkdir(parents=True)
    command = soup_command(model_dir, data_file, run_dir, steps, precision, packed)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    process, sampler = run_measured(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"soup failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    record = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    stats = record["stats"]
    figures = summarise([r["time"] for r in rows], [r["trained_tokens"] for r in rows], warmup, sampler)
    own = [r["trained_tokens_per_s"] for r in rows[warmup:]]
    return {
        "command": command,
        "steps": stats["steps"],
        **figures,
        "peak_rss_mb": stats["peak_memory_mb"],
        **process,
        # soup's own step timer stops before its per-step logging; shown for transparency.
        "soup_self_reported_step_mean_tokens_per_s": statistics.mean(own),
        "soup_run_json_trained_tokens_per_s_all_steps": stats["trained_tokens_per_s"],
        "rows_used": stats["data"]["train"]["rows_used"],
        "loss_first_step": rows[0]["loss"], "loss_last_step": rows[-1]["loss"],
        "torch_threads": record["device"]["torch_threads"],
        "log": str(log_path),
    }


# --------------------------------------------------------------------------- TRL


def trl_settings(precision: str, packed: bool, steps: int) -> dict:
    """SFTConfig arguments; every default that differs from soup's run is set explicitly."""
    return dict(
        max_steps=steps, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused",  # HF's default on torch >= 2.8; soup runs optim.implementation=fused
        bf16=precision == "bf16", fp16=False,  # SFTConfig defaults to bf16=True
        gradient_checkpointing=False,  # SFTConfig defaults to True; soup runs checkpointing=none
        use_cpu=True, max_length=MAX_LENGTH, truncation_mode="keep_start",
        completion_only_loss=True, packing=packed, packing_strategy="bfd",
        train_sampling_strategy="sequential", shuffle_dataset=False, seed=SEED,
        dataloader_num_workers=0, report_to=[], eval_strategy="no", save_strategy="no",
        logging_steps=1, disable_tqdm=True,
    )


def run_trl(model_dir: Path, data_file: Path, work_dir: Path, steps: int, warmup: int, precision: str,
            packed: bool) -> dict:
    from soup.data.templates import CHATML

    work_dir.mkdir(parents=True, exist_ok=True)
    spec = {"model_dir": str(model_dir), "data_file": str(data_file), "chat_template": CHATML,
            "output_dir": str(work_dir / "trainer"), "result": str(work_dir / "result.json"),
            "settings": trl_settings(precision, packed, steps)}
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_path)]
    log_path = work_dir.parent / f"{work_dir.name}.log"
    process, sampler = run_measured(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"TRL failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    child = json.loads(Path(spec["result"]).read_text())
    return {
        "command": command, "settings": spec["settings"], "steps": len(child["step_end_s"]),
        **summarise(child["step_end_s"], child["step_trained_tokens"], warmup, sampler),
        "peak_rss_mb": child["peak_rss_mb"], **process,
        "train_dataset_rows": child["train_dataset_rows"], "loss_first_step": child["losses"][0], "loss_last_step": child["losses"][-1],
        "torch_threads": child["torch_threads"], "log": str(log_path),
    }


def trl_child(spec_path: str) -> None:
    """The TRL process: train, timing each step and counting its trained tokens."""
    from collections import deque

    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    tokenizer.chat_template = spec["chat_template"]
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]

    batch_tokens: deque[int] = deque()
    step_end_s, step_tokens, losses = [], [], []

    class CountingCollator:
        """Counts each batch's trained tokens as it is built; batches reach steps in build order."""

        def __init__(self, collate):
            self.collate = collate

        def __call__(self, examples):
            batch = self.collate(examples)
            batch_tokens.append(int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()))
            return batch

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end_s.append(time.time())  # wall clock, as soup's metrics.jsonl and the load sampler
            step_tokens.append(batch_tokens.popleft())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = trl.SFTConfig(output_dir=spec["output_dir"], **spec["settings"])
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[StepClock()])
    # The dataloader is built inside train(), from this attribute.
    trainer.data_collator = CountingCollator(trainer.data_collator)
    trainer.train()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps({
        "step_end_s": step_end_s, "step_trained_tokens": step_tokens, "losses": losses,
        "peak_rss_mb": peak_rss_mb, "train_dataset_rows": len(trainer.train_dataset),  # packed: bins
        "torch_threads": torch.get_num_threads(),
    }))


# --------------------------------------------------------------------------- report


def soup_source() -> dict:
    """Where the soup that ran came from: this checkout, its commit, and whether soup/ or conf/ had edits."""
    def git(*args: str) -> str | None:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "soup", "conf")
    return {"dir": str(ROOT), "commit": commit, "soup_or_conf_edited": None if dirty is None else bool(dirty)}


def machine_info() -> dict:
    import torch

    from soup.precision import cpu_record

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "tokenizers", "soup-harness"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    # cpu_capability (torch's SIMD level) and cpu_native_bf16 / cpu_bf16: what a bf16 row means here.
    return {"cpu": cpu, **cpu_record(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "versions": versions}


def machine_line(machine: dict) -> str:
    """The machine under a printed table: a bf16 figure means little without the CPU's bf16 support."""
    return (f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, torch CPU capability "
            f"{machine['cpu_capability']}, native bf16 {'yes' if machine['cpu_native_bf16'] else 'no'} "
            f"(bf16 path: {machine['cpu_bf16']})")


def refuse_slow_bf16(parser: argparse.ArgumentParser, wants_bf16: bool, fix: str) -> None:
    """bf16 rows on a CPU without a fast bf16 path would time torch's fallback kernel (~100x slower than
    fp32), and soup refuses train.precision=bf16 there: stop before any run, naming `fix`."""
    from soup.precision import slow_cpu_bf16_error

    if wants_bf16 and slow_cpu_bf16_error() is not None:
        parser.error(f"this CPU has no fast bf16 path (soup/precision.py), so bf16 rows would time a "
                     f"fallback kernel ~100x slower than fp32: {fix} (or set SOUP_ALLOW_SLOW_BF16=1)")


def best_runs(runs: list[dict]) -> list[dict]:
    """One row per (precision, trainer): the fastest kept run, with soup's ratios to it.

    Best-of-N, as timeit does: outside load only ever slows a run, so the fastest repeat
    is the closest to what the code itself costs. Every run stays in the JSON.
    """
    best = {}
    for run in runs:
        key = (run["precision"], run["trainer"])
        if not run["discarded"] and (key not in best or run["trained_tokens_per_s"] > best[key]["trained_tokens_per_s"]):
            best[key] = run
    table = []
    for (precision, trainer), run in best.items():
        row = {k: v for k, v in run.items() if not k.startswith("step_")}
        peer = best.get((precision, PEER.get(trainer)))
        if peer is not None:
            row["compared_with"] = peer["trainer"]
            row["soup_over_this"] = peer["trained_tokens_per_s"] / run["trained_tokens_per_s"]
            row["soup_peak_rss_over_this"] = peer["peak_rss_mb"] / run["peak_rss_mb"]
        if peer is not None and trainer == "trl":
            row["paired_steps"] = paired_steps(peer, run)
        table.append(row)
    return table


def paired_steps(soup: dict, trl: dict, max_load: float = 0.05) -> dict:
    """soup against TRL on the same batches, over the steps both ran with under `max_load` other load.

    Step k of both trainers trains the same 8 rows, so leaving out a step disturbed on
    either side keeps the comparison paired; the median per-step time ratio is robust to
    what the load sampler cannot see.
    """
    steps = [k for k, (s_l, t_l) in enumerate(zip(soup["step_other_load"], trl["step_other_load"]))
             if s_l < max_load and t_l < max_load]
    if not steps:
        return {"steps": 0}
    soup_time = sum(soup["step_time_s"][k] for k in steps)
    trl_time = sum(trl["step_time_s"][k] for k in steps)
    soup_rate = sum(soup["step_trained_tokens"][k] for k in steps) / soup_time
    trl_rate = sum(trl["step_trained_tokens"][k] for k in steps) / trl_time
    return {"steps": len(steps), "max_other_load": max_load,
            "soup_trained_tokens_per_s": soup_rate, "trl_trained_tokens_per_s": trl_rate,
            "soup_over_trl": soup_rate / trl_rate,
            "median_trl_time_over_soup_time": statistics.median(
                trl["step_time_s"][k] / soup["step_time_s"][k] for k in steps)}


def print_table(table: list[dict]) -> None:
    header = (f"{'precision':<9} {'trainer':<11} {'steps':>5} {'tok/s':>7} {'mean':>7} {'median':>7} "
              f"{'peak RSS MB':>11} {'other load':>10} {'soup/TRL':>9}")
    print(header)
    print("-" * len(header))
    for r in table:
        ratio = f"{r['soup_over_this']:.2f}x" if "soup_over_this" in r else ""  # vs its PEER row
        print(f"{r['precision']:<9} {r['trainer']:<11} {r['measured_steps']:>5} {r['trained_tokens_per_s']:>7.0f} "
              f"{r['trained_tokens_per_s_step_mean']:>7.0f} {r['trained_tokens_per_s_step_median']:>7.0f} "
              f"{r['peak_rss_mb']:>11.0f} {r['other_load']:>10.0%} {ratio:>9}")
    print("tok/s = trained tokens / wall time over the measured steps (mean, median: per step); fastest kept "
          "run;\nsoup/TRL = soup's tok/s over TRL's (trl vs soup, trl-packed vs soup-packed); other load = CPU\n"
          "used by other processes during that run, as a share of all cores.")
    for r in table:
        paired = r.get("paired_steps")
        if paired and paired["steps"]:
            print(f"{r['precision']}: the {paired['steps']} same-batch steps both ran undisturbed (other load < 5%): "
                  f"soup {paired['soup_trained_tokens_per_s']:.0f}, TRL {paired['trl_trained_tokens_per_s']:.0f} "
                  f"tok/s, soup/TRL {paired['soup_over_trl']:.2f}x; median step-time ratio TRL/soup "
                  f"{paired['median_trl_time_over_soup_time']:.2f}")


def write_report(args: argparse.Namespace, started: float, model: dict, data: dict, runs: list[dict]) -> dict:
    """Write the JSON (after every run, so a killed benchmark keeps what it measured)."""
    report = {
        "benchmark": "sft_throughput_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "note": args.note,
        "soup_source": soup_source(),
        "machine": machine_info(),
        "settings": {"max_length": MAX_LENGTH, "micro_batch_size": MICRO_BATCH, "grad_accum_steps": 1, "lr": LR,
                     "schedule": "constant", "optimizer": "torch.optim.AdamW(fused=True), weight_decay 0", "max_grad_norm": 1.0,
                     "seed": SEED, "warmup_steps": args.warmup_steps, "measured_steps": args.measured_steps,
                     "repeats": args.repeats, "chat_template": "soup.data.templates.CHATML",
                     "trl_loss_mask": "conversational prompt/completion, completion_only_loss=True"},
        "model": model,
        "data": data,
        "table": best_runs(runs),
        "runs": runs,
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "sft.json")
    parser.add_argument("--scratch", type=Path, default=ROOT / ".bench" / "sft")
    parser.add_argument("--warmup-steps", type=int, default=3, help="left out of the figures (>= 1)")
    parser.add_argument("--measured-steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the fastest is reported")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    parser.add_argument("--packed-precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                        help="precisions at which soup-packed and trl-packed run")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--max-other-load", type=float, default=0.10,
                        help="a run during which other processes used more than this share of the cores is "
                             "run again (kept in the JSON as discarded)")
    parser.add_argument("--max-tries", type=int, default=4)
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. which snapshot ran)")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(args.trl_child)
        return
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be >= 1: a step's time starts at the end of the one before")
    steps = args.warmup_steps + args.measured_steps
    if steps * MICRO_BATCH > 990:
        parser.error("keep (warmup + measured) * 8 rows within one epoch of the 998 rows")
    refuse_slow_bf16(parser, "bf16" in args.precisions, "run with --precisions fp32")

    started = time.time()
    scratch = args.scratch.resolve()
    model = build_model_dir(scratch / "model")
    data = build_data_files(scratch / "model", scratch / "data")
    print(f"model: {model['parameters'] / 1e6:.2f}M params in {model['dir']}; data: {data['rows_used']} of "
          f"{data['rows']} rows (dropped source lines {data['dropped_source_lines']}: prompt fills max_length)")

    runs = []
    for repeat in range(args.repeats):
        for precision in args.precisions:
            for trainer in args.trainers:
                if trainer in PACKED and precision not in args.packed_precisions:
                    continue
                name = f"{trainer}-{precision}"
                for attempt in range(1, args.max_tries + 1):
                    idle = wait_for_idle(args.idle_timeout)
                    run_name = f"{name}-repeat{repeat + 1}-try{attempt}"
                    print(f"[bench] {name} (repeat {repeat + 1}/{args.repeats}, try {attempt}): {steps} steps ...",
                          flush=True)
                    if trainer.startswith("soup"):
                        run = run_soup(Path(model["dir"]), Path(data["soup_file"]), scratch / "runs" / run_name,
                                       steps, args.warmup_steps, precision, packed=trainer == "soup-packed")
                    else:
                        run = run_trl(Path(model["dir"]), Path(data["trl_file"]), scratch / "runs" / run_name, steps,
                                      args.warmup_steps, precision, packed=trainer == "trl-packed")
                    loaded = run["other_load"] > args.max_other_load
                    run.update(trainer=trainer, precision=precision, repeat=repeat, attempt=attempt,
                               discarded=loaded and attempt < args.max_tries, **idle)
                    runs.append(run)
                    print(f"[bench] {name}: {run['trained_tokens_per_s']:.0f} trained tokens/s, peak RSS "
                          f"{run['peak_rss_mb']:.0f} MB, other load {run['other_load']:.0%} "
                          f"({run['process_wall_s']:.0f} s){'; discarded, retrying' if run['discarded'] else ''}",
                          flush=True)
                    write_report(args, started, model, data, runs)
                    if not run["discarded"]:
                        break

    report = write_report(args, started, model, data, runs)
    print()
    print_table(report["table"])
    print(machine_line(report["machine"]))
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
