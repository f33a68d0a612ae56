"""DPO throughput and memory on CPU: soup beside TRL's DPOTrainer, same model, pairs, batches and steps.

    pip install -e '.[bench]'
    python scripts/bench/dpo.py                                     # fp32, both models, about 15 min on 2 cores
    python scripts/bench/dpo.py --models tiny --measured-steps 4    # a quick look

Rows (each one soup run and one TRL run, in their own subprocesses, one after the other):

    copy         full fine-tune, reference = a frozen copy of the policy
                 soup: task.reference=copy          TRL: ref_model=None (it loads its own copy)
    precomputed  full fine-tune, reference log-probs computed in one pass before training
                 soup: task.reference=precomputed   TRL: precompute_ref_log_probs=True
    lora         LoRA r 8, alpha 16, dropout 0, all linear layers but the head; reference = the
                 policy with its adapters disabled
                 soup: peft=lora task.reference=adapter   TRL: peft_config=LoraConfig(...)
    precomputed-stacked
                 (soup only, read beside TRL's precomputed run) soup with task.sequence_layout=stacked:
                 prompt+chosen and prompt+rejected as two padded rows, as TRL lays them out. The other
                 soup rows use the default layout, auto = shared_prompt here (each prompt forwarded
                 once, both completions after it under a mask, units packed into rows; same log-probs,
                 soup/data/shared_prompt.py), so this row shows how much of soup's lead is the layout.
    sft-lora     (soup only, for the memory goal) soup's SFT with LoRA on the same 16 sequences
                 per step that a lora DPO step forwards (below)

Same for every run: one model directory per size, random init with a fixed seed, stories260k
tokenizer (pad = eos): `tiny` has the shape of soup's model=tiny (~0.8M parameters), `small`
is sft.py's ~4.6M-parameter Llama. Batch 8 pairs (16 sequences, chosen and rejected in one
forward on both sides), no accumulation, torch.optim.AdamW (lr 1e-5, weight decay 0), constant
lr, grad clip 1.0, beta 0.1, sigmoid loss, no eval, no checkpoints, no gradient
checkpointing, dataloader in-process, torch's default threads.

Same tokens. Data: string prompt/chosen/rejected rows of hh_rlhf_harmless_base.jsonl. Both
trainers tokenize them as BOS + prompt, completion + EOS: soup tokenizes prompt and completion
apart, TRL (non-conversational path) prompt + completion + "</s>" together and splits at the
common prefix; on all 1800 rows the ids agree (the TRL child checks the rows it trains on).
Truncation cannot be made the same: TRL 1.16's DPOConfig has no max_prompt_length or
max_completion_length, only max_length applied to each prompt + completion with
truncation_mode="keep_start" ("keep_end" is deprecated), and it drops rows whose prompt alone
fills max_length; soup keeps a prompt's end (data.max_prompt_length=256) and a completion's
start (data.max_completion_length=256). So the benchmark trains on the first rows that need
no cut on either side (prompt <= 256 tokens, each completion <= 256): both trainers run with
those settings and neither cuts anything (soup's report and TRL's ids are checked).

Same batches: soup draws its batches with its seeded permutation; the TRL file holds the rows
in exactly that order and TRL reads it with train_sampling_strategy="sequential". The TRL
child records every batch's shape and completion-token count and the benchmark checks them
against soup's batches, step by step.

Counting and timing, identical on both sides (helpers from sft.py):
    pairs of a step = 8 (soup: metrics.jsonl `trained_pairs`; TRL: counted in a wrapper
        around its data collator)
    step time = wall time from the end of the previous step to the end of this one (soup:
        `time` stamps of consecutive metrics.jsonl lines; TRL: a callback's on_step_end)
    the first --warmup-steps steps are left out on both sides
    trained_pairs_per_s = sum(pairs) / sum(step time) over the measured steps
    reference_pass_s (precomputed) = the pass before training, outside every step time:
        soup: from its "[soup] model: ..." log line to its "[soup] reference: ..." line
        (includes the frozen copy it scores with); TRL: the time of _precompute_ref_logps
        (dataloader, pass and the datasets cache write). Batch 8 pairs on both sides
        (soup train.eval_batch_size=8, TRL precompute_ref_batch_size=8).
    peak_rss_mb = peak resident set size inside the trainer's process after training
        (soup: run.json stats.peak_memory_mb; TRL: getrusage in the child)
    rss_growth_mb = peak_rss_mb - the RSS sampled (every 0.25 s) when training starts
        (soup: its last "[soup]" line before step 1; TRL: on_train_begin). On CPU the peak
        includes ~1 GB of Python and libraries, which makes peak ratios crowd towards 1; the
        growth shows what training itself adds.

Memory goal (sft-lora): soup's LoRA-DPO peak RSS over soup's LoRA-SFT peak RSS on "the same
batch", taken here as the same forward shape: the SFT micro-batch holds exactly the 16
sequences (8 prompt + chosen, 8 prompt + rejected) that the DPO step forwards, with the loss
on the same completion tokens. A DPO step needs those 16 sequences' activations once for
the policy (with gradients) plus one no-grad reference forward, so this isolates what
preference training adds over SFT. (SFT on only the 8 chosen rows would halve the
activations and mostly measure the batch size.) The SFT rows go through soup's alpaca
reader with a pass-through chat template (content, then EOS after the reply), so soup
tokenizes them to the very ids of the DPO sequences; the benchmark checks it.

soup never imports TRL; this script imports TRL only inside the TRL subprocess.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import (  # noqa: E402  (scripts/bench is not a package)
    MODEL_ARCH as SMALL_ARCH,
    MODEL_INIT_SEED,
    ROOT,
    SEED,
    SHARED,
    TOKENIZER_DIR,
    LoadSampler,
    busy_cpu_s,
    machine_info,
    machine_line,
    process_cpu_s,
    refuse_slow_bf16,
    soup_source,
    summarise,
    tail,
    wait_for_idle,
)

DATA_FILE = SHARED / "data" / "preference" / "hh_rlhf_harmless_base.jsonl"
MAX_LENGTH = 512
MAX_PROMPT_LENGTH = 256
MAX_COMPLETION_LENGTH = 256
PAIRS_PER_BATCH = 8
LR = 1e-5
BETA = 0.1
LORA = dict(r=8, alpha=16, dropout=0.0, target_modules="all-linear")
ROWS = ("copy", "precomputed", "lora")
# soup-only rows and the TRL row each is read beside (None: no TRL counterpart).
SOUP_ONLY_ROWS = {"precomputed-stacked": "precomputed", "sft-lora": None}
# SFT on the DPO step's sequences, rendered verbatim: user content, then the reply and EOS.
PASS_THROUGH_TEMPLATE = ("{% for message in messages %}{{ message['content'] }}"
                         "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")


def model_archs() -> dict[str, dict]:
    from soup.config.schema import TinyArchConfig

    return {"tiny": asdict(TinyArchConfig()), "small": dict(SMALL_ARCH)}


# --------------------------------------------------------------------------- inputs


def build_model_dir(model_dir: Path, arch: dict) -> dict:
    """One randomly initialised Llama + tokenizer (pad = eos) in `model_dir`, and beside it
    `sft_tokenizer/`: the same tokenizer with the pass-through chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = None  # string pairs: no template is used
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)
    torch.manual_seed(MODEL_INIT_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tokenizer.chat_template = PASS_THROUGH_TEMPLATE
    tokenizer.save_pretrained(model_dir / "sft_tokenizer")
    return {"dir": str(model_dir), "sft_tokenizer_dir": str(model_dir / "sft_tokenizer"),
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
            "init_seed": MODEL_INIT_SEED, **arch}


def preference_data_cfg(train_file: Path):
    from omegaconf import OmegaConf

    from soup.config.schema import DataConfig

    return OmegaConf.structured(DataConfig(
        name="file", train_file=str(train_file), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
        max_completion_length=MAX_COMPLETION_LENGTH, val_split=0.0))


def build_data_files(model: dict, data_dir: Path, rows_needed: int) -> dict:
    """The pair file soup reads, the same pairs in soup's batch order for TRL, and the SFT file.

    Takes the first `rows_needed` rows that need no truncation (module docstring), then
    checks with soup's own readers that they tokenize as expected.
    """
    from transformers import AutoTokenizer

    from soup.data import build_datasets
    from soup.data.preference import build_preference_datasets
    from soup.data.readers import read_rows
    from soup.data.sampler import ResumableBatchSampler

    tokenizer = AutoTokenizer.from_pretrained(model["dir"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    lines = DATA_FILE.read_text(encoding="utf-8").splitlines()
    kept, skipped = [], 0
    for row in read_rows(DATA_FILE):
        record = row.record
        prompt = [bos] + ids(record["prompt"])
        completions = [ids(record[k]) + [eos] for k in ("chosen", "rejected")]
        if len(prompt) <= MAX_PROMPT_LENGTH and max(map(len, completions)) <= MAX_COMPLETION_LENGTH:
            kept.append((row.line, record))
            if len(kept) == rows_needed:
                break
        else:
            skipped += 1
    if len(kept) < rows_needed:
        raise SystemExit(f"only {len(kept)} rows of {DATA_FILE} fit {MAX_PROMPT_LENGTH}/{MAX_COMPLETION_LENGTH} "
                         f"tokens; lower --measured-steps")

    data_dir.mkdir(parents=True, exist_ok=True)
    soup_file = data_dir / "hh_rlhf_harmless_base.fits.jsonl"
    soup_file.write_text("".join(lines[line - 1] + "\n" for line, _ in kept), encoding="utf-8")
    splits = build_preference_datasets(preference_data_cfg(soup_file), tokenizer, "paired", SEED)
    report = splits.report
    if report.prompts_truncated or report.completions_truncated or report.rows_dropped:
        raise RuntimeError(f"soup cut rows the benchmark chose as fitting: {report.summary()}")
    examples = splits.train

    order = ResumableBatchSampler(len(examples), PAIRS_PER_BATCH, SEED).epoch_order(0)
    trl_file = data_dir / "hh_rlhf_harmless_base.fits.soup_order.jsonl"
    trl_file.write_text("".join(json.dumps({k: kept[i][1][k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                for i in order), encoding="utf-8")
    expected_file = data_dir / "soup_ids.soup_order.json"  # what the TRL child must tokenize to
    expected_file.write_text(json.dumps([examples[i] for i in order]))

    # The SFT stream: step k = the 8 prompt+chosen then the 8 prompt+rejected sequences of DPO
    # step k. soup's SFT sampler visits file row P[j] at stream position j, so row P[j] = sequence j.
    sequences = []
    for start in range(0, len(order), PAIRS_PER_BATCH):
        pairs = [kept[i][1] for i in order[start:start + PAIRS_PER_BATCH]]
        sequences += [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    sft_order = ResumableBatchSampler(len(sequences), 2 * PAIRS_PER_BATCH, SEED).epoch_order(0)
    sft_rows = [None] * len(sequences)
    for position, index in enumerate(sft_order):
        prompt, reply = sequences[position]
        sft_rows[index] = {"instruction": prompt, "output": reply}
    sft_file = data_dir / "hh_rlhf_harmless_base.fits.sft_stream.alpaca.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in sft_rows), encoding="utf-8")

    steps = []
    for start in range(0, len(order), PAIRS_PER_BATCH):
        batch = [examples[i] for i in order[start:start + PAIRS_PER_BATCH]]
        rows = [e["prompt_ids"] + e["chosen_ids"] for e in batch] + [e["prompt_ids"] + e["rejected_ids"] for e in batch]
        steps.append({"shape": [len(rows), max(map(len, rows))],
                      "completion_tokens": sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in batch)})
    check_sft_file(sft_file, model, examples, order, sft_order, build_datasets)

    lengths = [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
    return {
        "source": str(DATA_FILE), "rows_used": len(examples), "source_rows_skipped_as_needing_a_cut": skipped,
        "source_lines": [line for line, _ in kept], "soup_file": str(soup_file), "trl_file": str(trl_file),
        "expected_ids_file": str(expected_file), "sft_file": str(sft_file),
        "tokens_per_pair_longest_side": {"mean": statistics.mean(lengths), "median": statistics.median(lengths),
                                         "max": max(lengths)},
        "padded_batch_length": {"mean": statistics.mean(s["shape"][1] for s in steps),
                                "max": max(s["shape"][1] for s in steps)},
        "soup_report": asdict(report), "steps": steps,
    }


def check_sft_file(sft_file: Path, model: dict, examples: list, order: list, sft_order: list, build_datasets) -> None:
    """soup's SFT reader must give the DPO step's sequences, labelled on the completions."""
    from transformers import AutoTokenizer

    from soup.data.tokenize import IGNORE_INDEX

    data_cfg = preference_data_cfg(sft_file)
    data_cfg.format = "alpaca"
    tokenizer = AutoTokenizer.from_pretrained(model["sft_tokenizer_dir"])
    sft = build_datasets(data_cfg, tokenizer, "sft", SEED).train
    for position, index in enumerate(sft_order):
        step, slot = divmod(position, 2 * PAIRS_PER_BATCH)
        pair = examples[order[step * PAIRS_PER_BATCH + slot % PAIRS_PER_BATCH]]
        completion = pair["chosen_ids"] if slot < PAIRS_PER_BATCH else pair["rejected_ids"]
        want_ids = pair["prompt_ids"] + completion
        want_labels = [IGNORE_INDEX] * len(pair["prompt_ids"]) + completion
        if sft[index]["input_ids"] != want_ids or sft[index]["labels"] != want_labels:
            raise RuntimeError(f"soup's SFT tokenization of {sft_file} row {index + 1} differs from the DPO sequence")


# --------------------------------------------------------------------------- running


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RunSampler(LoadSampler):
    """sft.py's load sampler, also recording the trainer's resident set size."""

    def __init__(self, pid: int, period_s: float = 0.25):
        super().__init__(pid, period_s)
        self.rss: list[tuple[float, float]] = []

    def run(self) -> None:
        while not self.done.is_set():
            try:
                now = time.time()
                self.samples.append((now, busy_cpu_s(), process_cpu_s(self.pid)))
                self.rss.append((now, rss_mb(self.pid)))
            except (OSError, IndexError):
                return
            self.done.wait(self.period_s)

    def rss_at(self, t: float) -> float | None:
        before = [mb for at, mb in self.rss if at <= t]
        return before[-1] if before else None


def run_stamped(command: list[str], log_path: Path, env: dict | None = None):
    """Run `command`, stamping each output line with the wall time it arrived (log to `log_path`)."""
    started = time.time()
    lines: list[tuple[float, str]] = []
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace", env=child_env)
        sampler = RunSampler(process.pid)
        sampler.start()
        for line in process.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            log.write(line)
        _, status, usage = os.wait4(process.pid, 0)
    sampler.done.set()
    sampler.join()
    return {"status": os.waitstatus_to_exitcode(status), "process_peak_rss_mb": usage.ru_maxrss / 1024,
            "process_cpu_s": usage.ru_utime + usage.ru_stime, "process_wall_s": time.time() - started}, sampler, lines


def unit_figures(step_end_s: list[float], step_units: list[int], warmup: int, sampler: LoadSampler, unit: str) -> dict:
    """sft.summarise, counting `unit` (pairs, or sequences for the SFT run) instead of tokens."""
    return {k.replace("trained_tokens", f"trained_{unit}"): v
            for k, v in summarise(step_end_s, step_units, warmup, sampler).items()}


def first_stamp(lines: list[tuple[float, str]], prefix: str) -> float | None:
    return next((t for t, line in lines if line.startswith(prefix)), None)


# --------------------------------------------------------------------------- soup


def soup_command(model: dict, data: dict, run_dir: Path, steps: int, precision: str, row: str) -> list[str]:
    command = [
        sys.executable, "-m", "soup.train", "model=hf", f"model.path={model['dir']}", "data=file",
        f"data.max_length={MAX_LENGTH}", "data.val_split=0", "train.grad_accum_steps=1", f"train.max_steps={steps}",
        f"train.precision={precision}", "train.max_grad_norm=1.0",
        "train.save_every_steps=0", "train.log_every_steps=1", "train.progress_bar=false", "train.device=cpu",
        f"train.eval_batch_size={PAIRS_PER_BATCH}", f"optim.lr={LR}", "optim.weight_decay=0.0", "sched=constant",
        f"seed={SEED}", f"hydra.run.dir={run_dir}",
    ]
    lora = ["peft=lora", f"peft.r={LORA['r']}", f"peft.alpha={LORA['alpha']}", f"peft.dropout={LORA['dropout']}",
            f"peft.target_modules={LORA['target_modules']}"]
    if row == "sft-lora":
        return command + ["task=sft", f"data.train_file={data['sft_file']}", "data.format=alpaca",
                          f"model.tokenizer_path={model['sft_tokenizer_dir']}",
                          f"train.micro_batch_size={2 * PAIRS_PER_BATCH}", *lora]
    reference = {"copy": "copy", "precomputed": "precomputed", "precomputed-stacked": "precomputed",
                 "lora": "adapter"}[row]
    layout = "stacked" if row == "precomputed-stacked" else "auto"  # auto = shared_prompt with sdpa
    return command + [
        "task=dpo", "task.loss_type=sigmoid", f"task.beta={BETA}", f"task.reference={reference}",
        f"task.sequence_layout={layout}",
        f"task.ref_cache_dir={run_dir / 'ref_cache'}",  # empty per run: the pass always runs
        f"data.train_file={data['soup_file']}", f"data.max_prompt_length={MAX_PROMPT_LENGTH}",
        f"data.max_completion_length={MAX_COMPLETION_LENGTH}", f"train.micro_batch_size={PAIRS_PER_BATCH}",
        *(lora if row == "lora" else ["peft=none"]),
    ]


def run_soup(model: dict, data: dict, run_dir: Path, steps: int, warmup: int, precision: str, row: str) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to, so start from an empty run dir
    run_dir.mkdir(parents=True)
    command = soup_command(model, data, run_dir, steps, precision, row)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    process, sampler, lines = run_stamped(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"soup failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    record = json.loads((run_dir / "run.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m["split"] == "train"]
    stats = record["stats"]
    if row == "sft-lora":  # counted in sequences: the 16 of a DPO step
        unit, units = "sequences", [2 * PAIRS_PER_BATCH] * len(metrics)
    else:
        unit, units = "pairs", [m["trained_pairs"] for m in metrics]
    figures = unit_figures([m["time"] for m in metrics], units, warmup, sampler, unit)
    train_start = max((t for t, line in lines if line.startswith("[soup]") and t < metrics[0]["time"]), default=None)
    rss_start = sampler.rss_at(train_start) if train_start is not None else None
    result = {
        "command": command, "steps": stats["steps"], **figures,
        "peak_rss_mb": stats["peak_memory_mb"], **process,
        "rss_at_train_start_mb": rss_start,
        "rss_growth_mb": None if rss_start is None else stats["peak_memory_mb"] - rss_start,
        "loss_first_step": metrics[0]["loss"], "loss_last_step": metrics[-1]["loss"],
        "trainable_parameters": stats["trainable_parameters"], "torch_threads": record["device"]["torch_threads"],
        "log": str(log_path),
    }
    if unit == "pairs":
        result["soup_self_reported_step_mean_pairs_per_s"] = statistics.mean(m["trained_pairs_per_s"]
                                                                             for m in metrics[warmup:])
        result["reference_line"] = next((line for _, line in lines if line.startswith("[soup] reference:")), None)
    if row.startswith("precomputed"):
        before, after = first_stamp(lines, "[soup] model:"), first_stamp(lines, "[soup] reference:")
        result["reference_pass_s"] = after - before
    return result


# --------------------------------------------------------------------------- TRL


def trl_settings(precision: str, row: str, steps: int) -> dict:
    """DPOConfig arguments; every default that differs from soup's run is set explicitly."""
    return dict(
        max_steps=steps, per_device_train_batch_size=PAIRS_PER_BATCH, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as soup
        bf16=precision == "bf16", fp16=False,  # DPOConfig defaults to bf16=True
        gradient_checkpointing=False,  # DPOConfig defaults to True; soup runs checkpointing=none
        use_cpu=True, max_length=MAX_LENGTH, truncation_mode="keep_start",
        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=row == "precomputed",
        precompute_ref_batch_size=PAIRS_PER_BATCH, train_sampling_strategy="sequential", seed=SEED,
        dataloader_num_workers=0, report_to=[], eval_strategy="no", save_strategy="no", logging_steps=1,
        disable_tqdm=True,
    )


def run_trl(model: dict, data: dict, work_dir: Path, steps: int, warmup: int, precision: str, row: str) -> dict:
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    spec = {"model_dir": model["dir"], "data_file": data["trl_file"], "expected_ids_file": data["expected_ids_file"],
            "lora": LORA if row == "lora" else None, "output_dir": str(work_dir / "trainer"),
            "result": str(work_dir / "result.json"), "settings": trl_settings(precision, row, steps)}
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_path)]
    log_path = work_dir.parent / f"{work_dir.name}.log"
    # A private datasets cache: TRL keys its precomputed reference log-probs by dataset and model hash.
    process, sampler, lines = run_stamped(command, log_path, env={"HF_DATASETS_CACHE": str(work_dir / "hf_datasets")})
    if process["status"] != 0:
        raise RuntimeError(f"TRL failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    child = json.loads(Path(spec["result"]).read_text())
    if child["ids_mismatched_rows"]:
        raise RuntimeError(f"TRL tokenized {child['ids_mismatched_rows']} rows differently from soup: {log_path}")
    if child["step_batches"] != data["steps"][:steps]:
        raise RuntimeError(f"TRL's batches differ from soup's (shape / completion tokens per step): {log_path}")
    rss_start = sampler.rss_at(first_stamp(lines, "[bench] train begins"))
    return {
        "command": command, "settings": spec["settings"], "steps": len(child["step_end_s"]),
        **unit_figures(child["step_end_s"], child["step_pairs"], warmup, sampler, "pairs"),
        "peak_rss_mb": child["peak_rss_mb"], **process,
        "rss_at_train_start_mb": rss_start, "rss_growth_mb": None if rss_start is None else child["peak_rss_mb"] - rss_start,
        "loss_first_step": child["losses"][0], "loss_last_step": child["losses"][-1],
        "trainable_parameters": child["trainable_parameters"], "torch_threads": child["torch_threads"],
        **({"reference_pass_s": child["reference_pass_s"]} if row == "precomputed" else {}),
        "log": str(log_path),
    }


def trl_child(spec_path: str) -> None:
    """The TRL process: train, timing each step and recording each batch."""
    from collections import deque

    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]
    peft_config = None
    if spec["lora"]:
        import peft

        lora = spec["lora"]
        peft_config = peft.LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")

    reference_pass_s = []
    batches: deque[tuple[int, dict]] = deque()
    step_end_s, step_pairs, step_batches, losses = [], [], [], []

    class TimedDPOTrainer(trl.DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            started = time.time()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            reference_pass_s.append(time.time() - started)
            return out

    class RecordingCollator:
        """Records each batch as it is built; batches reach steps in build order."""

        def __init__(self, collate):
            self.collate = collate

        def __call__(self, examples):
            batch = self.collate(examples)
            batches.append((batch["input_ids"].shape[0] // 2, {
                "shape": list(batch["input_ids"].shape), "completion_tokens": int(batch["completion_mask"].sum())}))
            return batch

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            print("[bench] train begins", flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            step_end_s.append(time.time())  # wall clock, as soup's metrics.jsonl and the load sampler
            pairs, shape = batches.popleft()
            step_pairs.append(pairs)
            step_batches.append(shape)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = trl.DPOConfig(output_dir=spec["output_dir"], **spec["settings"])
    trainer = TimedDPOTrainer(model=model, ref_model=None, args=config, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[StepClock()])
    expected = json.loads(Path(spec["expected_ids_file"]).read_text())
    prepared = trainer.train_dataset
    mismatched = sum(
        [got_p, got_c, got_r] != [want["prompt_ids"], want["chosen_ids"], want["rejected_ids"]]
        for got_p, got_c, got_r, want in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"],
                                             expected))
    mismatched += abs(len(prepared) - len(expected))
    # The dataloader is built inside train(), from this attribute.
    trainer.data_collator = RecordingCollator(trainer.data_collator)
    trainer.train()
    peak_rss_mb = resource_peak_rss_mb()
    Path(spec["result"]).write_text(json.dumps({
        "step_end_s": step_end_s, "step_pairs": step_pairs, "step_batches": step_batches, "losses": losses,
        "peak_rss_mb": peak_rss_mb, "ids_mismatched_rows": mismatched, "reference_pass_s": sum(reference_pass_s),
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "torch_threads": torch.get_num_threads(),
    }))


def resource_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- report


def ancestors() -> set[int]:
    """This process and its parents: a wrapper such as `timeout ... dpo.py` holds the script's name too."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def busy_benchmarks(pattern: str = "scripts/bench/", window_s: float = 2.0) -> list[int]:
    """Other benchmark processes that are working: running a trainer (a child outside the
    benchmark's own processes) or using CPU themselves. One waiting for a quiet machine is not
    counted, so two benchmarks waiting for each other do not wait forever. This script's own
    ancestors are left out (a `timeout` wrapper would otherwise count as another benchmark)."""
    own = ancestors()
    found = {int(pid) for pid in subprocess.run(["pgrep", "-f", pattern], capture_output=True,
                                                text=True).stdout.split()} - own
    cpu_before = {}
    for pid in found:
        try:
            cpu_before[pid] = process_cpu_s(pid)
        except (OSError, IndexError):
            pass
    time.sleep(window_s)
    busy = []
    for pid, before in cpu_before.items():
        children = {int(c) for c in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()}
        try:
            working = process_cpu_s(pid) - before > 0.1 * window_s
        except (OSError, IndexError):
            continue  # it has exited
        if working or children - found - own:
            busy.append(pid)
    return busy


def wait_for_other_benchmarks(timeout_s: float) -> float:
    """Wait while another benchmark (sft.py, ...) is working: two at once ruin both. Returns seconds waited."""
    started = time.time()
    while time.time() - started < timeout_s and busy_benchmarks():
        time.sleep(8)
    return time.time() - started


def paired_steps(soup: dict, trl: dict, max_load: float = 0.05) -> dict:
    """soup against TRL over the steps both ran with under `max_load` other load.

    Step k of both trainers trains the same 8 pairs, so leaving out a step disturbed on
    either side keeps the comparison paired.
    """
    steps = [k for k, (s_l, t_l) in enumerate(zip(soup["step_other_load"], trl["step_other_load"]))
             if s_l < max_load and t_l < max_load]
    if not steps:
        return {"steps": 0}
    soup_time = sum(soup["step_time_s"][k] for k in steps)
    trl_time = sum(trl["step_time_s"][k] for k in steps)
    return {"steps": len(steps), "max_other_load": max_load, "soup_over_trl": trl_time / soup_time,
            "median_trl_time_over_soup_time": statistics.median(
                trl["step_time_s"][k] / soup["step_time_s"][k] for k in steps)}


def build_table(runs: list[dict]) -> list[dict]:
    """One row per (model, precision, row): soup and TRL (fastest kept run each) and their ratios."""
    best: dict[tuple, dict] = {}
    for run in runs:
        key = (run["model"], run["precision"], run["row"], run["trainer"])
        rate = run.get("trained_pairs_per_s", run.get("trained_sequences_per_s"))
        if not run["discarded"] and (key not in best or rate > best[key]["_rate"]):
            best[key] = {**run, "_rate": rate}
    table = []
    for (model, precision, row, trainer), soup in best.items():
        if trainer != "soup" or row == "sft-lora":
            continue
        trl = best.get((model, precision, SOUP_ONLY_ROWS.get(row, row), "trl"))
        entry = {"model": model, "precision": precision, "row": row,
                 "soup": {k: v for k, v in soup.items() if not k.startswith(("step_", "_"))}}
        if trl is not None:
            entry["trl"] = {k: v for k, v in trl.items() if not k.startswith(("step_", "_"))}
            entry["soup_pairs_per_s_over_trl"] = soup["trained_pairs_per_s"] / trl["trained_pairs_per_s"]
            entry["soup_peak_rss_over_trl"] = soup["peak_rss_mb"] / trl["peak_rss_mb"]
            entry["paired_steps"] = paired_steps(soup, trl)
        sft = best.get((model, precision, "sft-lora", "soup"))
        if row == "lora" and sft is not None:
            entry["sft_lora"] = {k: v for k, v in sft.items() if not k.startswith(("step_", "_"))}
            entry["dpo_over_sft_peak_rss"] = soup["peak_rss_mb"] / sft["peak_rss_mb"]
            if soup["rss_growth_mb"] and sft["rss_growth_mb"]:
                entry["dpo_over_sft_rss_growth"] = soup["rss_growth_mb"] / sft["rss_growth_mb"]
            entry["dpo_over_sft_step_time"] = (soup["measured_time_s"] / soup["measured_steps"]) / (
                sft["measured_time_s"] / sft["measured_steps"])
        table.append(entry)
    return table


def print_table(table: list[dict]) -> None:
    header = (f"{'model':<6} {'prec':<5} {'row':<20} {'soup pairs/s':>12} {'TRL pairs/s':>11} {'soup/TRL':>8} "
              f"{'ref pass s soup/TRL':>19} {'peak RSS MB soup/TRL':>20} {'growth MB soup/TRL':>18} {'load':>9}")
    print(header)
    print("-" * len(header))
    for r in table:
        s, t = r["soup"], r.get("trl", {})
        ratio = f"{r['soup_pairs_per_s_over_trl']:.2f}x" if t else ""
        ref = f"{s['reference_pass_s']:.1f} / {t['reference_pass_s']:.1f}" if "reference_pass_s" in s and t else ""
        growth = (f"{s['rss_growth_mb']:.0f} / {t['rss_growth_mb']:.0f}"
                  if t and s["rss_growth_mb"] is not None and t["rss_growth_mb"] is not None else "")
        print(f"{r['model']:<6} {r['precision']:<5} {r['row']:<20} {s['trained_pairs_per_s']:>12.2f} "
              f"{t.get('trained_pairs_per_s', float('nan')):>11.2f} {ratio:>8} {ref:>19} "
              f"{s['peak_rss_mb']:>9.0f} / {t.get('peak_rss_mb', float('nan')):<8.0f} {growth:>18} "
              f"{s['other_load']:>4.0%}/{t.get('other_load', float('nan')):<4.0%}")
    print("pairs/s = pairs / wall time over the measured steps (fastest kept run); ref pass = the precomputed\n"
          "reference pass before training (not in pairs/s); growth = peak RSS - RSS when training starts;\n"
          "load = CPU other processes used during the run, share of all cores (soup/TRL).")
    for r in table:
        if "sft_lora" in r:
            growth = f", growth {r['dpo_over_sft_rss_growth']:.2f}x" if "dpo_over_sft_rss_growth" in r else ""
            print(f"{r['model']} {r['precision']} memory goal: LoRA-DPO peak RSS {r['soup']['peak_rss_mb']:.0f} MB / "
                  f"LoRA-SFT on the same 16 sequences {r['sft_lora']['peak_rss_mb']:.0f} MB = "
                  f"{r['dpo_over_sft_peak_rss']:.3f}x (goal <= 1.2x){growth}; step time "
                  f"{r['dpo_over_sft_step_time']:.2f}x SFT's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "dpo.json")
    parser.add_argument("--scratch", type=Path, default=ROOT / ".bench" / "dpo")
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--rows", nargs="+", default=[*ROWS, *SOUP_ONLY_ROWS], choices=[*ROWS, *SOUP_ONLY_ROWS])
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--warmup-steps", type=int, default=3, help="left out of the figures (>= 1)")
    parser.add_argument("--measured-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the fastest is reported")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--max-other-load", type=float, default=0.10,
                        help="a run during which other processes used more than this share of the cores is "
                             "run again (kept in the JSON as discarded)")
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--others-timeout", type=float, default=3600.0,
                        help="seconds to wait for other scripts/bench/ processes before each run")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(args.trl_child)
        return
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be >= 1: a step's time starts at the end of the one before")
    steps = args.warmup_steps + args.measured_steps
    refuse_slow_bf16(parser, "bf16" in args.precisions, "run with --precisions fp32")

    started = time.time()
    waited = wait_for_other_benchmarks(args.others_timeout)
    if waited > 1:
        print(f"[bench] waited {waited:.0f} s for other benchmarks to finish")
    scratch = args.scratch.resolve()
    archs = model_archs()
    models, data = {}, {}
    for name in args.models:
        models[name] = build_model_dir(scratch / "models" / name, archs[name])
        # One epoch of exactly the rows the run trains on: the precomputed pass scores only those.
        data[name] = build_data_files(models[name], scratch / "data" / name, steps * PAIRS_PER_BATCH)
        d = data[name]
        print(f"model {name}: {models[name]['parameters'] / 1e6:.2f}M params; data: first {d['rows_used']} fitting "
              f"rows ({d['source_rows_skipped_as_needing_a_cut']} skipped), padded batch length mean "
              f"{d['padded_batch_length']['mean']:.0f}, max {d['padded_batch_length']['max']}")

    runs = []
    for repeat in range(args.repeats):
        for name in args.models:
            for precision in args.precisions:
                for row in args.rows:
                    for trainer in (("soup",) if row in SOUP_ONLY_ROWS else ("soup", "trl")):
                        for attempt in range(1, args.max_tries + 1):
                            waited = wait_for_other_benchmarks(args.others_timeout)
                            idle = wait_for_idle(args.idle_timeout)
                            run_name = f"{name}-{precision}-{row}-{trainer}-repeat{repeat + 1}-try{attempt}"
                            print(f"[bench] {run_name}: {steps} steps ...", flush=True)
                            run_dir = scratch / "runs" / run_name
                            if trainer == "soup":
                                run = run_soup(models[name], data[name], run_dir, steps, args.warmup_steps, precision, row)
                            else:
                                run = run_trl(models[name], data[name], run_dir, steps, args.warmup_steps, precision, row)
                            loaded = run["other_load"] > args.max_other_load
                            run.update(model=name, precision=precision, row=row, trainer=trainer, repeat=repeat,
                                       attempt=attempt, discarded=loaded and attempt < args.max_tries,
                                       other_benchmarks_wait_s=round(waited, 1), **idle)
                            runs.append(run)
                            rate = run.get("trained_pairs_per_s") or run.get("trained_sequences_per_s")
                            unit = "pairs/s" if "trained_pairs_per_s" in run else "sequences/s"
                            print(f"[bench] {run_name}: {rate:.2f} {unit}, peak RSS {run['peak_rss_mb']:.0f} MB, "
                                  f"other load {run['other_load']:.0%} ({run['process_wall_s']:.0f} s)"
                                  f"{'; discarded, retrying' if run['discarded'] else ''}", flush=True)
                            write_report(args, started, models, data, runs)
                            if not run["discarded"]:
                                break

    report = write_report(args, started, models, data, runs)
    print()
    print_table(report["table"])
    print(machine_line(report["machine"]))
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


def write_report(args: argparse.Namespace, started: float, models: dict, data: dict, runs: list[dict]) -> dict:
    """Write the JSON report (after every run, so a late failure keeps what was measured)."""
    machine = machine_info()
    machine["versions"]["peft"] = importlib.metadata.version("peft")
    report = {
        "benchmark": "dpo_throughput_memory_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "machine": machine,
        "soup_source": soup_source(),
        "settings": {"max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH,
                     "max_completion_length": MAX_COMPLETION_LENGTH, "pairs_per_batch": PAIRS_PER_BATCH,
                     "grad_accum_steps": 1, "lr": LR, "schedule": "constant", "beta": BETA, "loss": "sigmoid",
                     "optimizer": "torch.optim.AdamW, weight_decay 0", "max_grad_norm": 1.0, "seed": SEED,
                     "lora": LORA, "warmup_steps": args.warmup_steps, "measured_steps": args.measured_steps,
                     "repeats": args.repeats, "reference_pass_batch_pairs": PAIRS_PER_BATCH,
                     "sft_lora_micro_batch_sequences": 2 * PAIRS_PER_BATCH},
        "models": models,
        "data": {name: {k: v for k, v in d.items() if k != "steps"} | {"steps_checked": len(d["steps"])}
                 for name, d in data.items()},
        "table": build_table(runs),
        "runs": runs,
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
