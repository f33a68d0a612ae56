"""Entry point: compose -> validate -> build -> loop -> save.

    python -m soup.train                                  # the default tiny SFT job, offline
    python -m soup.train task=pretrain optim.lr=1e-3
    python -m soup.train --multirun optim.lr=1e-4,3e-4    # one run directory per job

Returns the final validation loss (or the last training loss) so Hydra sweepers
can optimise it. Exit status: 0 when the run finished (or had already finished);
2 for a user mistake (config, data, files; in a multirun it fails only that job),
including the ones Hydra finds while composing the config; 128 + N when signal N
(SIGINT, SIGTERM) stopped the run after saving a checkpoint, so a scheduler can
tell an interrupted run from a finished one.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from soup.checkpoint import atomic_directory, resolve_resume
from soup.config import register_configs, resolve_device, validate
from soup.config.resume import check_resume_config, config_changes
from soup.console import copied_to, hydra_cli, silenced
from soup.distributed import (barrier, broadcast_from_main, check_launch, current_world, end_process_group,
                              ranks_from_submitit_tasks, start_process_group, unwrap)
from soup.errors import ConfigError, SoupError
from soup.fsdp import full_state_dict, is_sharded, shard_model
from soup.zero import full_state_dict as zero_full_state_dict, is_engine
from soup.loop import autocast_context, train_loop
from soup.memory.setup import apply_memory_features
from soup.models.adapters import save_final_adapter, save_initial_adapter
from soup.models.files import model_source
from soup.models.neftune import add_neftune
from soup.models.quant import BNB_QUANTS, load_quantized, prepare_for_adapters, quantize_built_model
from soup.models.load import apply_peft, build_model, build_tokenizer, count_parameters, head_spec, load_kwargs
from soup.precision import describe_precision, resolve_precision
from soup.run_dir import finished_record, objective_of, prepare_fresh_run_dir
from soup.tasks import build_task
from soup.tracking import NullTracker, open_tracker, peak_memory_mb, plot_loss_curves, write_run_record

register_configs()
# conf/ sits beside the package in the source tree (soup is installed editable).
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


class RunInterrupted(Exception):
    """A signal stopped the run after it saved a checkpoint; the exit status is 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def stop_on_end_of_turn(model, tokenizer) -> None:
    """Generation should stop at the template's end-of-turn token as well as at EOS."""
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    generation_config = getattr(model, "generation_config", None)
    if end_of_turn is None or generation_config is None:
        return
    eos = generation_config.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if end_of_turn not in eos:
        generation_config.eos_token_id = eos + [end_of_turn]


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> float | None:
    """Train according to `cfg`, writing everything under `run_dir`; return the objective.

    `overrides`: the command-line overrides, which validation needs to tell a field the
    user set from a default (soup/config/scope.py)."""
    started = time.time()
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts and cfg.resume is None:
        # SLURM requeued this job (preempted, or its time ran out): it continues, not starts over.
        cfg.resume = "auto"
        print(f"[soup] SLURM requeued this job (restart {restarts}): resume=auto")
    validate(cfg, overrides)
    world = current_world()
    check_launch(cfg.parallelism.name, world)
    refused = None
    if cfg.resume is None and world.is_main:
        try:
            removed = prepare_fresh_run_dir(run_dir, cfg.overwrite)
        except SoupError as exc:
            refused = exc
        else:
            if removed:
                print(f"[soup] overwrite=true: deleted {', '.join(removed)} from {run_dir}")
    # No rank reads the run dir before rank 0 has cleared it, and when rank 0 may not, every
    # rank stops with its error (not with a broken connection to it).
    refused = broadcast_from_main(refused)
    if refused is not None:
        if world.is_main:
            raise refused
        sys.exit(USER_ERROR)  # rank 0 reports it
    seed_everything(cfg.seed)
    device = resolve_device(cfg.train.device, world.local_rank)
    # Resolved once, before anything reads it: every later reader sees fp32, bf16 or fp16, never auto.
    requested_precision = cfg.train.precision
    cfg.train.precision = resolve_precision(requested_precision, device)
    print(f"[soup] precision: {describe_precision(requested_precision, cfg.train.precision, device)}")
    finished = finished_record(run_dir) if cfg.resume == "auto" else None
    if finished is not None and not config_changes(finished["config"], OmegaConf.to_container(cfg, resolve=True)):
        print(f"[soup] {run_dir} holds a finished run ({finished['stats'].get('steps')} steps, final/ saved); "
              "resume=auto has nothing to do.\n  to train it further: the same command with a longer "
              "train.max_steps and allow_resume_changes=true continues from its newest checkpoint")
        return objective_of(finished)
    resume_from = resolve_resume(cfg.resume, run_dir / "checkpoints")
    if finished is not None and resume_from is None:
        raise ConfigError(f"{run_dir} holds a finished run without a checkpoint to continue from, and this config "
                          "differs from the run's own (run.json).\n  fix: start a new run (another hydra.run.dir, "
                          "or overwrite=true without resume), or resume with the run's own config (a no-op).")
    resume_changes = []
    if resume_from is not None:
        # Before any model loads: a resume that cannot honour this config stops here.
        resume_changes = resume_config_changes(cfg, resume_from)

    tokenizer = build_tokenizer(cfg.model)
    task = build_task(cfg, tokenizer)
    data = task.build_data(cfg, tokenizer)
    for line in data.lines:
        print(f"[soup] {line}")
    if data.chat_template is not None:
        # The saved tokenizer carries the template the data was rendered with.
        tokenizer.chat_template = data.chat_template

    if cfg.quant.name in BNB_QUANTS:
        # Quantised weights are placed on the device as they load; adapters train on top.
        if cfg.model.name == "hf":
            head_class, head_config = head_spec(task.model_head)
            model = load_quantized(model_source(cfg.model.path, needs_tokenizer=False), cfg.quant, device,
                                   model_class=head_class, **head_config, **load_kwargs(cfg.model))
        else:
            model = quantize_built_model(build_model(cfg.model, tokenizer, cfg.seed, task.model_head), cfg.quant,
                                         device, **load_kwargs(cfg.model))
        model = apply_peft(prepare_for_adapters(model), cfg.peft, cfg.seed)
        print(f"[soup] quant: {cfg.quant.name} bitsandbytes weights"
              + (f" ({cfg.quant.quant_type}, double quant {cfg.quant.double_quant}, compute "
                 f"{cfg.quant.compute_dtype})" if cfg.quant.name == "4bit" else ""))
    else:
        model = build_model(cfg.model, tokenizer, cfg.seed, task.model_head)
        model = apply_peft(model, cfg.peft, cfg.seed).to(device)
    if cfg.peft.name != "none" and world.is_main:
        save_initial_adapter(model, cfg.peft.name, run_dir / "initial_adapter")
    if cfg.train.neftune_alpha is not None:
        add_neftune(model, cfg.train.neftune_alpha)
        print(f"[soup] neftune: alpha={cfg.train.neftune_alpha} on the input embeddings (training only)")
    trainable, total = count_parameters(model)
    print(f"[soup] model: {cfg.model.name} {total / 1e6:.2f}M params, {trainable / 1e6:.2f}M trainable | "
          f"device={device} precision={cfg.train.precision} peft={cfg.peft.name} quant={cfg.quant.name} "
          f"kernels={cfg.kernels.name} checkpointing={cfg.checkpointing.name} offload={cfg.offload.name} "
          f"parallelism={cfg.parallelism.name}")
    # Before the memory features: a frozen reference copy needs no checkpointing or compilation.
    for line in task.setup(model, cfg, data, device, lambda: autocast_context(cfg.train.precision, device)):
        print(f"[soup] {line}")
    sample_batch = data.collate(data.train[: cfg.train.micro_batch_size])
    if not isinstance(sample_batch, dict):  # grpo's rows are prompts; kernels=auto then times a synthetic batch
        sample_batch = None
    model, features = apply_memory_features(model, cfg, run_dir, device, sample_batch)
    for line in features.lines:
        print(f"[soup] {line}")
    if cfg.parallelism.name == "fsdp2":
        model = shard_model(model, cfg.train.precision, cfg.parallelism.reshard_after_forward,
                            cfg.parallelism.cpu_offload)
    elif cfg.parallelism.name == "ddp":  # deepspeed's engine is made with the optimizer, in the loop
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if world.distributed:
        print(f"[soup] parallelism: {cfg.parallelism.name}, {world.world_size} ranks "
              f"({torch.distributed.get_backend()}); each step {world.world_size} x {cfg.train.grad_accum_steps} "
              f"micro-batches of {cfg.train.micro_batch_size}")

    if cfg.train.auto_micro_batch_size:
        from soup.stability import auto_micro_batch

        print(f"[soup] {auto_micro_batch(cfg, model, task, data, device)}")
    if cfg.train.lr_finder:  # the lr range test instead of a run: lr_finder.json and .png, nothing else
        from soup.lr_finder import run_lr_finder

        run_lr_finder(cfg, model, task, data.train, data.collate, run_dir, device, sampler=data.sampler)
        features.close()
        return None
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    tracker = (open_tracker(cfg.tracker, run_dir, config_dict, resume=cfg.resume is not None) if world.is_main
               else NullTracker())
    print(f"[soup] {tracker.describe()}")
    eval_gate = None
    if cfg.train.eval_gate is not None:
        from soup.evals.gate import EvalGate

        eval_gate = EvalGate(cfg, tokenizer, device)
    try:
        result = train_loop(cfg, model, task, data.train, data.val, data.collate, run_dir, tracker, device,
                            sampler=data.sampler, eval_collate=data.eval_collate, resume_from=resume_from,
                            resume_changes=resume_changes, eval_gate=eval_gate)
    finally:
        tracker.close()
        features.close()
    for line in features.summaries():
        print(f"[soup] {line}")

    trained = result.trained_model
    model = unwrap(model)
    if is_sharded(model) or is_engine(trained):  # final/ is one plain model: the full weights, gathered on rank 0
        full = zero_full_state_dict(trained) if is_engine(trained) else full_state_dict(model)
        model = plain_model(cfg, tokenizer, full, task.model_head) if world.is_main else None
    if is_engine(trained):
        trained.destroy()
    if not world.is_main:
        barrier()  # until rank 0 has saved final/ and run.json
        if result.interrupted:
            raise RunInterrupted(result.signum)
        return result.last_eval_loss if result.last_eval_loss is not None else result.last_train_loss
    if not result.interrupted:
        stop_on_end_of_turn(model, tokenizer)
        final_lines = []
        # Written beside final/ and renamed when complete: a run killed mid-save leaves no half final/.
        with atomic_directory(run_dir / "final") as final_dir:
            if cfg.quant.name == "int8_qat":  # final/ holds the converted quantised model QAT trained for
                from soup.memory.fp8 import save_qat_final

                print(f"[soup] {save_qat_final(model, final_dir)}")
            elif cfg.peft.name == "none":
                model.save_pretrained(final_dir)
                final_lines = task.finish_final(final_dir, model, full_model=True)
            else:
                save_final_adapter(model, cfg.peft.name, final_dir, run_dir / "initial_adapter",
                                   lambda: build_model(cfg.model, tokenizer, cfg.seed, task.model_head))
                final_lines = task.finish_final(final_dir, model, full_model=False)
            tokenizer.save_pretrained(final_dir)
        print(f"[soup] saved final model to {run_dir / 'final'}")
        for line in final_lines:
            print(f"[soup] {line}")
    stats = {
        "status": "interrupted" if result.interrupted else "finished",
        "steps": result.step,
        "epochs_done": round(result.epochs_done, 4),
        "stop_reason": f"signal {result.signum}" if result.interrupted else result.stop_reason,
        "resume_changes": list(result.resume_changes),
        f"trained_{task.unit_name}": result.trained_units,
        f"trained_{task.unit_name}_per_s": result.units_per_s,
        "train_time_s": result.train_time_s,
        "wall_time_s": time.time() - started,
        "peak_memory_mb": peak_memory_mb(device),
        "final_train_loss": result.last_train_loss,
        "final_eval_loss": result.last_eval_loss,
        "parameters": total,
        "precision": {"requested": requested_precision, "resolved": cfg.train.precision},
        "trainable_parameters": trainable,
        "data": {"train": asdict(data.report), "val": asdict(data.val_report) if data.val_report else None},
    }
    if eval_gate is not None:
        stats["eval_gate"] = eval_gate.summary()
    write_run_record(run_dir, config_dict, stats, data.files)
    plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss.png",
                     title=f"{cfg.task.name} | {model_label(cfg)} | {run_dir.name}")
    print(f"[soup] run dir: {run_dir}")
    barrier()
    if result.interrupted:
        print("  resume with: python -m soup.train " + " ".join(shlex.quote(o) for o in resume_overrides(overrides, run_dir)))
        raise RunInterrupted(result.signum)
    return result.last_eval_loss if result.last_eval_loss is not None else result.last_train_loss


def plain_model(cfg: DictConfig, tokenizer, state: dict, head: str) -> torch.nn.Module:
    """A one-process copy of the trained model (its adapters included) holding `state`."""
    model = apply_peft(build_model(cfg.model, tokenizer, cfg.seed, head), cfg.peft, cfg.seed)
    if cfg.quant.name in ("4bit", "8bit"):
        # The base's packed 4-bit codes do not fit the plain base, and final/ holds the adapter
        # alone: load the trained tensors only, onto the base the run quantised.
        trained = {name for name, param in model.named_parameters() if param.requires_grad}
        missing = sorted(trained - state.keys())
        if missing:
            raise RuntimeError(f"the gathered state lacks trained tensors: {missing[:3]}")
        model.load_state_dict({name: state[name] for name in trained}, strict=False)
        return model
    model.load_state_dict(state, strict=True)
    return model


def model_label(cfg: DictConfig) -> str:
    if cfg.model.name == "hf":
        return Path(cfg.model.path).name
    return f"tiny llama (hidden {cfg.model.tiny.hidden_size}, {cfg.model.tiny.num_hidden_layers} layers)"


def resume_overrides(overrides, run_dir: Path) -> list[str]:
    """This run's command line with resume=auto and its run dir, for the "resume with" hint."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(("resume=", "hydra.run.dir=", "overwrite="))]
    return [*kept, "resume=auto", f"hydra.run.dir={run_dir}"]


def resume_config_changes(cfg: DictConfig, checkpoint: Path) -> list[dict]:
    """The config keys this resume changes (soup/config/resume.py); raises for a change it may not make."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    saved = state.get("config")
    if saved is None:
        print(f"[soup] warning: {checkpoint} predates config records; resuming without comparing configs")
        return []
    current = OmegaConf.to_container(cfg, resolve=True)
    return [c.record() for c in check_resume_config(saved, current, cfg.allow_resume_changes, checkpoint)]


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # A sweep's job calls main directly (not cli): the tasks of a multi-task SLURM job join here.
    ranks_of_this_job = ranks_from_submitit_tasks()
    if ranks_of_this_job:
        start_process_group()
    try:
        return train_in_run_dir(cfg, hydra_cfg, run_dir)
    finally:
        if ranks_of_this_job:
            end_process_group()


def train_in_run_dir(cfg: DictConfig, hydra_cfg, run_dir: Path) -> float | None:
    # Rank 0 speaks for the run; the other ranks' output would repeat it (their errors still show).
    console_of_rank = (copied_to(run_dir / f"{hydra_cfg.job.name}.log") if current_world().is_main
                       else silenced())
    with console_of_rank as console:
        try:
            return run(cfg, run_dir, list(hydra_cfg.overrides.task))
        except SoupError as exc:
            console.report_error(f"[soup] error: {exc}")
            if hydra_cfg.mode == RunMode.MULTIRUN:
                # One bad job must not end the sweep; the sweeper sees no objective for it.
                return None
            sys.exit(USER_ERROR)
        except RunInterrupted as stop:
            sys.exit(128 + stop.signum)


USER_ERROR = 2


def cli() -> None:
    """`python -m soup.train`: Hydra's own user errors (an unknown group option, a bad override)
    exit with soup's user-error status too, not Hydra's 1, which a crash in soup also gives."""
    world = start_process_group()
    if world.distributed:
        agree_on_run_dir()
    try:
        hydra_cli(main, USER_ERROR)
    finally:
        end_process_group()


def agree_on_run_dir() -> None:
    """Under torchrun every rank composes the config itself, and `${now:...}` in the default
    run dir could fall on different seconds: all ranks take rank 0's run dir."""
    argv = sys.argv[1:]
    if any(a in ("-m", "--multirun") for a in argv) or any(a.startswith("hydra.run.dir=") for a in argv):
        return
    chosen = broadcast_from_main(time.strftime("outputs/%Y-%m-%d/%H-%M-%S"))
    sys.argv.append(f"hydra.run.dir={chosen}")


if __name__ == "__main__":
    cli()
