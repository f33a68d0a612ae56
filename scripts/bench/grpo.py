"""GRPO step speed on CPU: soup beside TRL's GRPOTrainer, on the same model, prompts, reward and steps.

    pip install -e '.[bench]'
    python scripts/bench/grpo.py                                  # ~4 min on a quiet 2-core machine
    python scripts/bench/grpo.py --repeats 1 --measured-steps 6   # a quick look

Two measurements, one invocation.

1. Trainers, each in its own subprocess, one after the other (soup, TRL, soup, TRL, ... for
   --repeats; the fastest run of each side is kept, every run stays in the JSON):

    soup   python -m soup.train task=grpo ... (the real entry point; overrides in soup_command)
    trl    trl.GRPOTrainer (this script re-run with --trl-child)

   Same for both: one model directory (sft.py's ~4.6M-parameter Llama, random init with a
   fixed seed, stories260k tokenizer, pad = eos, saved once under --scratch), fp32, sdpa
   attention, full fine-tune, --prompts-per-step prompts x --num-generations completions of
   at most --max-completion-length tokens per optimizer step, one generation batch per step
   (no accumulation, one pass: soup train.micro_batch_size=P grad_accum_steps=1; TRL
   per_device_train_batch_size=P*G, gradient_accumulation_steps=1, so generation_batch_size
   = P*G and steps_per_generation = 1), sampling at temperature 1.0 with top_k/top_p/min_p
   and repetition penalty off, stopping at EOS, loss_type dapo, beta 0 (no reference model),
   scale_rewards group, AdamW with its fused kernel (lr 1e-5, weight decay 0, constant),
   grad clip 1.0, no eval, no checkpoints, no gradient checkpointing, torch's default threads.

   Same prompts, same tokens: the user message of each row of soup/assets/demo/grpo.jsonl,
   as a plain string prompt ("Add 20 and 2. Answer with the number."). Both tokenize a
   string prompt with the tokenizer's defaults (BOS added, no chat template): soup in
   soup/tasks/prompts.py, TRL in GRPOTrainer._tokenize_prompts. soup draws each step's
   prompts with its own seeded permutation; the TRL file holds the rows in exactly that
   order and TRL reads it unshuffled (shuffle_dataset=False), so step k of both samples the
   same P prompts. The TRL child records the prompt ids it generated from; the script checks
   them against the expected ids and stops if they differ (soup's are checked against its
   run.json prompt report).

   Same reward: one file, `reward_fn(completions, **columns)` = the fraction of a
   completion's characters that are "e". soup gets the file (task.reward=[file.py]); TRL a
   callable that imports the same file and calls the same function.

   Not the same, by construction: the random draws (each side seeds its own generator), so
   the completions differ and a few stop at EOS at different points. Tokens are counted on
   each side and rates are per token, so this does not bias the rates.

   Per step, identical on both sides:
     step_s        wall time from the end of the previous optimizer step to the end of this
                   one (soup: the `time` stamps of consecutive metrics.jsonl lines; TRL: a
                   callback's on_step_end), so rollout, scoring, forward, backward, optimizer
                   and logging are all inside it
     rollout_s     the generation call alone (soup: its logged time/rollout_s, the
                   soup.rollout.engine.sample call; TRL: a timer around
                   GRPOTrainer._generate_single_turn, which pads the prompts and runs
                   model.generate)
     completion tokens   generated tokens up to and including the stop token
                   (soup: rollout_tokens_per_s x time/rollout_s; TRL: the lengths its generate path returns)
     trained tokens      the completion-mask sum of the step (the dapo loss units)
   Figures over the steps after --warmup-steps: mean step time; rollout tokens/s = completion
   tokens / rollout_s; trained tokens/s = trained tokens / step_s (the whole step); train-phase
   tokens/s = trained tokens / (step_s - rollout_s) (everything but generation: scoring,
   batching, forward, backward, optimizer, logging). peak_rss_mb: the trainer's own peak RSS
   (getrusage) at the end of training (soup: the peak_memory_mb its loop logs with the last
   step; run.json's, taken after its final save and loss plot, is peak_rss_mb_after_final_save;
   TRL: right after train(), which saves nothing here); process_peak_rss_mb: the whole
   subprocess, from os.wait4. All include Python and every library the process imported;
   import_rss_mb is the peak RSS of a process that only imports that side's trainer
   (`import soup.train`; `from trl import GRPOTrainer`), and peak_rss_over_import_mb the rest. launch_to_first_step_end_s: from starting the subprocess to
   the end of step 1 (imports, model load, data, the first step), outside the step figures.

2. Decoders, in one more subprocess (--decode-child): soup.rollout.engine.sample against
   transformers' model.generate(do_sample=True, ...) on the first step's P x G prompts, the
   same model, max_new_tokens, temperature 1.0, no top-k/top-p, the same stop ids, in eval
   mode without gradients; --decode-repeats timed calls each, alternating, after one untimed
   call each. tokens/s = generated tokens (up to and including the stop token) / wall time.
   Both are seeded alike (soup: a torch.Generator; generate: torch.manual_seed) and draw one
   multinomial sample per row and step from the same distribution, so they should draw the
   same tokens; `same_completions` says whether they did (then both did exactly the same work).
   This says which decoder soup's rollouts should use.

Load: before each run the script waits for 10 s of quiet (sft.py's wait_for_idle) and records
what other processes used during the measured steps (other_load); a run above
--max-other-load is run again, up to --max-tries.

soup never imports TRL; this script imports TRL only inside the TRL subprocess.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import (  # noqa: E402  (scripts/bench is not a package)
    ROOT,
    SEED,
    LoadSampler,
    build_model_dir,
    machine_info,
    machine_line,
    run_measured,
    soup_source,
    tail,
    wait_for_idle,
)

PROMPT_SOURCE = ROOT / "soup" / "assets" / "demo" / "grpo.jsonl"
LR = 1e-5
SIDES = ("soup", "trl")
REWARD_SOURCE = '''"""Benchmark reward: the fraction of a completion's characters that are "e" (deterministic, cheap)."""


def reward_fn(completions, **columns):
    return [completion.count("e") / max(len(completion), 1) for completion in completions]
'''


# --------------------------------------------------------------------------- inputs


def build_prompt_files(model_dir: Path, data_dir: Path, prompts_per_step: int) -> dict:
    """Write soup's prompt file, the same rows in soup's epoch-0 order for TRL, and the reward file.

    Returns the files and, per row of the TRL file, the prompt token ids both trainers should
    generate from (the tokenizer's defaults on a string: BOS added).
    """
    from transformers import AutoTokenizer

    from soup.data.sampler import ResumableBatchSampler

    prompts = []
    for line in PROMPT_SOURCE.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["prompt"]
        prompts.append(next(m["content"] for m in messages if m["role"] == "user"))
    data_dir.mkdir(parents=True, exist_ok=True)
    soup_file = data_dir / "grpo_demo.prompts.jsonl"
    soup_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    order = ResumableBatchSampler(len(prompts), prompts_per_step, SEED).epoch_order(0)
    trl_file = data_dir / "grpo_demo.prompts.soup_order.jsonl"
    trl_file.write_text("".join(json.dumps({"prompt": prompts[i]}) + "\n" for i in order), encoding="utf-8")
    reward_file = data_dir / "e_fraction.py"
    reward_file.write_text(REWARD_SOURCE, encoding="utf-8")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer(prompts[i])["input_ids"] for i in order]
    lengths = [len(x) for x in ids]
    return {"source": str(PROMPT_SOURCE), "rows": len(prompts), "soup_file": str(soup_file),
            "trl_file": str(trl_file), "reward_file": str(reward_file),
            "prompt_tokens": {"mean": statistics.mean(lengths), "max": max(lengths), "min": min(lengths)},
            "_ordered_prompt_ids": ids}


# --------------------------------------------------------------------------- figures


def figures(step_end_s: list[float], rollout_s: list[float], completion_tokens: list[float],
            trained_tokens: list[float], warmup: int, sampler: LoadSampler) -> dict:
    """Step, rollout and training figures over the steps after `warmup` (lists: one entry per step).

    step_end_s[0] is the end of step 1; step k's time is end_k - end_{k-1}, so warmup >= 1.
    """
    ends = step_end_s[warmup - 1:]
    step_s = [b - a for a, b in zip(ends, ends[1:])]
    roll, gen, trained = rollout_s[warmup:], completion_tokens[warmup:], trained_tokens[warmup:]
    rest = [s - r for s, r in zip(step_s, roll)]
    return {
        "measured_steps": len(step_s),
        "step_s_mean": statistics.mean(step_s),
        "step_s_median": statistics.median(step_s),
        "rollout_s_mean": statistics.mean(roll),
        "rest_of_step_s_mean": statistics.mean(rest),
        "rollout_share_of_step": sum(roll) / sum(step_s),
        "rollout_tokens_per_s": sum(gen) / sum(roll),
        "trained_tokens_per_s": sum(trained) / sum(step_s),
        "train_phase_tokens_per_s": sum(trained) / sum(rest),
        "completion_tokens_per_step_mean": statistics.mean(gen),
        "other_load": sampler.other_load(ends[0], ends[-1]),
        "step_s": step_s,
        "step_rollout_s": roll,
        "step_completion_tokens": gen,
        "step_trained_tokens": trained,
        "step_other_load": [sampler.other_load(a, b) for a, b in zip(ends, ends[1:])],
    }


# --------------------------------------------------------------------------- soup


def soup_command(args: argparse.Namespace, model_dir: Path, data: dict, run_dir: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-m", "soup.train",
        "task=grpo", "model=hf", f"model.path={model_dir}", "model.dtype=float32", "model.attn_implementation=sdpa",
        "data=file", f"data.train_file={data['soup_file']}",
        f"task.reward=[{data['reward_file']}]", f"task.num_generations={args.num_generations}",
        f"task.max_completion_length={args.max_completion_length}", "task.temperature=1.0", "task.top_p=1.0",
        "task.top_k=0", "task.min_p=0.0", "task.repetition_penalty=1.0", "task.loss_type=dapo",
        "task.scale_rewards=group", "task.beta=0.0",
        f"train.micro_batch_size={args.prompts_per_step}", "train.grad_accum_steps=1", f"train.max_steps={steps}",
        "train.precision=fp32", "train.max_grad_norm=1.0", "train.save_every_steps=0", "train.log_every_steps=1",
        "train.progress_bar=false", "train.device=cpu", "checkpointing=none", "peft=none",
        f"optim.lr={LR}", "optim.weight_decay=0.0", "optim.implementation=fused", "sched=constant", f"seed={SEED}",
        f"hydra.run.dir={run_dir}",
    ]


def run_soup(args: argparse.Namespace, model_dir: Path, data: dict, run_dir: Path, steps: int) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # metrics.jsonl is appended to, so start from an empty run dir
    run_dir.mkdir(parents=True)
    command = soup_command(args, model_dir, data, run_dir, steps)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    launched = time.time()
    process, sampler = run_measured(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"soup failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    record = json.loads((run_dir / "run.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    stats = record["stats"]
    prompt_report = stats["data"]["train"]
    # rollout_tokens_per_s is the step's generated tokens over time/rollout_s, so their product is the count.
    return {
        "command": command,
        "steps": stats["steps"],
        **figures([r["time"] for r in rows], [r["time/rollout_s"] for r in rows],
                  [r["rollout_tokens_per_s"] * r["time/rollout_s"] for r in rows], [r["trained_tokens"] for r in rows],
                  args.warmup_steps, sampler),
        # The loop logs the process's peak RSS at every step: the last step's is the peak of training,
        # the figure TRL's side reports (run.json's is taken after the final save and loss plot).
        "peak_rss_mb": rows[-1]["peak_memory_mb"], "peak_rss_mb_after_final_save": stats["peak_memory_mb"], **process,
        "launch_to_first_step_end_s": rows[0]["time"] - launched,
        "scoring_s_mean": statistics.mean(r["time/scoring_s"] for r in rows[args.warmup_steps:]),
        "soup_logged_rollout_tokens_per_s_step_mean": statistics.mean(
            r["rollout_tokens_per_s"] for r in rows[args.warmup_steps:]),
        "truncated_fraction_mean": statistics.mean(first_of(r, "completions/clipped_ratio", "truncated") for r in rows),
        "reward_first_step": rows[0]["reward"], "reward_last_step": rows[-1]["reward"],
        "loss_first_step": rows[0]["loss"], "loss_last_step": rows[-1]["loss"],
        "prompt_tokens": {"mean": prompt_report["mean_prompt_tokens"], "max": prompt_report["max_prompt_tokens"]},
        "torch_threads": record["device"]["torch_threads"],
        "log": str(log_path),
    }


def first_of(row: dict, *keys: str):
    """The first of `keys` that a metrics.jsonl row holds (soup renamed some to TRL's names)."""
    return next(row[k] for k in keys if k in row)


# --------------------------------------------------------------------------- TRL


def trl_settings(args: argparse.Namespace, steps: int) -> dict:
    """GRPOConfig arguments; every default that differs from soup's run is set explicitly."""
    return dict(
        max_steps=steps, per_device_train_batch_size=args.prompts_per_step * args.num_generations,
        gradient_accumulation_steps=1, num_generations=args.num_generations,  # -> steps_per_generation 1
        num_iterations=1, max_completion_length=args.max_completion_length,
        temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, use_vllm=False,
        loss_type="dapo", scale_rewards="group", beta=0.0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=False, fp16=False,  # GRPOConfig defaults to bf16=True
        gradient_checkpointing=False,  # GRPOConfig defaults to True; soup runs checkpointing=none
        use_cpu=True, shuffle_dataset=False, seed=SEED, dataloader_num_workers=0,
        report_to=[], eval_strategy="no", save_strategy="no", logging_steps=1, disable_tqdm=True,
        log_completions=False,
    )


def run_trl(args: argparse.Namespace, model_dir: Path, data: dict, work_dir: Path, steps: int) -> dict:
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    spec = {"model_dir": str(model_dir), "data_file": data["trl_file"], "reward_file": data["reward_file"],
            "output_dir": str(work_dir / "trainer"), "result": str(work_dir / "result.json"),
            "settings": trl_settings(args, steps)}
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-child", str(spec_path)]
    log_path = work_dir.parent / f"{work_dir.name}.log"
    launched = time.time()
    process, sampler = run_measured(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"TRL failed (exit {process['status']}): {' '.join(command)}\n{tail(log_path)}")
    child = json.loads(Path(spec["result"]).read_text())
    check_trl_prompts(child["prompt_ids"], data["_ordered_prompt_ids"], args.prompts_per_step, args.num_generations)
    if len(child["step_end_s"]) != steps or len(child["rollout_s"]) != steps:
        raise RuntimeError(f"TRL ran {len(child['step_end_s'])} steps and {len(child['rollout_s'])} generations, "
                           f"expected {steps} of each (one generation batch per optimizer step)")
    return {
        "command": command, "settings": spec["settings"], "steps": len(child["step_end_s"]),
        **figures(child["step_end_s"], child["rollout_s"], child["completion_tokens"], child["trained_tokens"],
                  args.warmup_steps, sampler),
        "peak_rss_mb": child["peak_rss_mb"], **process,
        "launch_to_first_step_end_s": child["step_end_s"][0] - launched,
        "experience_s_mean": statistics.mean(child["experience_s"][args.warmup_steps:]),
        "trl_logged_step_time_mean": child["trl_step_time_mean"],
        "truncated_fraction_mean": child["truncated_fraction_mean"],
        "reward_first_step": child["rewards"][0] if child["rewards"] else None,
        "reward_last_step": child["rewards"][-1] if child["rewards"] else None,
        "loss_first_step": child["losses"][0] if child["losses"] else None,
        "loss_last_step": child["losses"][-1] if child["losses"] else None,
        "torch_threads": child["torch_threads"], "log": str(log_path),
    }


def check_trl_prompts(seen: list[list[list[int]]], expected: list[list[int]], per_step: int, group: int) -> None:
    """TRL's generation batch k must be soup's step-k prompts, each repeated `group` times in a row."""
    for k, batch in enumerate(seen):
        want = [ids for ids in expected[k * per_step:(k + 1) * per_step] for _ in range(group)]
        if batch != want:
            raise RuntimeError(f"TRL's generation batch {k + 1} differs from soup's step-{k + 1} prompts: "
                               f"got {batch[:2]}..., expected {want[:2]}...")


def trl_child(spec_path: str) -> None:
    """The TRL process: train, timing each step and each generation call, counting tokens."""
    import importlib.util

    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(line) for line in Path(spec["data_file"]).read_text().splitlines()]
    module_spec = importlib.util.spec_from_file_location("bench_reward", spec["reward_file"])
    reward_module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(reward_module)

    def e_fraction(prompts, completions, **columns):
        return reward_module.reward_fn(completions)

    step_end_s, losses, rewards = [], [], []
    rollout_s, completion_tokens, prompt_ids_seen, truncated = [], [], [], []
    experience_s, trained_tokens, trl_step_times = [], [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end_s.append(time.time())  # wall clock, as soup's metrics.jsonl and the load sampler

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                losses.append(logs["loss"])
            if "reward" in logs:
                rewards.append(logs["reward"])
            if "step_time" in logs:
                trl_step_times.append(logs["step_time"])

    config = trl.GRPOConfig(output_dir=spec["output_dir"], **spec["settings"])
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[e_fraction], args=config,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                              callbacks=[StepClock()])
    generate_one_turn = trainer._generate_single_turn
    make_experience = trainer._generate_and_score_completions
    stop_ids = set(trainer.eos_token_ids) | {tokenizer.pad_token_id}

    def timed_generation(prompt_ids, *args, **kwargs):
        started = time.perf_counter()
        completion_ids, logprobs = generate_one_turn(prompt_ids, *args, **kwargs)
        rollout_s.append(time.perf_counter() - started)
        completion_tokens.append(sum(len(ids) for ids in completion_ids))
        truncated.append(statistics.mean(float(not ids or ids[-1] not in stop_ids) for ids in completion_ids))
        prompt_ids_seen.append([list(ids) for ids in prompt_ids])
        return completion_ids, logprobs

    def timed_experience(inputs):
        started = time.perf_counter()
        batch = make_experience(inputs)
        experience_s.append(time.perf_counter() - started)
        trained_tokens.append(int(batch["completion_mask"].sum()))
        return batch

    # Instance attributes shadow the methods: the trainer calls these wrappers, which call its own code.
    trainer._generate_single_turn = timed_generation
    trainer._generate_and_score_completions = timed_experience
    trainer.train()
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(spec["result"]).write_text(json.dumps({
        "step_end_s": step_end_s, "rollout_s": rollout_s, "completion_tokens": completion_tokens,
        "experience_s": experience_s, "trained_tokens": trained_tokens, "prompt_ids": prompt_ids_seen,
        "truncated_fraction_mean": statistics.mean(truncated), "losses": losses, "rewards": rewards,
        "trl_step_time_mean": statistics.mean(trl_step_times) if trl_step_times else None,
        "peak_rss_mb": peak_rss_mb, "torch_threads": torch.get_num_threads(),
    }))


# --------------------------------------------------------------------------- decoders


def decode_child(spec_path: str) -> None:
    """soup's decode loop against model.generate on one generation batch, alternating, timed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soup.rollout.engine import SamplingParams, left_pad, sample
    from soup.tasks.prompts import stop_token_ids

    spec = json.loads(Path(spec_path).read_text())
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    prompts, width = spec["prompt_ids"], spec["max_completion_length"]
    stop_ids = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id
    params = SamplingParams(max_completion_length=width, temperature=1.0)
    input_ids, attention_mask = left_pad(prompts, pad_id, torch.device("cpu"))

    def completions(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(ids, lengths.tolist())]

    def run_soup(seed: int) -> tuple[float, list[list[int]], int]:
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        rollout = sample(model, prompts, params, pad_id=pad_id, stop_ids=stop_ids, generator=generator)
        elapsed = time.perf_counter() - started
        steps = int(rollout.lengths.max())  # it stops when every row has stopped
        return elapsed, completions(rollout.completion_ids, rollout.lengths), steps

    def run_generate(seed: int) -> tuple[float, list[list[int]], int]:
        torch.manual_seed(seed)  # generate draws from the global generator
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                 max_new_tokens=width, temperature=1.0, top_k=0, top_p=1.0,
                                 eos_token_id=sorted(stop_ids), pad_token_id=pad_id, disable_compile=True)
        elapsed = time.perf_counter() - started
        completion = out[:, input_ids.shape[1]:]
        is_stop = torch.isin(completion, torch.tensor(sorted(stop_ids)))
        # Up to and including the first stop token, as soup counts; rows that never stop: all of it.
        lengths = torch.where(is_stop.any(-1), is_stop.int().argmax(-1) + 1, completion.shape[1])
        return elapsed, completions(completion, lengths), completion.shape[1]

    runners = {"soup_sample": run_soup, "transformers_generate": run_generate}
    results = {name: {"time_s": [], "tokens": [], "decode_steps": []} for name in runners}
    drawn: dict[str, list] = {name: [] for name in runners}
    for name, runner in runners.items():
        runner(10_000)  # untimed: allocator and caches warm up
    for repeat in range(spec["repeats"]):
        order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
        for name in order:
            elapsed, tokens, steps = runners[name](repeat)
            results[name]["time_s"].append(elapsed)
            results[name]["tokens"].append(sum(len(c) for c in tokens))
            results[name]["decode_steps"].append(steps)
            drawn[name].append(tokens)
    summary = {
        # Same seed, same distribution, one multinomial draw per row and step: the two decoders
        # should draw the very same tokens, so they did the same work.
        "same_completions": drawn["soup_sample"] == drawn["transformers_generate"],
    }
    for name, r in results.items():
        summary[name] = {"tokens_per_s": sum(r["tokens"]) / sum(r["time_s"]),
                         "tokens_per_s_call_median": statistics.median(n / t for n, t in zip(r["tokens"], r["time_s"])),
                         "call_s_mean": statistics.mean(r["time_s"]),
                         "decode_steps_per_s": sum(r["decode_steps"]) / sum(r["time_s"]), **r}
    summary["soup_over_generate"] = (summary["soup_sample"]["tokens_per_s"]
                                     / summary["transformers_generate"]["tokens_per_s"])
    summary["rows"], summary["max_new_tokens"] = len(prompts), width
    summary["torch_threads"] = torch.get_num_threads()
    Path(spec["result"]).write_text(json.dumps(summary))


def run_decoders(args: argparse.Namespace, model_dir: Path, data: dict, work_dir: Path) -> dict:
    work_dir.mkdir(parents=True, exist_ok=True)
    first_step = data["_ordered_prompt_ids"][:args.prompts_per_step]
    spec = {"model_dir": str(model_dir), "result": str(work_dir / "decode.json"), "repeats": args.decode_repeats,
            "max_completion_length": args.max_completion_length,
            "prompt_ids": [ids for ids in first_step for _ in range(args.num_generations)]}
    spec_path = work_dir / "decode_spec.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, str(Path(__file__).resolve()), "--decode-child", str(spec_path)]
    log_path = work_dir / "decode.log"
    process, sampler = run_measured(command, log_path)
    if process["status"] != 0:
        raise RuntimeError(f"decode benchmark failed (exit {process['status']})\n{tail(log_path)}")
    samples = sampler.samples
    other = sampler.other_load(samples[0][0], samples[-1][0]) if samples else None
    return {**json.loads(Path(spec["result"]).read_text()), "other_load": other, **process, "log": str(log_path)}


def import_rss_mb() -> dict:
    """Peak RSS of a process that only imports each side's trainer: the floor under its peak_rss_mb."""
    imports = {"soup": "import soup.train", "trl": "import datasets, trl; from trl import GRPOTrainer"}
    floor = {}
    for side, code in imports.items():
        out = subprocess.run([sys.executable, "-c", f"{code}\nimport resource\n"
                              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        floor[side] = float(out.stdout.strip().splitlines()[-1])
    return floor


# --------------------------------------------------------------------------- report

SUMMARY_KEYS = ("measured_steps", "step_s_mean", "step_s_median", "rollout_s_mean", "rest_of_step_s_mean",
                "rollout_share_of_step", "rollout_tokens_per_s", "trained_tokens_per_s", "train_phase_tokens_per_s",
                "completion_tokens_per_step_mean", "truncated_fraction_mean", "peak_rss_mb", "process_peak_rss_mb",
                "launch_to_first_step_end_s", "other_load")


def compare(runs: list[dict], floor: dict) -> dict:
    """The fastest kept run of each side (lowest mean step time) and soup's ratios to TRL."""
    best = {}
    for run in runs:
        side = run["side"]
        if not run["discarded"] and (side not in best or run["step_s_mean"] < best[side]["step_s_mean"]):
            best[side] = run
    table = {side: {k: run[k] for k in SUMMARY_KEYS} | {"repeat": run["repeat"], "import_rss_mb": floor[side],
                                                          "peak_rss_over_import_mb": run["peak_rss_mb"] - floor[side]}
             for side, run in best.items()}
    if len(table) == 2:
        soup, trl = table["soup"], table["trl"]
        table["soup_over_trl"] = {
            "step_speed": trl["step_s_mean"] / soup["step_s_mean"],  # > 1: soup's step is faster
            "rollout_tokens_per_s": soup["rollout_tokens_per_s"] / trl["rollout_tokens_per_s"],
            "train_phase_tokens_per_s": soup["train_phase_tokens_per_s"] / trl["train_phase_tokens_per_s"],
            "peak_rss": soup["peak_rss_mb"] / trl["peak_rss_mb"],
        }
    return table


def print_table(table: dict, decode: dict | None) -> None:
    header = (f"{'side':<5} {'step s':>7} {'rollout s':>9} {'rest s':>7} {'rollout tok/s':>13} "
              f"{'train-phase tok/s':>17} {'peak RSS MB':>11} {'imports MB':>10} {'other load':>10}")
    print(header)
    print("-" * len(header))
    for side in SIDES:
        if side in table:
            r = table[side]
            print(f"{side:<5} {r['step_s_mean']:>7.3f} {r['rollout_s_mean']:>9.3f} {r['rest_of_step_s_mean']:>7.3f} "
                  f"{r['rollout_tokens_per_s']:>13.0f} {r['train_phase_tokens_per_s']:>17.0f} "
                  f"{r['peak_rss_mb']:>11.0f} {r['import_rss_mb']:>10.0f} {r['other_load']:>10.0%}")
    if "soup_over_trl" in table:
        ratio = table["soup_over_trl"]
        print(f"soup/TRL: step speed {ratio['step_speed']:.2f}x, rollout tok/s {ratio['rollout_tokens_per_s']:.2f}x, "
              f"train-phase tok/s {ratio['train_phase_tokens_per_s']:.2f}x, peak RSS {ratio['peak_rss']:.2f}x")
    if decode:
        s, g = decode["soup_sample"], decode["transformers_generate"]
        print(f"decoders ({decode['rows']} rows x <= {decode['max_new_tokens']} tokens): soup sample "
              f"{s['tokens_per_s']:.0f} tok/s, model.generate {g['tokens_per_s']:.0f} tok/s "
              f"(soup/generate {decode['soup_over_generate']:.2f}x; same tokens drawn: "
              f"{'yes' if decode['same_completions'] else 'no'})")


def write_report(args: argparse.Namespace, started: float, model: dict, data: dict, floor: dict, runs: list[dict],
                 decode: dict | None) -> dict:
    """Write the JSON (after every run, so a killed benchmark keeps what it measured)."""
    report = {
        "benchmark": "grpo_step_cpu",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [sys.executable, *sys.argv],
        "note": args.note,
        "soup_source": soup_source(),
        "machine": machine_info(),
        "how_run": "each trainer in its own subprocess, one after the other (soup, trl per repeat); the decoder "
                   "comparison in a third subprocess; fastest kept run per side in `table`",
        "settings": {"prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
                     "completions_per_step": args.prompts_per_step * args.num_generations,
                     "max_completion_length": args.max_completion_length, "temperature": 1.0,
                     "loss_type": "dapo", "beta": 0.0, "scale_rewards": "group", "precision": "fp32",
                     "finetune": "full", "lr": LR, "optimizer": "torch.optim.AdamW(fused=True), weight decay 0",
                     "schedule": "constant", "max_grad_norm": 1.0, "seed": SEED,
                     "warmup_steps": args.warmup_steps, "measured_steps": args.measured_steps,
                     "repeats": args.repeats, "decode_repeats": args.decode_repeats,
                     "reward": "fraction of the completion's characters that are 'e' (same file both sides)"},
        "model": model,
        "data": {k: v for k, v in data.items() if not k.startswith("_")},
        "table": compare(runs, floor),
        "decode": decode,
        "runs": runs,
        "total_wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".bench" / "grpo.json")
    parser.add_argument("--scratch", type=Path, default=ROOT / ".bench" / "grpo")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--warmup-steps", type=int, default=3, help="left out of the figures (>= 1)")
    parser.add_argument("--measured-steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; the fastest is reported")
    parser.add_argument("--decode-repeats", type=int, default=6, help="timed calls per decoder")
    parser.add_argument("--no-decode", action="store_true", help="skip the decoder comparison")
    parser.add_argument("--idle-timeout", type=float, default=180.0,
                        help="seconds to wait for a quiet machine before each run")
    parser.add_argument("--max-other-load", type=float, default=0.10,
                        help="a run during which other processes used more than this share of the cores is run "
                             "again (kept in the JSON as discarded)")
    parser.add_argument("--max-tries", type=int, default=3)
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. which snapshot ran)")
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    parser.add_argument("--decode-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_child:
        trl_child(args.trl_child)
        return
    if args.decode_child:
        decode_child(args.decode_child)
        return
    if args.warmup_steps < 1:
        parser.error("--warmup-steps must be >= 1: a step's time starts at the end of the one before")
    if args.num_generations < 2:
        parser.error("--num-generations must be >= 2 (group advantages need two completions)")
    steps = args.warmup_steps + args.measured_steps
    rows = len(PROMPT_SOURCE.read_text(encoding="utf-8").splitlines())
    if steps * args.prompts_per_step > rows:
        parser.error(f"keep (warmup + measured steps) x prompts per step within one epoch of the {rows} prompts: "
                     "the TRL file holds soup's first-epoch order only")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the children inherit it: nothing is downloaded

    started = time.time()
    scratch = args.scratch.resolve()
    model = build_model_dir(scratch / "model")
    data = build_prompt_files(scratch / "model", scratch / "data", args.prompts_per_step)
    print(f"model: {model['parameters'] / 1e6:.2f}M params in {model['dir']}; {data['rows']} prompts of "
          f"{data['prompt_tokens']['mean']:.1f} tokens on average; {args.prompts_per_step} prompts x "
          f"{args.num_generations} completions of <= {args.max_completion_length} tokens per step", flush=True)

    floor = import_rss_mb()
    runs, decode = [], None
    for repeat in range(args.repeats):
        for side in SIDES:
            for attempt in range(1, args.max_tries + 1):
                idle = wait_for_idle(args.idle_timeout)
                name = f"{side}-repeat{repeat + 1}-try{attempt}"
                print(f"[bench] {side} (repeat {repeat + 1}/{args.repeats}, try {attempt}): {steps} steps ...",
                      flush=True)
                if side == "soup":
                    run = run_soup(args, Path(model["dir"]), data, scratch / "runs" / name, steps)
                    if abs(run["prompt_tokens"]["mean"] - data["prompt_tokens"]["mean"]) > 1e-6:
                        raise RuntimeError(f"soup tokenized the prompts differently: mean {run['prompt_tokens']} "
                                           f"tokens, expected {data['prompt_tokens']}")
                else:
                    run = run_trl(args, Path(model["dir"]), data, scratch / "runs" / name, steps)
                loaded = run["other_load"] > args.max_other_load
                run.update(side=side, repeat=repeat, attempt=attempt, discarded=loaded and attempt < args.max_tries,
                           **idle)
                runs.append(run)
                print(f"[bench] {side}: step {run['step_s_mean']:.3f} s (rollout {run['rollout_s_mean']:.3f} s, "
                      f"{run['rollout_tokens_per_s']:.0f} tok/s), peak RSS {run['peak_rss_mb']:.0f} MB, other load "
                      f"{run['other_load']:.0%} ({run['process_wall_s']:.0f} s)"
                      f"{'; discarded, retrying' if run['discarded'] else ''}", flush=True)
                write_report(args, started, model, data, floor, runs, decode)
                if not run["discarded"]:
                    break

    if not args.no_decode:
        wait_for_idle(args.idle_timeout)
        print(f"[bench] decoders: soup sample vs model.generate, {args.decode_repeats} calls each ...", flush=True)
        decode = run_decoders(args, Path(model["dir"]), data, scratch / "decode")

    report = write_report(args, started, model, data, floor, runs, decode)
    print()
    print_table(report["table"], decode)
    print(machine_line(report["machine"]))
    print(f"wrote {args.out} ({report['total_wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
