"""RLHF on CPU: reward-model training (soup vs TRL's RewardTrainer) and PPO steps (soup vs TRL 1.12's PPOTrainer).

    pip install -e '.[bench]'                                   # TRL 1.16 for the reward-model part
    python scripts/bench/rlhf.py                                # both parts, ~8 min on a quiet 2-core machine
    python scripts/bench/rlhf.py --quick                        # a quick look (~3 min)
    python scripts/bench/rlhf.py --parts reward                 # reward model only (no second venv needed)

TRL dropped its PPOTrainer after 1.12, so the PPO peer runs in a second virtual environment
(--trl112-python, default /work/trl112-venv/bin/python) holding trl==1.12.0 beside the same
torch, transformers, accelerate and datasets as the main one:

    python -m venv /work/trl112-venv
    /work/trl112-venv/bin/pip install torch==2.13.0 trl==1.12.0 transformers==5.24.0 \\
        accelerate==1.15.0 datasets==5.2.0

Without that interpreter the PPO part times soup alone and the JSON and the table say why.

Both parts use the same two model directories, built once under --scratch: `policy/`, a
randomly initialised Llama (sft.py's ~4.6M-parameter shape by default, --model tiny for soup's
model=tiny shape; seed 0) with the stories260k tokenizer, which has no pad token, so pad = eos
as in dpo.py; and `reward/`, a LlamaForSequenceClassification (num_labels 1) whose decoder is
the policy's very weights and whose score head is drawn from a fixed seed. Every trainer loads
`reward/` with AutoModelForSequenceClassification, so the reward model, the PPO value model and
the score head start from identical weights on both sides (no trainer draws a head of its own).
fp32, sdpa attention, full fine-tune, fused torch.optim.AdamW (soup optim.implementation=fused,
TRL optim="adamw_torch_fused"), weight decay 0, constant lr, no eval, no checkpoints, no gradient
checkpointing, in-process data loading, torch's default threads, seed 42. Each trainer runs in its
own subprocess, one after the other (soup, TRL per repeat); the fastest kept run of each side is
in `table`, every run in `runs`.

1. Reward model (pairs/s)

    soup   python -m soup.train task=reward_model model.path=<reward/> data.train_file=<pairs>
    trl    trl.RewardTrainer (TRL 1.16, main venv; this script with --reward-trl-child)

   Data: string prompt/chosen/rejected rows of hh_rlhf_harmless_base.jsonl, the first rows
   that need no cut on either side (prompt <= 256 tokens, each completion <= 256, as in
   dpo.py): soup truncates (data.max_prompt_length / max_completion_length), TRL 1.16's
   RewardConfig only drops sequences over max_length (512 here, which no kept row reaches).
   Same tokens: soup tokenizes BOS + prompt and completion + EOS apart; TRL tokenizes
   prompt + completion + "</s>" as one string (BOS added by the tokenizer). The TRL child
   checks its chosen_ids / rejected_ids against soup's prompt_ids + completion ids on every
   row it trains on and the script stops if one differs. Same batches: soup draws batches
   with its seeded permutation; the TRL file holds the rows in exactly that order and TRL
   reads it with train_sampling_strategy="sequential". Both lay a batch out alike: 8
   prompt+chosen rows then 8 prompt+rejected rows, right-padded to the longest (soup
   collate_pairs; TRL DataCollatorForPreference with pad_to_multiple_of=None), one forward.
   The TRL child records each batch's shape and the script checks them against soup's
   batches, step by step. Both read the reward where the model's own pooling puts it, the
   last token that is not the pad id; pad = eos here, so that is the token before the EOS,
   on both sides alike. Bradley-Terry loss (-logsigmoid(r_chosen - r_rejected), mean over
   pairs), no margin, no centring; batch 8 pairs, no accumulation, lr 1e-5, clip 1.0.

   pairs of a step = 8 (soup: metrics.jsonl `trained_pairs`; TRL: counted in a wrapper around
       its data collator); step time = wall time between consecutive step ends (soup: the
       `time` stamps of metrics.jsonl; TRL: a callback's on_step_end), so data, collation,
       optimizer and logging are inside it; the first --warmup-steps steps are left out;
       trained_pairs_per_s = sum(pairs) / sum(step time) over the measured steps. The losses of
       every step are kept; with identical weights and batches they should agree closely.

2. PPO (step time and generated tokens/s)

    soup   python -m soup.train task=ppo model.path=<policy/> task.reward=[<reward/>]
           task.value_init=reward_model ...
    trl    trl.experimental.ppo.PPOTrainer (TRL 1.12.0, second venv; --ppo-trl-child)

   Same for both: --ppo-batch prompts per rollout batch (B, one completion each), at most
   --max-completion-length new tokens (TRL response_length), temperature 1.0 with no top-k /
   top-p, stop at EOS (TRL stop_token="eos"), kl_coef 0.05 with the k1 estimator, no
   missing-EOS penalty, no reward whitening, gamma 1, lam 0.95, cliprange 0.2,
   cliprange_value 0.2, vf_coef 0.1, one PPO epoch of one mini-batch (so one optimizer step
   per rollout batch: soup train.micro_batch_size=B grad_accum_steps=1 task.ppo_epochs=1
   task.num_mini_batches=1; TRL per_device_train_batch_size=B gradient_accumulation_steps=1
   num_ppo_epochs=1 num_mini_batches=1 local_rollout_forward_batch_size=B), lr 1e-6, and no
   gradient clipping (TRL's PPO loop never clips, so soup runs train.max_grad_norm=0). The
   policy starts from `policy/`, the reference is a frozen copy of it (TRL: `policy/` loaded a
   second time), the reward model and the value model both start from `reward/` (soup
   task.value_init=reward_model). One optimizer over policy and value on both sides.
   Same prompts: the prompt strings of the reward part's rows, tokenized with the tokenizer's
   defaults (BOS added), as soup's prompt reader does; the TRL child gets those ids in soup's
   sampling order and an unshuffled dataloader (TRL's own is shuffled), so step k of both
   rolls out from the same B prompts; the child records the prompts it generated from and the
   script checks them. Not the same, by construction: the random draws (each side seeds its
   own), so the completions differ and a random model samples EOS at random points. That is
   why generated tokens/s is reported beside the step time.
   Work that differs by design (each trainer's own way): TRL takes the rollout's old
   log-probs from generate's scores, soup recomputes them in a separate no-grad forward; TRL
   decodes with model.generate (output_scores=True), soup with its own KV-cache sampler.

   Per step, over the steps after --ppo-warmup-steps:
     step_s        wall time between consecutive optimizer-step ends (as above), so rollout,
                   scoring, reference / value forwards, GAE, the training forward and backward,
                   the optimizer and logging are all inside it
     rollout_s     the generation call alone (soup: its logged time/rollout_s; TRL: a timer
                   around trl.experimental.ppo.ppo_trainer.batch_generation)
     completion tokens   generated tokens of the step up to and including each row's first
                   EOS, or all of them for a row that hits the cap (soup: completions/mean_length
                   x B; TRL: counted on the responses its generation returns)
   generated tokens/s = completion tokens / rollout_s; step tokens/s = completion tokens /
   step_s (what the whole step processes per second of completion, so that steps whose
   completions stop early are not counted as faster); decode steps = the width of the
   generated block (TRL: responses' width; generation stops when every row has stopped).

Load: as sft.py, the script waits while another scripts/bench/ benchmark works and for 10 s
of quiet before each run, records the CPU that other processes used during the measured
steps (other_load) and runs again (up to --max-tries) a run above --max-other-load. A run
that fails is recorded with its error and log tail, and the rest go on.

soup never imports TRL; this script imports TRL only inside the TRL subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
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
    machine_info,
    machine_line,
    run_measured,
    soup_source,
    tail,
    wait_for_idle,
)
from dpo import wait_for_other_benchmarks  # noqa: E402

DATA_FILE = SHARED / "data" / "preference" / "hh_rlhf_harmless_base.jsonl"
MAX_LENGTH = 512
MAX_PROMPT_LENGTH = 256
MAX_COMPLETION_LENGTH = 256
PAIRS_PER_BATCH = 8
RM_LR = 1e-5
PPO_LR = 1e-6
HEAD_INIT_SEED = 1
PPO_SETTINGS = dict(temperature=1.0, kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, cliprange=0.2,
                    cliprange_value=0.2, vf_coef=0.1, ppo_epochs=1, num_mini_batches=1, whiten_rewards=False,
                    missing_eos_penalty=None)
DEFAULT_TRL112_PYTHON = Path("/work/trl112-venv/bin/python")
SIDES = ("soup", "trl")
# The packages whose versions the TRL 1.12 child reports (its own venv).
TRL112_PACKAGES = ("trl", "transformers", "torch", "accelerate", "datasets", "tokenizers", "numpy")


# --------------------------------------------------------------------------- inputs


def model_arch(name: str) -> dict:
    if name == "small":
        return dict(SMALL_ARCH)
    from dataclasses import asdict

    from soup.config.schema import TinyArchConfig

    return asdict(TinyArchConfig())


def build_model_dirs(root: Path, arch: dict) -> dict:
    """policy/: a random-init Llama + tokenizer (pad = eos); reward/: the same decoder weights
    under a seeded num_labels=1 score head, as LlamaForSequenceClassification."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    had_pad = tokenizer.pad_token is not None
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = None
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch)
    torch.manual_seed(MODEL_INIT_SEED)
    policy = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fields = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
    reward_config = LlamaConfig(**fields, num_labels=1)
    reward_config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(HEAD_INIT_SEED)
    reward = LlamaForSequenceClassification(reward_config).to(torch.float32)
    missing = reward.model.load_state_dict(policy.model.state_dict())
    if missing.missing_keys or missing.unexpected_keys:
        raise RuntimeError(f"the reward model's decoder does not take the policy's weights: {missing}")
    dirs = {"policy": root / "policy", "reward": root / "reward"}
    for name, model in (("policy", policy), ("reward", reward)):
        if dirs[name].exists():
            shutil.rmtree(dirs[name])
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return {"policy_dir": str(dirs["policy"]), "reward_dir": str(dirs["reward"]),
            "parameters": sum(p.numel() for p in policy.parameters()),
            "reward_parameters": sum(p.numel() for p in reward.parameters()), "vocab_size": len(tokenizer),
            "tokenizer": str(TOKENIZER_DIR), "tokenizer_had_pad_token": had_pad,
            "pad": f"{tokenizer.pad_token} (id {tokenizer.pad_token_id}) = eos", "init_seed": MODEL_INIT_SEED,
            "score_head_init_seed": HEAD_INIT_SEED, **arch}


def preference_data_cfg(train_file: Path):
    from omegaconf import OmegaConf

    from soup.config.schema import DataConfig

    return OmegaConf.structured(DataConfig(
        name="file", train_file=str(train_file), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
        max_completion_length=MAX_COMPLETION_LENGTH, val_split=0.0))


def fitting_rows(tokenizer, count: int) -> tuple[list[tuple[int, dict]], int]:
    """The first `count` (line, record) pairs of DATA_FILE that need no cut (module docstring)."""
    from soup.data.readers import read_rows

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    kept, skipped = [], 0
    for row in read_rows(DATA_FILE):
        record = row.record
        fits = len([bos] + ids(record["prompt"])) <= MAX_PROMPT_LENGTH and all(
            len(ids(record[k]) + [eos]) <= MAX_COMPLETION_LENGTH for k in ("chosen", "rejected"))
        if fits:
            kept.append((row.line, record))
            if len(kept) == count:
                return kept, skipped
        else:
            skipped += 1
    raise SystemExit(f"only {len(kept)} rows of {DATA_FILE} fit {MAX_PROMPT_LENGTH}/{MAX_COMPLETION_LENGTH} "
                     f"tokens; ask for fewer steps")


def build_reward_data(model: dict, data_dir: Path, rows_needed: int) -> dict:
    """The pair file soup reads, the same pairs in soup's batch order for TRL, the ids TRL must
    produce, and each step's batch shape."""
    from transformers import AutoTokenizer

    from soup.data.preference import build_preference_datasets
    from soup.data.sampler import ResumableBatchSampler

    tokenizer = AutoTokenizer.from_pretrained(model["reward_dir"])
    kept, skipped = fitting_rows(tokenizer, rows_needed)
    lines = DATA_FILE.read_text(encoding="utf-8").splitlines()
    data_dir.mkdir(parents=True, exist_ok=True)
    soup_file = data_dir / "hh_rlhf_harmless_base.fits.jsonl"
    soup_file.write_text("".join(lines[line - 1] + "\n" for line, _ in kept), encoding="utf-8")
    splits = build_preference_datasets(preference_data_cfg(soup_file), tokenizer, "paired", SEED, margin=True)
    report = splits.report
    if report.prompts_truncated or report.completions_truncated or report.rows_dropped:
        raise RuntimeError(f"soup cut rows the benchmark chose as fitting: {report.summary()}")
    examples = splits.train
    order = ResumableBatchSampler(len(examples), PAIRS_PER_BATCH, SEED).epoch_order(0)
    trl_file = data_dir / "hh_rlhf_harmless_base.fits.soup_order.jsonl"
    trl_file.write_text("".join(json.dumps({k: kept[i][1][k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                for i in order), encoding="utf-8")
    expected_file = data_dir / "soup_ids.soup_order.json"  # the sequences the TRL child must tokenize to
    expected_file.write_text(json.dumps([{"chosen_ids": examples[i]["prompt_ids"] + examples[i]["chosen_ids"],
                                          "rejected_ids": examples[i]["prompt_ids"] + examples[i]["rejected_ids"]}
                                         for i in order]))
    steps, lengths = [], []
    for start in range(0, len(order), PAIRS_PER_BATCH):
        batch = [examples[i] for i in order[start:start + PAIRS_PER_BATCH]]
        rows = [e["prompt_ids"] + e["chosen_ids"] for e in batch] + [e["prompt_ids"] + e["rejected_ids"] for e in batch]
        steps.append({"shape": [len(rows), max(map(len, rows))], "tokens": sum(map(len, rows))})
        lengths += [len(r) for r in rows]
    return {
        "source": str(DATA_FILE), "rows_used": len(examples), "source_rows_skipped_as_needing_a_cut": skipped,
        "soup_file": str(soup_file), "trl_file": str(trl_file), "expected_ids_file": str(expected_file),
        "tokens_per_sequence": {"mean": statistics.mean(lengths), "max": max(lengths)},
        "padded_batch_length": {"mean": statistics.mean(s["shape"][1] for s in steps),
                                "max": max(s["shape"][1] for s in steps)},
        "soup_report": report.summary(), "steps": steps,
    }


def build_ppo_prompts(model: dict, data_dir: Path, prompts_needed: int, batch: int) -> dict:
    """soup's prompt file ({"prompt": text}) and the prompt ids in soup's sampling order for TRL."""
    from transformers import AutoTokenizer

    from soup.data.sampler import ResumableBatchSampler

    tokenizer = AutoTokenizer.from_pretrained(model["policy_dir"])
    kept, _ = fitting_rows(tokenizer, prompts_needed)
    prompts = [record["prompt"] for _, record in kept]
    data_dir.mkdir(parents=True, exist_ok=True)
    soup_file = data_dir / "hh_rlhf_harmless_base.prompts.jsonl"
    soup_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    ids = [tokenizer(p)["input_ids"] for p in prompts]  # soup/tasks/prompts.py: the tokenizer's defaults
    order = ResumableBatchSampler(len(prompts), batch, SEED).epoch_order(0)
    ordered_file = data_dir / "prompt_ids.soup_order.json"
    ordered_file.write_text(json.dumps([ids[i] for i in order]))
    lengths = [len(x) for x in ids]
    return {"source": str(DATA_FILE), "rows": len(prompts), "soup_file": str(soup_file),
            "ordered_ids_file": str(ordered_file),
            "prompt_tokens": {"mean": statistics.mean(lengths), "max": max(lengths), "min": min(lengths)}}


# --------------------------------------------------------------------------- running


def child_env(extra: dict | None = None) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(extra or {})}


def run_logged(command: list[str], log_path: Path, env: dict | None = None) -> tuple[dict, LoadSampler]:
    """sft.run_measured with this script's child environment."""
    saved = dict(os.environ)
    os.environ.update(child_env(env))
    try:
        return run_measured(command, log_path)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def pair_figures(step_end_s: list[float], step_pairs: list[int], warmup: int, sampler: LoadSampler) -> dict:
    ends = step_end_s[warmup - 1:]
    times = [b - a for a, b in zip(ends, ends[1:])]
    pairs = step_pairs[warmup:]
    return {
        "measured_steps": len(times), "trained_pairs_per_s": sum(pairs) / sum(times),
        "trained_pairs_per_s_step_median": statistics.median(p / t for p, t in zip(pairs, times)),
        "step_s_mean": statistics.mean(times), "measured_time_s": sum(times),
        "other_load": sampler.other_load(ends[0], ends[-1]), "step_time_s": times,
        "step_other_load": [sampler.other_load(a, b) for a, b in zip(ends, ends[1:])],
    }


def ppo_figures(step_end_s: list[float], rollout_s: list[float], completion_tokens: list[float], warmup: int,
                sampler: LoadSampler) -> dict:
    ends = step_end_s[warmup - 1:]
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    roll, gen = rollout_s[warmup:], completion_tokens[warmup:]
    return {
        "measured_steps": len(step_s),
        "step_s_mean": statistics.mean(step_s), "step_s_median": statistics.median(step_s),
        "rollout_s_mean": statistics.mean(roll),
        "rest_of_step_s_mean": statistics.mean(s - r for s, r in zip(step_s, roll)),
        "rollout_share_of_step": sum(roll) / sum(step_s),
        "completion_tokens_per_step_mean": statistics.mean(gen),
        "generated_tokens_per_s": sum(gen) / sum(roll),
        "step_completion_tokens_per_s": sum(gen) / sum(step_s),
        "other_load": sampler.other_load(ends[0], ends[-1]),
        "step_s": step_s, "step_rollout_s": roll, "step_completion_tokens": gen,
        "step_other_load": [sampler.other_load(a, b) for a, b in zip(ends, ends[1:])],
    }


def soup_common(run_dir: Path, steps: int, batch: int, lr: float, max_grad_norm: float) -> list[str]:
    return [
        sys.executable, "-m", "soup.train", "model=hf", "model.dtype=float32", "model.attn_implementation=sdpa",
        "data=file", "data.val_split=0", f"data.max_length={MAX_LENGTH}",
        f"train.micro_batch_size={batch}", "train.grad_accum_steps=1", f"train.max_steps={steps}",
        "train.precision=fp32", f"train.max_grad_norm={max_grad_norm}", "train.save_every_steps=0",
        "train.log_every_steps=1", "train.progress_bar=false", "train.device=cpu", "checkpointing=none",
        "peft=none", f"optim.lr={lr}", "optim.weight_decay=0.0", "optim.implementation=fused", "sched=constant",
        f"seed={SEED}", f"hydra.run.dir={run_dir}",
    ]


def soup_metrics(run_dir: Path) -> tuple[dict, list[dict]]:
    record = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return record, [r for r in rows if r.get("split") == "train"]


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)  # metrics.jsonl is appended to: start from an empty directory
    path.mkdir(parents=True)
    return path


# --------------------------------------------------------------------------- reward model


def run_soup_reward(model: dict, data: dict, run_dir: Path, steps: int, warmup: int) -> dict:
    fresh_dir(run_dir)
    command = soup_common(run_dir, steps, PAIRS_PER_BATCH, RM_LR, 1.0) + [
        "task=reward_model", f"model.path={model['reward_dir']}", f"data.train_file={data['soup_file']}",
        f"data.max_prompt_length={MAX_PROMPT_LENGTH}", f"data.max_completion_length={MAX_COMPLETION_LENGTH}",
    ]
    log_path = run_dir.parent / f"{run_dir.name}.log"
    process, sampler = run_logged(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"soup failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    record, rows = soup_metrics(run_dir)
    return {
        "command": command, "steps": len(rows),
        **pair_figures([r["time"] for r in rows], [r["trained_pairs"] for r in rows], warmup, sampler),
        "peak_rss_mb": rows[-1].get("peak_memory_mb", record["stats"]["peak_memory_mb"]),
        "peak_rss_mb_after_final_save": record["stats"]["peak_memory_mb"], **process,
        "losses": [r["loss"] for r in rows], "accuracy_last_step": rows[-1].get("accuracy"),
        "torch_threads": record["device"]["torch_threads"], "log": str(log_path),
    }


def reward_trl_settings(steps: int) -> dict:
    """RewardConfig arguments; every default that differs from soup's run is set explicitly."""
    return dict(
        max_steps=steps, per_device_train_batch_size=PAIRS_PER_BATCH, gradient_accumulation_steps=1,
        learning_rate=RM_LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", bf16=False, fp16=False,  # RewardConfig's bf16 default follows the device
        gradient_checkpointing=False,  # RewardConfig defaults to True; soup runs checkpointing=none
        use_cpu=True, max_length=MAX_LENGTH, pad_to_multiple_of=None, center_rewards_coefficient=None,
        train_sampling_strategy="sequential", seed=SEED, dataloader_num_workers=0, report_to=[],
        eval_strategy="no", save_strategy="no", logging_steps=1, disable_tqdm=True,
    )


def run_trl_reward(model: dict, data: dict, work_dir: Path, steps: int, warmup: int) -> dict:
    fresh_dir(work_dir)
    spec = {"model_dir": model["reward_dir"], "data_file": data["trl_file"],
            "expected_ids_file": data["expected_ids_file"], "output_dir": str(work_dir / "trainer"),
            "result": str(work_dir / "result.json"), "settings": reward_trl_settings(steps)}
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(Path(__file__).resolve()), "--reward-trl-child", str(spec_path)]
    log_path = work_dir.parent / f"{work_dir.name}.log"
    process, sampler = run_logged(command, log_path, {"HF_DATASETS_CACHE": str(work_dir / "hf_datasets")})
    if process["status"] != 0:
        raise RuntimeError(f"TRL failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    child = json.loads(Path(spec["result"]).read_text())
    if child["ids_mismatched_rows"]:
        raise RuntimeError(f"TRL tokenized {child['ids_mismatched_rows']} rows differently from soup: {log_path}")
    want = [s["shape"] for s in data["steps"][:steps]]
    if child["step_shapes"] != want:
        raise RuntimeError(f"TRL's batch shapes differ from soup's: {child['step_shapes'][:4]}... vs {want[:4]}...")
    return {
        "command": command, "settings": spec["settings"], "steps": len(child["step_end_s"]),
        **pair_figures(child["step_end_s"], child["step_pairs"], warmup, sampler),
        "peak_rss_mb": child["peak_rss_mb"], **process, "losses": child["losses"],
        "accuracy_last_step": child["accuracy"][-1] if child["accuracy"] else None,
        "torch_threads": child["torch_threads"], "log": str(log_path),
    }


def reward_trl_child(spec_path: str) -> None:
    """TRL 1.16 RewardTrainer: train, timing each step and recording each batch."""
    from collections import deque

    import datasets
    import torch
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]
    batches: deque[tuple[int, list[int]]] = deque()
    step_end_s, step_pairs, step_shapes, losses, accuracy = [], [], [], [], []

    class RecordingCollator:
        def __init__(self, collate):
            self.collate = collate

        def __call__(self, examples):
            batch = self.collate(examples)
            batches.append((batch["input_ids"].shape[0] // 2, list(batch["input_ids"].shape)))
            return batch

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end_s.append(time.time())  # wall clock, as soup's metrics.jsonl and the load sampler
            pairs, shape = batches.popleft()
            step_pairs.append(pairs)
            step_shapes.append(shape)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])
                accuracy.append(logs.get("accuracy"))

    config = trl.RewardConfig(output_dir=spec["output_dir"], **spec["settings"])
    trainer = trl.RewardTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tokenizer, callbacks=[StepClock()])
    expected = json.loads(Path(spec["expected_ids_file"]).read_text())
    prepared = trainer.train_dataset
    mismatched = sum([c, r] != [want["chosen_ids"], want["rejected_ids"]]
                     for c, r, want in zip(prepared["chosen_ids"], prepared["rejected_ids"], expected))
    mismatched += abs(len(prepared) - len(expected))
    trainer.data_collator = RecordingCollator(trainer.data_collator)  # the dataloader is built inside train()
    trainer.train()
    Path(spec["result"]).write_text(json.dumps({
        "step_end_s": step_end_s, "step_pairs": step_pairs, "step_shapes": step_shapes, "losses": losses,
        "accuracy": accuracy, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ids_mismatched_rows": mismatched, "torch_threads": torch.get_num_threads(),
    }))


# --------------------------------------------------------------------------- PPO


def run_soup_ppo(args: argparse.Namespace, model: dict, prompts: dict, run_dir: Path, steps: int) -> dict:
    fresh_dir(run_dir)
    s = PPO_SETTINGS
    command = soup_common(run_dir, steps, args.ppo_batch, PPO_LR, 0) + [
        "task=ppo", f"model.path={model['policy_dir']}", f"data.train_file={prompts['soup_file']}",
        f"task.reward=[{model['reward_dir']}]", "task.value_init=reward_model",
        f"task.max_completion_length={args.max_completion_length}", f"task.temperature={s['temperature']}",
        f"task.kl_coef={s['kl_coef']}", f"task.ppo_epochs={s['ppo_epochs']}",
        f"task.num_mini_batches={s['num_mini_batches']}",
    ]  # the rest of PPO_SETTINGS are soup's defaults (soup refuses a flag the run does not read); checked below
    log_path = run_dir.parent / f"{run_dir.name}.log"
    launched = time.time()
    process, sampler = run_logged(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"soup failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    record, rows = soup_metrics(run_dir)
    task = record["config"]["task"]
    want = {**PPO_SETTINGS, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "target_kl": None,
            "value_init": "reward_model", "max_completion_length": args.max_completion_length}
    differ = {k: (task.get(k, "<absent>"), v) for k, v in want.items() if task.get(k, "<absent>") != v}
    if differ:
        raise RuntimeError(f"soup's resolved task config differs from the TRL settings (soup, wanted): {differ}")
    tokens = [r["completions/mean_length"] * args.ppo_batch for r in rows]
    prompt_report = record["stats"].get("data", {}).get("train", {})
    return {
        "command": command, "steps": len(rows),
        **ppo_figures([r["time"] for r in rows], [r["time/rollout_s"] for r in rows], tokens, args.ppo_warmup_steps,
                      sampler),
        "peak_rss_mb": rows[-1].get("peak_memory_mb", record["stats"]["peak_memory_mb"]),
        "peak_rss_mb_after_final_save": record["stats"]["peak_memory_mb"], **process,
        "launch_to_first_step_end_s": rows[0]["time"] - launched,
        "scoring_s_mean": statistics.mean(r.get("time/scoring_s", float("nan")) for r in rows[args.ppo_warmup_steps:]),
        "eos_fraction_mean": statistics.mean(r.get("completions/eos_fraction", float("nan")) for r in rows),
        "soup_logged_rollout_tokens_per_s_mean": statistics.mean(
            r.get("rollout_tokens_per_s", float("nan")) for r in rows[args.ppo_warmup_steps:]),
        "score_first_step": rows[0].get("score"), "kl_last_step": rows[-1].get("kl"),
        "loss_first_step": rows[0].get("loss"), "loss_last_step": rows[-1].get("loss"),
        "prompt_tokens": {"mean": prompt_report.get("mean_prompt_tokens"), "max": prompt_report.get("max_prompt_tokens"),
                          "truncated": prompt_report.get("prompts_truncated")},
        "torch_threads": record["device"]["torch_threads"], "log": str(log_path),
    }


def check_soup_prompts(run: dict, prompts: dict) -> None:
    """soup read the same prompts, uncut: its prompt report against the ids computed here."""
    seen, want = run["prompt_tokens"], prompts["prompt_tokens"]
    if seen["truncated"] or seen["mean"] is None or abs(seen["mean"] - want["mean"]) > 1e-6 or seen["max"] != want["max"]:
        raise RuntimeError(f"soup tokenized the prompts differently: {seen}, expected {want}")


def ppo_trl_settings(args: argparse.Namespace, steps: int) -> dict:
    """PPOConfig (TRL 1.12) arguments; every default that differs from soup's run is set explicitly."""
    s = PPO_SETTINGS
    return dict(
        per_device_train_batch_size=args.ppo_batch, gradient_accumulation_steps=1,
        num_mini_batches=s["num_mini_batches"], num_ppo_epochs=s["ppo_epochs"], total_episodes=steps * args.ppo_batch,
        local_rollout_forward_batch_size=args.ppo_batch, response_length=args.max_completion_length,
        temperature=s["temperature"], stop_token="eos", missing_eos_penalty=s["missing_eos_penalty"],
        kl_coef=s["kl_coef"], kl_estimator=s["kl_estimator"], whiten_rewards=s["whiten_rewards"],
        cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"], gamma=s["gamma"],
        lam=s["lam"], learning_rate=PPO_LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch_fused", bf16=False, fp16=False,  # PPOConfig defaults to bf16=True
        gradient_checkpointing=False, use_cpu=True, seed=SEED, dataloader_num_workers=0,
        num_sample_generations=0,  # no extra generation passes for logging
        report_to=[], eval_strategy="no", save_strategy="no", logging_steps=1, disable_tqdm=True,
    )


def run_trl_ppo(args: argparse.Namespace, model: dict, prompts: dict, work_dir: Path, steps: int) -> dict:
    fresh_dir(work_dir)
    spec = {"policy_dir": model["policy_dir"], "reward_dir": model["reward_dir"],
            "prompt_ids_file": prompts["ordered_ids_file"], "steps": steps, "batch": args.ppo_batch,
            "output_dir": str(work_dir / "trainer"), "result": str(work_dir / "result.json"),
            "settings": ppo_trl_settings(args, steps)}
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [str(args.trl112_python), str(Path(__file__).resolve()), "--ppo-trl-child", str(spec_path)]
    log_path = work_dir.parent / f"{work_dir.name}.log"
    launched = time.time()
    process, sampler = run_logged(command, log_path, {"HF_DATASETS_CACHE": str(work_dir / "hf_datasets")})
    child = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).exists() else {}
    if process["status"] != 0 or "error" in child:
        raise RuntimeError(f"TRL 1.12 PPOTrainer failed (exit {process['status']}): "
                           f"{child.get('error') or ''}\n{tail(log_path)}")
    expected = json.loads(Path(prompts["ordered_ids_file"]).read_text())
    for k, seen in enumerate(child["prompt_ids"]):
        want = expected[k * args.ppo_batch:(k + 1) * args.ppo_batch]
        if seen != want:
            raise RuntimeError(f"TRL's rollout batch {k + 1} differs from soup's step-{k + 1} prompts: {log_path}")
    if len(child["step_end_s"]) != steps or len(child["rollout_s"]) != steps:
        raise RuntimeError(f"TRL ran {len(child['step_end_s'])} updates and {len(child['rollout_s'])} generations, "
                           f"expected {steps} of each")
    return {
        "command": command, "settings": spec["settings"], "steps": len(child["step_end_s"]),
        **ppo_figures(child["step_end_s"], child["rollout_s"], child["completion_tokens"], args.ppo_warmup_steps,
                      sampler),
        "peak_rss_mb": child["peak_rss_mb"], **process,
        "launch_to_first_step_end_s": child["step_end_s"][0] - launched,
        "decode_steps_mean": statistics.mean(child["decode_steps"][args.ppo_warmup_steps:]),
        "eos_fraction_mean": child["eos_fraction_mean"],
        "score_first_step": child["scores"][0] if child["scores"] else None,
        "kl_last_step": child["kls"][-1] if child["kls"] else None,
        "trl112_versions": child["versions"], "torch_threads": child["torch_threads"], "log": str(log_path),
    }


def ppo_trl_child(spec_path: str) -> None:
    """TRL 1.12 PPOTrainer (its own venv: this function imports neither soup nor anything of the main venv)."""
    spec = json.loads(Path(spec_path).read_text())
    try:
        _ppo_trl_child(spec)
    except Exception as exc:  # written down for the report, then re-raised for the exit status
        Path(spec["result"]).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}",
                                                    "traceback": traceback.format_exc()}))
        raise


def _ppo_trl_child(spec: dict) -> None:
    import importlib.metadata

    import datasets
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    import trl.experimental.ppo.ppo_trainer as ppo_module
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_dir"], padding_side="left")  # TRL's PPO left-pads queries
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], **load)
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["policy_dir"], **load)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, **load)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_dir"], num_labels=1, **load)
    prompt_ids = json.loads(Path(spec["prompt_ids_file"]).read_text())
    dataset = datasets.Dataset.from_list([{"input_ids": ids} for ids in prompt_ids])
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    step_end_s, rollout_s, completion_tokens, decode_steps, prompts_seen, eos_rows = [], [], [], [], [], []
    scores, kls = [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end_s.append(time.time())  # wall clock, as soup's metrics.jsonl and the load sampler

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "objective/scores" in logs:
                scores.append(logs["objective/scores"])
            if "objective/kl" in logs:
                kls.append(logs["objective/kl"])

    generate_batch = ppo_module.batch_generation

    def timed_batch_generation(model, queries, *rest, **kwargs):
        started = time.perf_counter()
        query_responses, logits = generate_batch(model, queries, *rest, **kwargs)
        rollout_s.append(time.perf_counter() - started)
        responses = query_responses[:, queries.shape[1]:]
        is_eos = responses == eos
        # Up to and including the first EOS; a row without one: the whole width.
        lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, responses.shape[1])
        completion_tokens.append(int(lengths.sum()))
        decode_steps.append(int(responses.shape[1]))
        eos_rows.append(float(is_eos.any(-1).float().mean()))
        prompts_seen.append([row[row != pad].tolist() for row in queries])  # left padding off (no EOS in prompts)
        return query_responses, logits

    # train() looks the function up in its module at call time.
    ppo_module.batch_generation = timed_batch_generation
    config = PPOConfig(output_dir=spec["output_dir"], **spec["settings"])
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, train_dataset=dataset, value_model=value_model,
                         callbacks=[StepClock()])
    # TRL's dataloader shuffles; this one reads the prompts in soup's order, with TRL's collator.
    trainer.dataloader = trainer.accelerator.prepare(DataLoader(
        trainer.train_dataset, batch_size=config.local_batch_size, shuffle=False, collate_fn=trainer.data_collator,
        drop_last=True))
    trainer.train()
    versions = {}
    for name in TRL112_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    Path(spec["result"]).write_text(json.dumps({
        "step_end_s": step_end_s, "rollout_s": rollout_s, "completion_tokens": completion_tokens,
        "decode_steps": decode_steps, "prompt_ids": prompts_seen,
        "eos_fraction_mean": statistics.mean(eos_rows) if eos_rows else None, "scores": scores, "kls": kls,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(), "versions": versions,
        "python": sys.executable,
    }))


def trl112_status(python: Path) -> dict:
    """Whether the TRL 1.12 interpreter exists and imports PPOTrainer; its key package versions."""
    if not python.exists():
        return {"python": str(python), "usable": False,
                "reason": f"{python} does not exist (see the module docstring for the venv)"}
    code = ("import importlib.metadata as m, json\n"
            "from trl.experimental.ppo import PPOTrainer, PPOConfig\n"
            f"print(json.dumps({{n: m.version(n) for n in {list(TRL112_PACKAGES)!r}}}))")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=child_env())
    if out.returncode != 0:
        return {"python": str(python), "usable": False,
                "reason": "importing trl.experimental.ppo.PPOTrainer failed: " + out.stderr.strip()[-2000:]}
    return {"python": str(python), "usable": True, "versions": json.loads(out.stdout.strip().splitlines()[-1])}


# --------------------------------------------------------------------------- report


def best(runs: list[dict], part: str, side: str, better) -> dict | None:
    kept = [r for r in runs if r["part"] == part and r["side"] == side and not r["discarded"] and "error" not in r]
    return max(kept, key=better) if kept else None


def build_table(runs: list[dict]) -> dict:
    def strip(run: dict) -> dict:  # the per-step lists and the command stay in `runs`
        return {k: v for k, v in run.items()
                if not (k.startswith("step_") and isinstance(v, list)) and k not in ("command", "settings")}

    table: dict = {}
    soup = best(runs, "reward", "soup", lambda r: r["trained_pairs_per_s"])
    trl = best(runs, "reward", "trl", lambda r: r["trained_pairs_per_s"])
    if soup or trl:
        entry = {"soup": strip(soup) if soup else None, "trl": strip(trl) if trl else None}
        if soup and trl:
            entry["soup_pairs_per_s_over_trl"] = soup["trained_pairs_per_s"] / trl["trained_pairs_per_s"]
            entry["soup_peak_rss_over_trl"] = soup["peak_rss_mb"] / trl["peak_rss_mb"]
            n = min(len(soup["losses"]), len(trl["losses"]))
            entry["max_abs_loss_difference"] = max(abs(a - b) for a, b in zip(soup["losses"][:n], trl["losses"][:n]))
        table["reward"] = entry
    soup = best(runs, "ppo", "soup", lambda r: -r["step_s_mean"])
    trl = best(runs, "ppo", "trl", lambda r: -r["step_s_mean"])
    if soup or trl:
        entry = {"soup": strip(soup) if soup else None, "trl": strip(trl) if trl else None}
        if soup and trl:
            entry["soup_over_trl"] = {
                "step_speed": trl["step_s_mean"] / soup["step_s_mean"],  # > 1: soup's step is faster
                "generated_tokens_per_s": soup["generated_tokens_per_s"] / trl["generated_tokens_per_s"],
                "step_completion_tokens_per_s": soup["step_completion_tokens_per_s"]
                / trl["step_completion_tokens_per_s"],
                "peak_rss": soup["peak_rss_mb"] / trl["peak_rss_mb"],
            }
        table["ppo"] = entry
    return table


def print_table(table: dict, errors: list[dict], trl112: dict | None) -> None:
    if "reward" in table:
        r = table["reward"]
        print(f"{'reward model':<13} {'pairs/s':>8} {'median':>7} {'step s':>7} {'peak RSS MB':>11} {'loss 1st/last':>15} "
              f"{'other load':>10}")
        for side in SIDES:
            x = r.get(side)
            if x:
                print(f"{side:<13} {x['trained_pairs_per_s']:>8.2f} {x['trained_pairs_per_s_step_median']:>7.2f} "
                      f"{x['step_s_mean']:>7.3f} {x['peak_rss_mb']:>11.0f} "
                      f"{x['losses'][0]:>7.4f}/{x['losses'][-1]:<7.4f} {x['other_load']:>10.0%}")
        if "soup_pairs_per_s_over_trl" in r:
            print(f"soup/TRL pairs/s {r['soup_pairs_per_s_over_trl']:.2f}x, peak RSS {r['soup_peak_rss_over_trl']:.2f}x; "
                  f"largest per-step loss difference {r['max_abs_loss_difference']:.2e}")
        print()
    if "ppo" in table:
        p = table["ppo"]
        print(f"{'PPO':<5} {'step s':>7} {'rollout s':>9} {'rest s':>7} {'compl tok/step':>14} {'gen tok/s':>9} "
              f"{'step tok/s':>10} {'peak RSS MB':>11} {'other load':>10}")
        for side in SIDES:
            x = p.get(side)
            if x:
                print(f"{side:<5} {x['step_s_mean']:>7.3f} {x['rollout_s_mean']:>9.3f} {x['rest_of_step_s_mean']:>7.3f} "
                      f"{x['completion_tokens_per_step_mean']:>14.1f} {x['generated_tokens_per_s']:>9.0f} "
                      f"{x['step_completion_tokens_per_s']:>10.0f} {x['peak_rss_mb']:>11.0f} {x['other_load']:>10.0%}")
        if "soup_over_trl" in p:
            q = p["soup_over_trl"]
            print(f"soup/TRL: step speed {q['step_speed']:.2f}x, generated tok/s {q['generated_tokens_per_s']:.2f}x, "
                  f"step tok/s {q['step_completion_tokens_per_s']:.2f}x, peak RSS {q['peak_rss']:.2f}x")
        print("gen tok/s = completion tokens (to the first EOS) / generation time; step tok/s = completion tokens /\n"
              "step time; TRL = trl.experimental.ppo.PPOTrainer 1.12.0 in its own venv.")
    if trl112 is not None and not trl112.get("usable"):
        print(f"TRL 1.12 PPOTrainer not run: {trl112['reason']}; the PPO rows are soup's alone.")
    for e in errors:
        print(f"FAILED {e['part']} {e['side']}: {e['error'].splitlines()[0]}")


def write_report(args: argparse.Namespace, started: float, model: dict, data: dict, trl112: dict | None,
                 runs: list[dict], errors: list[dict]) -> dict:
    machine = machine_info()
    report = {
        "benchmark": "rlhf_reward_model_and_ppo_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "note": args.note,
        "soup_source": soup_source(),
        "machine": machine,
        "trl112": trl112,
        "settings": {
            "reward": {"pairs_per_batch": PAIRS_PER_BATCH, "lr": RM_LR, "max_grad_norm": 1.0,
                       "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT_LENGTH,
                       "max_completion_length": MAX_COMPLETION_LENGTH, "warmup_steps": args.warmup_steps,
                       "measured_steps": args.measured_steps},
            "ppo": {"prompts_per_rollout_batch": args.ppo_batch, "max_completion_length": args.max_completion_length,
                    "lr": PPO_LR, "max_grad_norm": "none (TRL's PPO does not clip; soup train.max_grad_norm=0)",
                    **PPO_SETTINGS, "warmup_steps": args.ppo_warmup_steps, "measured_steps": args.ppo_measured_steps},
            "common": {"precision": "fp32", "optimizer": "torch.optim.AdamW(fused=True), weight decay 0",
                       "schedule": "constant", "seed": SEED, "repeats": args.repeats},
        },
        "model": model,
        "data": {part: {k: v for k, v in d.items() if k != "steps"} for part, d in data.items()},
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
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "rlhf.json")
    parser.add_argument("--scratch", type=Path, default=ROOT / ".bench" / "rlhf")
    parser.add_argument("--parts", nargs="+", default=["reward", "ppo"], choices=["reward", "ppo"])
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--model", default="small", choices=["small", "tiny"],
                        help="small: sft.py's ~4.6M-parameter Llama; tiny: soup's model=tiny shape (~0.8M)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="reward model: steps left out (>= 1)")
    parser.add_argument("--measured-steps", type=int, default=20, help="reward model: measured steps")
    parser.add_argument("--ppo-batch", type=int, default=8, help="prompts per rollout batch (one completion each)")
    parser.add_argument("--max-completion-length", type=int, default=64, help="PPO: new tokens at most")
    parser.add_argument("--ppo-warmup-steps", type=int, default=2, help="PPO: steps left out (>= 1)")
    parser.add_argument("--ppo-measured-steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; the fastest is reported")
    parser.add_argument("--quick", action="store_true",
                        help="a quick look: 1 repeat, reward 2+6 steps, PPO 1+3 steps of 4 prompts x 32 tokens")
    parser.add_argument("--trl112-python", type=Path, default=DEFAULT_TRL112_PYTHON,
                        help="interpreter of the venv with trl==1.12.0 (PPOTrainer)")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--others-timeout", type=float, default=3600.0,
                        help="seconds to wait for other scripts/bench/ processes before each run")
    parser.add_argument("--max-other-load", type=float, default=0.10,
                        help="a run during which other processes used more than this share of the cores is run "
                             "again (kept in the JSON as discarded)")
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. which snapshot ran)")
    parser.add_argument("--reward-trl-child", help=argparse.SUPPRESS)
    parser.add_argument("--ppo-trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reward_trl_child:
        reward_trl_child(args.reward_trl_child)
        return
    if args.ppo_trl_child:
        ppo_trl_child(args.ppo_trl_child)
        return
    if args.quick:
        args.repeats, args.warmup_steps, args.measured_steps = 1, 2, 6
        args.ppo_batch, args.max_completion_length, args.ppo_warmup_steps, args.ppo_measured_steps = 4, 32, 1, 3
    if args.warmup_steps < 1 or args.ppo_warmup_steps < 1:
        parser.error("warm-up steps must be >= 1: a step's time starts at the end of the one before")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.time()
    scratch = args.scratch.resolve()
    model = build_model_dirs(scratch / "models" / args.model, model_arch(args.model))
    rm_steps = args.warmup_steps + args.measured_steps
    ppo_steps = args.ppo_warmup_steps + args.ppo_measured_steps
    data = {}
    if "reward" in args.parts:
        data["reward"] = build_reward_data(model, scratch / "data" / "reward", rm_steps * PAIRS_PER_BATCH)
        d = data["reward"]
        print(f"reward model: {model['reward_parameters'] / 1e6:.2f}M params; first {d['rows_used']} fitting pairs "
              f"({d['source_rows_skipped_as_needing_a_cut']} skipped), padded batch length mean "
              f"{d['padded_batch_length']['mean']:.0f}, max {d['padded_batch_length']['max']}", flush=True)
    trl112 = None
    if "ppo" in args.parts:
        data["ppo"] = build_ppo_prompts(model, scratch / "data" / "ppo", ppo_steps * args.ppo_batch, args.ppo_batch)
        if "trl" in args.sides:
            trl112 = trl112_status(args.trl112_python)
            if not trl112["usable"]:
                print(f"[bench] TRL 1.12 PPOTrainer unavailable: {trl112['reason']}", flush=True)
        p = data["ppo"]
        print(f"PPO: policy {model['parameters'] / 1e6:.2f}M params, {args.ppo_batch} prompts x <= "
              f"{args.max_completion_length} tokens per step, prompts {p['prompt_tokens']['mean']:.0f} tokens on "
              f"average (max {p['prompt_tokens']['max']})", flush=True)

    runs, errors = [], []
    plan = [(part, side) for part in args.parts for side in args.sides
            if not (part == "ppo" and side == "trl" and not (trl112 or {}).get("usable"))]
    for repeat in range(args.repeats):
        for part, side in plan:
            if any(e["part"] == part and e["side"] == side for e in errors):
                continue  # it failed once: the error is recorded, the other runs go on
            for attempt in range(1, args.max_tries + 1):
                waited = wait_for_other_benchmarks(args.others_timeout)
                idle = wait_for_idle(args.idle_timeout)
                name = f"{part}-{side}-repeat{repeat + 1}-try{attempt}"
                print(f"[bench] {name} ...", flush=True)
                run_dir = scratch / "runs" / name
                try:
                    if part == "reward":
                        run = (run_soup_reward(model, data["reward"], run_dir, rm_steps, args.warmup_steps)
                               if side == "soup" else
                               run_trl_reward(model, data["reward"], run_dir, rm_steps, args.warmup_steps))
                    else:
                        run = (run_soup_ppo(args, model, data["ppo"], run_dir, ppo_steps) if side == "soup"
                               else run_trl_ppo(args, model, data["ppo"], run_dir, ppo_steps))
                        if side == "soup":
                            check_soup_prompts(run, data["ppo"])
                except Exception as exc:  # recorded; the other runs go on
                    errors.append({"part": part, "side": side, "run": name, "error": str(exc)})
                    print(f"[bench] {name} FAILED: {exc}", flush=True)
                    write_report(args, started, model, data, trl112, runs, errors)
                    break
                loaded = run["other_load"] > args.max_other_load
                run.update(part=part, side=side, repeat=repeat, attempt=attempt,
                           discarded=loaded and attempt < args.max_tries, other_benchmarks_wait_s=round(waited, 1),
                           **idle)
                runs.append(run)
                if part == "reward":
                    figure = f"{run['trained_pairs_per_s']:.2f} pairs/s"
                else:
                    figure = (f"step {run['step_s_mean']:.3f} s (rollout {run['rollout_s_mean']:.3f} s, "
                              f"{run['completion_tokens_per_step_mean']:.0f} completion tokens, "
                              f"{run['generated_tokens_per_s']:.0f} gen tok/s)")
                print(f"[bench] {name}: {figure}, peak RSS {run['peak_rss_mb']:.0f} MB, other load "
                      f"{run['other_load']:.0%} ({run['process_wall_s']:.0f} s)"
                      f"{'; discarded, retrying' if run['discarded'] else ''}", flush=True)
                write_report(args, started, model, data, trl112, runs, errors)
                if not run["discarded"]:
                    break

    report = write_report(args, started, model, data, trl112, runs, errors)
    print()
    print_table(report["table"], errors, trl112)
    print(machine_line(report["machine"]))
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
