"""Distillation throughput on CPU: soup's task=distill beside TRL 1.16's GKDTrainer, off-policy, same work.

    pip install -e '.[bench]'
    python scripts/bench/distill.py                          # 2 runs per side, 40 steps each: ~3 min*
    python scripts/bench/distill.py --quick --repeats 1      # a quick look: 1 run per side, 15 steps
    python scripts/bench/distill.py --model tiny --jsd-beta 0.1

* On a quiet 2-core machine (AVX512): ~0.4 s per step on either side, ~6 s from launch to the
  end of step 1 and ~2-3 s of exit (soup saves final/) per run, >= 12 s of waiting for quiet
  before each run; a busy machine stretches it through those waits and the re-runs.

What runs (each trainer in its own subprocess, one after the other: soup, TRL per repeat):

    soup   python -m soup.train model=hf model.path=<student/> task=distill
           task.teacher.path=../shared/models/stories260k task.divergence=generalized_jsd
           task.jsd_beta=<beta> task.temperature=1.0 task.alpha=1.0 data=file data.format=alpaca ...
    trl    trl.experimental.gkd.GKDTrainer with GKDConfig(lmbda=0.0, seq_kd=False, beta=<beta>)
           (this script with --trl-child). TRL 1.16's other distillation trainer,
           trl.DistillationTrainer, always trains on completions the student generates itself
           (it has no lmbda), so GKDTrainer is the only off-policy peer.

Models. Teacher: ../shared/models/stories260k (a trained 260K-parameter Llama, vocabulary 512,
no pad token). Student: a randomly initialised Llama (sft.py's ~4.6M-parameter shape by
default, --model tiny for soup's model=tiny shape; seed 0) on the stories260k tokenizer with
pad = eos, as the other benchmarks do, saved once under --scratch as `student/`. Both trainers
load that directory, so they start from identical weights, and both load the teacher directory.

The loss, side by side (B rows, positions t, labels unshifted: position t predicts label t+1):

    TRL  GKDTrainer.compute_loss: student and teacher logits at every position [:, :-1], then
         generalized_jsd_loss(..., beta=args.beta) with its default temperature=1.0, masked to
         labels[:, 1:] != -100 and summed, divided by the step's num_items_in_batch (the count
         of those labels; without it, "batchmean" divides by the same count). So: the mean
         over trained tokens of JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M),
         M = beta p_T + (1 - beta) p_S, with beta = 0 -> KL(p_T || p_S) and beta = 1 ->
         KL(p_S || p_T). No cross-entropy term. No T^2 factor, and no temperature at all in
         the loss: compute_loss never passes args.temperature, which only sets the sampling
         temperature of on-policy generation (unused here). Only lmbda=0.0 keeps it off-policy:
         training_step generates when random.random() <= lmbda (the child counts generate
         calls and the script requires 0).
    soup soup/losses/distill.py distill_loss with alpha = 1.0 (so no cross-entropy term;
         soup still computes and logs `ce`) and divergence generalized_jsd(beta): the same
         JSD_beta, with the same conventions at beta = 0 and 1, at temperature T = 1.0 and
         scaled by T^2 = 1 (a no-op), summed over the labelled positions and divided by the
         step's trained tokens (labels[:, 1:] != -100). Both take the divergence in fp32 here.
         The script checks soup's resolved task config after each run: these settings, and,
         where this soup has them, task.lmbda = 0 (off-policy), task.teacher.top_k = null (the
         full teacher every step, no cached top-k) and task.teacher.quant = none.
    So with T = 1 and alpha = 1 both minimise the same number; the first-step losses of the two
    sides (identical weights, identical batch) are compared and reported. What differs by
    design: soup applies the LM head only at the labelled positions (student and teacher) and
    takes the divergence there; TRL computes full [B, L, V] logits for both models and the
    divergence at every position, then masks.

Same rows and trained tokens. The rows are the alpaca demo's (../shared/data/sft/
llamafactory_alpaca_en_demo.alpaca.jsonl: instruction [+ input] as the user turn, output as
the assistant turn), rendered with soup's ChatML template preceded by the BOS
(`{{- bos_token -}}` + soup.data.templates.CHATML), saved as the student tokenizer's own chat
template: soup reads it with data.chat_template unset, TRL's DataCollatorForChatML applies it.
The BOS in the template makes the two tokenizations agree: soup adds no second BOS to a render
that starts with one, and TRL's collator never adds special tokens. soup labels the reply and
its `<|im_end|>\\n` (data.train_on_responses_only=true); TRL's collator labels every token after
the rendered prompt (`...<|im_start|>assistant\\n`): the same tokens. Only rows that need no cut
at --max-length (256) on either side are used (soup data.max_length, GKDConfig max_length; TRL's
collator keeps the last max_length tokens of a longer row), so no row is truncated: the soup
file holds exactly those rows and soup's report must show none truncated or dropped. The
script checks, for every row TRL trains on, that TRL's input ids (left padding removed) and
labels equal soup's, and records the first batch of both (token-id digests, lengths, trained
tokens). One real difference, each trainer's own behaviour: soup right-pads a batch,
TRL's collator left-pads it (pad = eos, attention mask 0, labels -100). Both pad to the batch's
longest row, so the padded shapes agree; with left padding transformers' Llama numbers the
positions of a row from the first pad, but RoPE attention depends only on position
differences, so the logits agree up to rounding (the first-step losses show how closely).

Same batches: soup draws its batches with its own seeded permutation
(soup.data.sampler.ResumableBatchSampler, seed 42); the TRL file holds the rows in exactly that
order and TRL reads it with train_sampling_strategy="sequential", so step k of both trains the
same 8 rows. soup's per-step trained tokens must equal those of the rows in that order.

Settings, both sides: fp32, sdpa attention, full fine-tune, micro-batch 8, no accumulation,
fused torch.optim.AdamW (soup optim.implementation=fused, TRL optim="adamw_torch_fused"), lr 1e-4,
weight decay 0, constant schedule, clip 1.0, seed 42, no eval, no checkpoints, no gradient
checkpointing, in-process data loading, torch's default threads, dropout off (the models have
none; GKDConfig disable_dropout=True).

Counting and timing, identical on both sides (as sft.py):
    trained tokens of a step = labels[:, 1:] != -100 summed over the batch (soup: metrics.jsonl
        `trained_tokens`; TRL: counted in a wrapper around its data collator)
    step time = wall time from the end of the previous step to the end of this one (soup: the
        `time` stamps of consecutive metrics.jsonl lines; TRL: a callback's on_step_end), so data,
        collation, the teacher's forward, the optimizer and logging are all inside it
    the first --warmup-steps steps are left out; trained_tokens_per_s = sum(tokens) / sum(step
        time) over the rest; `table` keeps each side's fastest kept run, `runs` every run.

Load: as sft.py / rlhf.py: before each run the script waits while another scripts/bench/
benchmark works and for 10 s of quiet, records the CPU other processes used during the measured
steps (other_load), and runs again (up to --max-tries) a run above --max-other-load. A run that
fails is recorded with its error and log tail; the other runs go on. If TRL's GKDTrainer cannot
be imported, soup is timed alone and `trl.reason` in the JSON says why.

Writes .bench/distill.json (--out) and scratch under .bench/distill/ (--scratch:
the student directory, the data files, each run's directory and log). soup never imports TRL;
this script imports TRL only inside the TRL subprocess.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import (  # noqa: E402  (scripts/bench is not a package)
    MODEL_ARCH as SMALL_ARCH,
    MODEL_INIT_SEED,
    ROOT,
    SEED,
    SHARED,
    LoadSampler,
    machine_info,
    machine_line,
    run_measured,
    soup_source,
    tail,
    wait_for_idle,
)
from dpo import wait_for_other_benchmarks  # noqa: E402

TEACHER_DIR = SHARED / "models" / "stories260k"
DATA_FILE = SHARED / "data" / "sft" / "llamafactory_alpaca_en_demo.alpaca.jsonl"
SCRATCH = Path(__file__).resolve().parents[2] / ".bench" / "distill"
MICRO_BATCH = 8
LR = 1e-4
MAX_GRAD_NORM = 1.0
TEMPERATURE = 1.0
ALPHA = 1.0  # pure divergence: GKDTrainer's loss has no cross-entropy term
IGNORE_INDEX = -100
SIDES = ("soup", "trl")


# --------------------------------------------------------------------------- inputs


def chat_template() -> str:
    """soup's ChatML preset behind a BOS: both trainers then tokenize a row to the same ids."""
    from soup.data.templates import CHATML

    return "{{- bos_token -}}" + CHATML


def model_arch(name: str) -> dict:
    if name == "small":
        return dict(SMALL_ARCH)
    from dataclasses import asdict

    from soup.config.schema import TinyArchConfig

    return asdict(TinyArchConfig())


def build_student_dir(student_dir: Path, arch: dict) -> dict:
    """A random-init Llama on the teacher's tokenizer (pad = eos, the chat template above), seed 0."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(TEACHER_DIR)
    had_pad = tokenizer.pad_token is not None
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)
    torch.manual_seed(MODEL_INIT_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if student_dir.exists():
        shutil.rmtree(student_dir)
    model.save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    teacher = AutoConfig.from_pretrained(TEACHER_DIR)
    if teacher.vocab_size != config.vocab_size:
        raise SystemExit(f"the teacher scores {teacher.vocab_size} tokens, the student {config.vocab_size}")
    teacher_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(TEACHER_DIR).parameters())
    return {"student_dir": str(student_dir), "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer), "tokenizer": str(TEACHER_DIR), "tokenizer_had_pad_token": had_pad,
            "pad": f"{tokenizer.pad_token} (id {tokenizer.pad_token_id}) = eos", "init_seed": MODEL_INIT_SEED,
            "chat_template": chat_template(), **arch,
            "teacher": {"dir": str(TEACHER_DIR), "parameters": teacher_parameters,
                        "hidden_size": teacher.hidden_size, "num_hidden_layers": teacher.num_hidden_layers,
                        "max_position_embeddings": teacher.max_position_embeddings}}


def ids_digest(rows: list[list[int]]) -> str:
    return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:16]


def soup_data_cfg(train_file: Path, max_length: int):
    from omegaconf import OmegaConf

    from soup.config.schema import DataConfig

    return OmegaConf.structured(DataConfig(
        name="file", train_file=str(train_file), format="alpaca", chat_template=None, max_length=max_length,
        overlong="truncate", val_split=0.0, train_on_responses_only=True))


def build_data(student_dir: Path, data_dir: Path, max_length: int, steps: int) -> dict:
    """soup's file (the rows that need no cut), TRL's file (those rows in soup's batch order), the
    ids and labels TRL must produce, and each step's batch shape and trained tokens."""
    from transformers import AutoTokenizer

    from soup.data import build_datasets
    from soup.data.formats import to_messages
    from soup.data.readers import read_rows
    from soup.data.sampler import ResumableBatchSampler
    from soup.data.tokenize import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    template = tokenizer.chat_template
    lines = DATA_FILE.read_text(encoding="utf-8").splitlines()
    kept, skipped = [], 0
    for row in read_rows(DATA_FILE):
        messages = to_messages(row, "alpaca")
        input_ids, labels = tokenize_chat(messages, tokenizer, template, train_on_responses_only=True)
        if len(input_ids) <= max_length and any(label != IGNORE_INDEX for label in labels[1:]):
            kept.append((row.line, messages))
        else:
            skipped += 1
    data_dir.mkdir(parents=True, exist_ok=True)
    soup_file = data_dir / f"alpaca_en_demo.fits{max_length}.alpaca.jsonl"
    soup_file.write_text("".join(lines[line - 1] + "\n" for line, _ in kept), encoding="utf-8")

    # What soup itself makes of that file: its data builder and its sampler, as the run uses them.
    splits = build_datasets(soup_data_cfg(soup_file, max_length), tokenizer, "distill", SEED)
    report = splits.report
    if report.rows_truncated or report.rows_dropped or len(splits.train) != len(kept):
        raise RuntimeError(f"soup cut or dropped rows the benchmark chose as fitting: {report.summary()}")
    examples = splits.train
    full_batches = len(examples) // MICRO_BATCH
    if steps > full_batches:
        raise SystemExit(f"{steps} steps need {steps * MICRO_BATCH} rows in one epoch; only {len(examples)} rows "
                         f"fit {max_length} tokens ({full_batches} full batches): ask for fewer steps or a "
                         "larger --max-length")
    order = ResumableBatchSampler(len(examples), MICRO_BATCH, SEED).epoch_order(0)[:steps * MICRO_BATCH]
    trl_file = data_dir / f"alpaca_en_demo.fits{max_length}.soup_order.messages.jsonl"
    trl_file.write_text("".join(json.dumps({"messages": kept[i][1]}) + "\n" for i in order), encoding="utf-8")
    expected_file = data_dir / "soup_ids.soup_order.json"  # what TRL's collator must produce, row by row
    expected_file.write_text(json.dumps([{"input_ids": examples[i]["input_ids"], "labels": examples[i]["labels"]}
                                         for i in order]))
    batches = []
    for start in range(0, len(order), MICRO_BATCH):
        rows = [examples[i] for i in order[start:start + MICRO_BATCH]]
        batches.append({
            "shape": [len(rows), max(len(r["input_ids"]) for r in rows)],
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "trained_tokens": sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows),
        })
    first = [examples[i] for i in order[:MICRO_BATCH]]
    lengths = [len(examples[i]["input_ids"]) for i in order]
    return {
        "source": str(DATA_FILE), "max_length": max_length, "rows_fitting": len(kept),
        "source_rows_skipped_as_needing_a_cut": skipped, "rows_trained": len(order),
        "soup_file": str(soup_file), "trl_file": str(trl_file), "expected_ids_file": str(expected_file),
        "tokens_per_row": {"mean": statistics.mean(lengths), "max": max(lengths), "min": min(lengths)},
        "padded_batch_length": {"mean": statistics.mean(b["shape"][1] for b in batches),
                                "max": max(b["shape"][1] for b in batches)},
        "trained_tokens_per_step_mean": statistics.mean(b["trained_tokens"] for b in batches),
        "soup_report": report.summary(),
        "first_batch_soup": {"row_lengths": [len(r["input_ids"]) for r in first],
                             "trained_tokens": batches[0]["trained_tokens"],
                             "ids_digest": ids_digest([r["input_ids"] for r in first]),
                             "labels_digest": ids_digest([r["labels"] for r in first]),
                             "row0_first_ids": first[0]["input_ids"][:24]},
        "steps": batches,
    }


# --------------------------------------------------------------------------- running


def child_env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRL_EXPERIMENTAL_SILENCE": "1", **(extra or {})}


def run_logged(command: list[str], log_path: Path, env: dict | None = None) -> tuple[dict, LoadSampler]:
    """sft.run_measured (exit status, peak RSS, load sampler) with this script's child environment."""
    saved = dict(os.environ)
    os.environ.update(child_env(env))
    try:
        return run_measured(command, log_path)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def figures(step_end_s: list[float], step_tokens: list[int], warmup: int, sampler: LoadSampler) -> dict:
    """Throughput over the steps after `warmup` (step k's time = end_k - end_{k-1}, so warmup >= 1)."""
    ends = step_end_s[warmup - 1:]
    times = [b - a for a, b in zip(ends, ends[1:])]
    tokens = step_tokens[warmup:]
    rates = [n / t for n, t in zip(tokens, times)]
    return {
        "measured_steps": len(times), "trained_tokens_per_s": sum(tokens) / sum(times),
        "trained_tokens_per_s_step_median": statistics.median(rates), "step_s_mean": statistics.mean(times),
        "measured_trained_tokens": sum(tokens), "measured_time_s": sum(times),
        "other_load": sampler.other_load(ends[0], ends[-1]), "step_time_s": times, "step_trained_tokens": tokens,
        "step_other_load": [sampler.other_load(a, b) for a, b in zip(ends, ends[1:])],
    }


def outside_steps(launched: float, wall_s: float, first_end: float, last_end: float) -> dict:
    """Wall time outside the timed steps: launch to the end of step 1 (imports, loading both models,
    data, step 1) and the end of the last step to the process's exit (soup saves final/ there)."""
    return {"launch_to_first_step_end_s": first_end - launched, "last_step_end_to_exit_s": launched + wall_s - last_end}


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)  # soup appends to metrics.jsonl: start from an empty directory
    path.mkdir(parents=True)
    return path


def soup_command(args: argparse.Namespace, model: dict, data: dict, run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "soup.train",
        "model=hf", f"model.path={model['student_dir']}", "model.dtype=float32", "model.attn_implementation=sdpa",
        "task=distill", f"task.teacher.path={TEACHER_DIR}", "task.divergence=generalized_jsd",
        f"task.jsd_beta={args.jsd_beta}", f"task.temperature={TEMPERATURE}", f"task.alpha={ALPHA}",
        "data=file", f"data.train_file={data['soup_file']}", "data.format=alpaca", f"data.max_length={args.max_length}",
        "data.val_split=0", "data.train_on_responses_only=true",
        f"train.micro_batch_size={MICRO_BATCH}", "train.grad_accum_steps=1", f"train.max_steps={steps}",
        "train.precision=fp32", f"train.max_grad_norm={MAX_GRAD_NORM}", "train.save_every_steps=0",
        "train.log_every_steps=1", "train.progress_bar=false", "train.device=cpu", "checkpointing=none", "peft=none",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.implementation=fused", "sched=constant", f"seed={SEED}",
        f"hydra.run.dir={run_dir}",
    ]


def run_soup(args: argparse.Namespace, model: dict, data: dict, run_dir: Path, steps: int) -> dict:
    fresh_dir(run_dir)
    command = soup_command(args, model, data, run_dir, steps)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    launched = time.time()
    process, sampler = run_logged(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"soup failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    record = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("split") == "train"]
    task = record["config"]["task"]
    want = {"divergence": "generalized_jsd", "jsd_beta": args.jsd_beta, "temperature": TEMPERATURE, "alpha": ALPHA}
    differ = {k: (task.get(k), v) for k, v in want.items() if task.get(k) != v}
    # Keys a newer soup may have: their defaults must keep the run off-policy, with the full teacher loaded.
    teacher = task.get("teacher", {})
    newer = {"lmbda": (task.get("lmbda", 0.0), 0.0), "teacher.top_k": (teacher.get("top_k"), None),
             "teacher.quant": (teacher.get("quant", "none"), "none")}
    differ.update({k: pair for k, pair in newer.items() if pair[0] != pair[1]})
    if differ:
        raise RuntimeError(f"soup's resolved task config differs from the benchmark's (soup, wanted): {differ}")
    tokens = [r["trained_tokens"] for r in rows]
    expected = [s["trained_tokens"] for s in data["steps"][:steps]]
    if tokens != expected:
        raise RuntimeError(f"soup's per-step trained tokens differ from its own data in its sampler order: "
                           f"{tokens[:6]}... vs {expected[:6]}...")
    train_report = record["stats"]["data"]["train"]
    if train_report["rows_truncated"] or train_report["rows_dropped"]:
        raise RuntimeError(f"soup cut rows: {train_report}")
    return {
        "command": command, "steps": len(rows),
        **figures([r["time"] for r in rows], tokens, args.warmup_steps, sampler),
        **outside_steps(launched, process["process_wall_s"], rows[0]["time"], rows[-1]["time"]),
        "peak_rss_mb": rows[-1].get("peak_memory_mb", record["stats"]["peak_memory_mb"]),
        "peak_rss_mb_after_final_save": record["stats"]["peak_memory_mb"], **process,
        "losses": [r["loss"] for r in rows], "grad_norms": [r["grad_norm"] for r in rows],
        "divergence_first_step": rows[0].get("divergence"), "ce_first_step": rows[0].get("ce"),
        "soup_self_reported_step_mean_tokens_per_s": statistics.mean(
            r["trained_tokens_per_s"] for r in rows[args.warmup_steps:]),
        "rows_used": train_report["rows_used"], "torch_threads": record["device"]["torch_threads"],
        "log": str(log_path),
    }


def trl_settings(args: argparse.Namespace, steps: int) -> dict:
    """GKDConfig arguments; every default that differs from soup's run is set explicitly."""
    return dict(
        max_steps=steps, per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch_fused",
        bf16=False, fp16=False,  # SFTConfig's bf16 default follows the device
        gradient_checkpointing=False,  # SFTConfig defaults to True; soup runs checkpointing=none
        use_cpu=True, max_length=args.max_length,  # DataCollatorForChatML's cap (no row reaches it)
        lmbda=0.0, seq_kd=False,  # off-policy only: the rows' own completions, no generation
        beta=args.jsd_beta, temperature=TEMPERATURE,  # temperature: sampling only (module docstring)
        disable_dropout=True, train_sampling_strategy="sequential", shuffle_dataset=False, seed=SEED,
        dataloader_num_workers=0, report_to=[], eval_strategy="no", save_strategy="no", logging_steps=1,
        disable_tqdm=True,
    )


def run_trl(args: argparse.Namespace, model: dict, data: dict, work_dir: Path, steps: int) -> dict:
    fresh_dir(work_dir)
    spec = {"student_dir": model["student_dir"], "teacher_dir": str(TEACHER_DIR), "data_file": data["trl_file"],
            "expected_ids_file": data["expected_ids_file"], "output_dir": str(work_dir / "trainer"),
            "result": str(work_dir / "result.json"), "settings": trl_settings(args, steps)}
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_path)]
    log_path = work_dir.parent / f"{work_dir.name}.log"
    launched = time.time()
    process, sampler = run_logged(command, log_path, {"HF_DATASETS_CACHE": str(work_dir / "hf_datasets")})
    if process["status"] != 0 or not Path(spec["result"]).exists():
        raise RuntimeError(f"TRL failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    child = json.loads(Path(spec["result"]).read_text())
    if child["rows_checked"] != steps * MICRO_BATCH or child["ids_mismatched_rows"] or child["labels_mismatched_rows"]:
        raise RuntimeError(f"TRL's rows differ from soup's: {child['rows_checked']} checked, "
                           f"{child['ids_mismatched_rows']} with other ids, {child['labels_mismatched_rows']} with "
                           f"other labels: {log_path}")
    want = [s["shape"] for s in data["steps"][:steps]]
    if child["step_shapes"] != want:
        raise RuntimeError(f"TRL's batch shapes differ from soup's: {child['step_shapes'][:4]}... vs {want[:4]}...")
    if child["generate_calls"]:
        raise RuntimeError(f"TRL generated {child['generate_calls']} times: not off-policy")
    if len(child["step_end_s"]) != steps or len(child["losses"]) != steps:
        raise RuntimeError(f"TRL ran {len(child['step_end_s'])} steps and logged {len(child['losses'])} losses, "
                           f"expected {steps}")
    return {
        "command": command, "settings": spec["settings"], "steps": len(child["step_end_s"]),
        **figures(child["step_end_s"], child["step_trained_tokens"], args.warmup_steps, sampler),
        **outside_steps(launched, process["process_wall_s"], child["step_end_s"][0], child["step_end_s"][-1]),
        "peak_rss_mb": child["peak_rss_mb"], **process, "losses": child["losses"],
        "grad_norms": child["grad_norms"], "first_batch_trl": child["first_batch"],
        "rows_checked_against_soup": child["rows_checked"], "generate_calls": child["generate_calls"],
        "optimizer": child["optimizer"],
        "torch_threads": child["torch_threads"], "log": str(log_path),
    }


def trl_child(spec_path: str) -> None:
    """TRL's GKDTrainer, off-policy: train, timing each step and checking every batch against soup's rows."""
    from collections import deque

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from trl.experimental.gkd import GKDConfig, GKDTrainer

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["student_dir"])  # pad = eos, the BOS + ChatML template
    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    student = AutoModelForCausalLM.from_pretrained(spec["student_dir"], **load)
    teacher = AutoModelForCausalLM.from_pretrained(spec["teacher_dir"], **load)
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]
    expected = json.loads(Path(spec["expected_ids_file"]).read_text())

    batch_tokens: deque[tuple[int, list[int]]] = deque()
    seen = {"rows": 0, "ids_mismatched": 0, "labels_mismatched": 0, "first_batch": None, "generate_calls": 0}
    step_end_s, step_tokens, step_shapes, losses, grad_norms = [], [], [], [], []

    class CheckingCollator:
        """Counts each batch's trained tokens and compares its rows with soup's, in order."""

        def __init__(self, collate):
            self.collate = collate

        def __call__(self, examples):
            batch = self.collate(examples)
            ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"].bool()
            trl_ids, trl_labels = [], []
            for r in range(ids.shape[0]):
                row_ids, row_labels = ids[r][mask[r]].tolist(), labels[r][mask[r]].tolist()  # left padding off
                want = expected[seen["rows"]] if seen["rows"] < len(expected) else {"input_ids": None, "labels": None}
                seen["ids_mismatched"] += row_ids != want["input_ids"]
                seen["labels_mismatched"] += row_labels != want["labels"]
                seen["rows"] += 1
                trl_ids.append(row_ids)
                trl_labels.append(row_labels)
            trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if seen["first_batch"] is None:
                seen["first_batch"] = {"row_lengths": [len(x) for x in trl_ids], "trained_tokens": trained,
                                       "ids_digest": ids_digest(trl_ids), "labels_digest": ids_digest(trl_labels),
                                       "row0_first_ids": trl_ids[0][:24], "padded_shape": list(ids.shape),
                                       "padding_side": "left" if bool((~mask[:, 0]).any()) else "none needed"}
            batch_tokens.append((trained, list(ids.shape)))
            return batch

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end_s.append(time.time())  # wall clock, as soup's metrics.jsonl and the load sampler
            trained, shape = batch_tokens.popleft()
            step_tokens.append(trained)
            step_shapes.append(shape)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
                grad_norms.append(logs.get("grad_norm"))

    generate = GKDTrainer.generate_on_policy_outputs

    def counted_generate(*a, **k):
        seen["generate_calls"] += 1
        return generate(*a, **k)

    GKDTrainer.generate_on_policy_outputs = staticmethod(counted_generate)
    config = GKDConfig(output_dir=spec["output_dir"], **spec["settings"])
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config,
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[StepClock()])
    trainer.data_collator = CheckingCollator(trainer.data_collator)  # the dataloader is built inside train()
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    fused = optimizer.defaults.get("fused")
    Path(spec["result"]).write_text(json.dumps({
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}(fused={fused})",
        "step_end_s": step_end_s, "step_trained_tokens": step_tokens, "step_shapes": step_shapes,
        "losses": losses, "grad_norms": grad_norms, "first_batch": seen["first_batch"],
        "rows_checked": seen["rows"], "ids_mismatched_rows": seen["ids_mismatched"],
        "labels_mismatched_rows": seen["labels_mismatched"], "generate_calls": seen["generate_calls"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }))


def trl_status() -> dict:
    """Whether TRL's off-policy distillation trainer imports here (in a subprocess: this process stays TRL-free)."""
    code = ("import importlib.metadata as m, json\n"
            "from trl.experimental.gkd import GKDTrainer, GKDConfig\n"
            "print(json.dumps({'trl': m.version('trl'), 'trainer': 'trl.experimental.gkd.GKDTrainer'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=ROOT)
    if out.returncode != 0:
        return {"usable": False, "reason": "importing trl.experimental.gkd.GKDTrainer failed: "
                + out.stderr.strip()[-2000:]}
    return {"usable": True, **json.loads(out.stdout.strip().splitlines()[-1])}


# --------------------------------------------------------------------------- report


def strip(run: dict) -> dict:
    """A run without its per-step lists and command (those stay in `runs`)."""
    return {k: v for k, v in run.items()
            if not (k.startswith("step_") and isinstance(v, list)) and k not in ("command", "settings")}


def build_table(runs: list[dict], data: dict) -> dict:
    best = {}
    for side in SIDES:
        kept = [r for r in runs if r["side"] == side and not r["discarded"]]
        best[side] = max(kept, key=lambda r: r["trained_tokens_per_s"]) if kept else None
    table = {side: strip(run) if run else None for side, run in best.items()}
    soup, trl = best["soup"], best["trl"]
    if soup and trl:
        table["soup_tokens_per_s_over_trl"] = soup["trained_tokens_per_s"] / trl["trained_tokens_per_s"]
        table["soup_peak_rss_over_trl"] = soup["peak_rss_mb"] / trl["peak_rss_mb"]
        first_soup, first_trl = soup["losses"][0], trl["losses"][0]
        n = min(len(soup["losses"]), len(trl["losses"]))
        table["sameness"] = {
            "first_step_loss": {"soup": first_soup, "trl": first_trl, "abs_difference": abs(first_soup - first_trl),
                                "rel_difference": abs(first_soup - first_trl) / abs(first_trl)},
            "first_step_grad_norm": {"soup": soup["grad_norms"][0], "trl": trl["grad_norms"][0]},
            "max_abs_loss_difference_all_steps": max(abs(a - b) for a, b in zip(soup["losses"][:n], trl["losses"][:n])),
            "first_batch_ids_equal": trl["first_batch_trl"]["ids_digest"] == data["first_batch_soup"]["ids_digest"],
            "first_batch_labels_equal": (trl["first_batch_trl"]["labels_digest"]
                                         == data["first_batch_soup"]["labels_digest"]),
            "first_batch_soup": data["first_batch_soup"], "first_batch_trl": trl["first_batch_trl"],
            "rows_checked_equal": trl["rows_checked_against_soup"],
        }
    return table


def print_table(table: dict, trl: dict, errors: list[dict]) -> None:
    print(f"{'side':<5} {'tok/s':>7} {'median':>7} {'step s':>7} {'start s':>7} {'peak RSS MB':>11} "
          f"{'loss 1st/last':>17} {'other load':>10}")
    for side in SIDES:
        x = table.get(side)
        if x:
            print(f"{side:<5} {x['trained_tokens_per_s']:>7.0f} {x['trained_tokens_per_s_step_median']:>7.0f} "
                  f"{x['step_s_mean']:>7.3f} {x['launch_to_first_step_end_s']:>7.1f} {x['peak_rss_mb']:>11.0f} "
                  f"{x['losses'][0]:>8.5f}/{x['losses'][-1]:<8.5f} "
                  f"{x['other_load']:>10.0%}")
    if "soup_tokens_per_s_over_trl" in table:
        s = table["sameness"]
        print(f"soup/TRL trained tokens/s {table['soup_tokens_per_s_over_trl']:.2f}x, peak RSS "
              f"{table['soup_peak_rss_over_trl']:.2f}x")
        print(f"first-step loss soup {s['first_step_loss']['soup']:.7f}, TRL {s['first_step_loss']['trl']:.7f} "
              f"(|diff| {s['first_step_loss']['abs_difference']:.2e}); first-step grad norm soup "
              f"{s['first_step_grad_norm']['soup']:.6f}, TRL {s['first_step_grad_norm']['trl']:.6f}; largest per-step "
              f"loss difference {s['max_abs_loss_difference_all_steps']:.2e}")
        print(f"first batch: token ids equal {s['first_batch_ids_equal']}, labels equal "
              f"{s['first_batch_labels_equal']}; every TRL row checked against soup's ({s['rows_checked_equal']} rows)")
    print("tok/s = trained (loss) tokens / wall time over the measured steps (median: per step); fastest kept run;\n"
          "start s = launch to the end of step 1 (not in tok/s); other load = CPU used by other processes\n"
          "during that run, as a share of all cores.")
    if not trl.get("usable"):
        print(f"TRL not run: {trl['reason'].splitlines()[-1]}; soup timed alone (the JSON's trl.reason has it all).")
    for e in errors:
        print(f"FAILED {e['side']}: {e['error'].splitlines()[0]}")


def write_report(args: argparse.Namespace, started: float, steps: int, model: dict, data: dict, trl: dict,
                 runs: list[dict], errors: list[dict]) -> dict:
    """Write the JSON (after every run, so a killed benchmark keeps what it measured)."""
    report = {
        "benchmark": "distill_throughput_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "note": args.note,
        "soup_source": soup_source(),
        "machine": machine_info(),
        "trl": trl,
        "settings": {
            "steps": steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
            "micro_batch_size": MICRO_BATCH, "grad_accum_steps": 1, "lr": LR, "schedule": "constant",
            "optimizer": "torch.optim.AdamW(fused=True), weight decay 0", "max_grad_norm": MAX_GRAD_NORM,
            "precision": "fp32", "seed": SEED, "max_length": args.max_length,
            "loss": {"divergence": "generalized_jsd", "beta": args.jsd_beta, "temperature": TEMPERATURE,
                     "soup_alpha": ALPHA, "t_squared_factor": "soup: T^2 = 1; TRL: none",
                     "trl": "GKDConfig(lmbda=0.0, seq_kd=False, beta=...): off-policy",
                     "mask": "labels[:, 1:] != -100 (the assistant reply and its <|im_end|>\\n) on both sides",
                     "reduction": "sum over trained tokens / trained tokens of the step, both sides"},
        },
        "model": model,
        "data": {k: v for k, v in data.items() if k != "steps"},
        "table": build_table(runs, data),
        "errors": errors,
        "runs": runs,
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=SCRATCH.parent / "distill.json")
    parser.add_argument("--scratch", type=Path, default=SCRATCH)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--model", default="small", choices=["small", "tiny"],
                        help="student shape: small = sft.py's ~4.6M-parameter Llama; tiny = soup's model=tiny shape")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run, warm-up included "
                        "(default 40; 15 with --quick)")
    parser.add_argument("--warmup-steps", type=int, default=5, help="first steps left out of the figures (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, interleaved; the fastest is reported")
    parser.add_argument("--quick", action="store_true", help="15 steps per run instead of 40")
    parser.add_argument("--jsd-beta", type=float, default=0.5, help="generalized JSD beta, both sides")
    parser.add_argument("--max-length", type=int, default=256,
                        help="only rows of at most this many tokens are used (no row is cut); <= 512, the "
                             "teacher's max_position_embeddings")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--others-timeout", type=float, default=3600.0,
                        help="seconds to wait for other scripts/bench/ processes before each run")
    parser.add_argument("--max-other-load", type=float, default=0.10,
                        help="a run during which other processes used more than this share of the cores is run "
                             "again (kept in the JSON as discarded)")
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. which snapshot ran)")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(args.trl_child)
        return
    steps = args.steps if args.steps is not None else (15 if args.quick else 40)
    if args.warmup_steps < 1 or steps <= args.warmup_steps + 1:
        parser.error("need --warmup-steps >= 1 (a step's time starts at the end of the one before) and at least "
                     "two measured steps")
    if not 0.0 <= args.jsd_beta <= 1.0:
        parser.error("--jsd-beta must be in [0, 1]")
    if not 16 <= args.max_length <= 512:
        parser.error("--max-length must be in [16, 512] (the teacher has 512 positions)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    scratch = args.scratch.resolve()
    model = build_student_dir(scratch / "models" / args.model / "student", model_arch(args.model))
    data = build_data(Path(model["student_dir"]), scratch / "data", args.max_length, steps)
    trl = trl_status() if "trl" in args.sides else {"usable": False, "reason": "not asked for (--sides)"}
    if "trl" in args.sides and not trl["usable"]:
        print(f"[bench] TRL's GKDTrainer unavailable, timing soup alone: {trl['reason']}", flush=True)
    print(f"student {model['parameters'] / 1e6:.2f}M params, teacher {model['teacher']['parameters'] / 1e6:.2f}M; "
          f"{data['rows_fitting']} alpaca rows fit {args.max_length} tokens "
          f"({data['source_rows_skipped_as_needing_a_cut']} skipped), {steps} steps x {MICRO_BATCH} rows, padded "
          f"batch length mean {data['padded_batch_length']['mean']:.0f}, trained tokens per step "
          f"{data['trained_tokens_per_step_mean']:.0f}", flush=True)

    runs, errors = [], []
    plan = [side for side in args.sides if side == "soup" or trl["usable"]]
    for repeat in range(args.repeats):
        for side in plan:
            if any(e["side"] == side for e in errors):
                continue  # it failed once: the error is recorded, the other runs go on
            for attempt in range(1, args.max_tries + 1):
                waited = wait_for_other_benchmarks(args.others_timeout)
                idle = wait_for_idle(args.idle_timeout)
                name = f"{side}-repeat{repeat + 1}-try{attempt}"
                print(f"[bench] {name}: {steps} steps ...", flush=True)
                run_dir = scratch / "runs" / name
                try:
                    run = (run_soup if side == "soup" else run_trl)(args, model, data, run_dir, steps)
                except Exception as exc:  # recorded; the other runs go on
                    errors.append({"side": side, "run": name, "error": str(exc)})
                    print(f"[bench] {name} FAILED: {exc}", flush=True)
                    write_report(args, started, steps, model, data, trl, runs, errors)
                    break
                loaded = run["other_load"] > args.max_other_load
                run.update(side=side, repeat=repeat, attempt=attempt, discarded=loaded and attempt < args.max_tries,
                           other_benchmarks_wait_s=round(waited, 1), **idle)
                runs.append(run)
                print(f"[bench] {name}: {run['trained_tokens_per_s']:.0f} trained tokens/s, step "
                      f"{run['step_s_mean']:.3f} s, first loss {run['losses'][0]:.6f}, peak RSS "
                      f"{run['peak_rss_mb']:.0f} MB, other load {run['other_load']:.0%} ({run['process_wall_s']:.0f} s)"
                      f"{'; discarded, retrying' if run['discarded'] else ''}", flush=True)
                write_report(args, started, steps, model, data, trl, runs, errors)
                if not run["discarded"]:
                    break

    report = write_report(args, started, steps, model, data, trl, runs, errors)
    print()
    print_table(report["table"], trl, errors)
    print(machine_line(report["machine"]))
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
