"""The training loop: accumulation, precision, clipping, eval, checkpoints, metrics.

One optimizer step = `grad_accum_steps` micro-batches. The loss of each micro-batch
is its summed loss divided by the number of loss units (trained tokens for SFT) in
the *whole step*, counted before any forward pass, so the gradient equals that of
one big batch; averaging per-micro-batch means instead would over-weight the tokens
of short micro-batches.

Features that change the model (PEFT, kernels, checkpointing) wrap the model
before it reaches this file; tasks own the loss; this file owns the optimisation.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from soup.checkpoint import (capture_rng, latest_checkpoint, load_checkpoint, restore_rng, save_checkpoint,
                             save_sharded_checkpoint)
from soup.config.resume import SCHEDULE_KEYS
from soup.data.sampler import ResumableBatchSampler
from soup.distributed import (all_gather_objects, any_rank, current_world, no_sync, on_cpu,
                              sum_across_ranks, sum_dict_across_ranks, unwrap)
from soup import zero
from soup.fsdp import is_sharded, load_sharded, save_sharded
from soup.errors import SoupError
from soup.optim import build_optimizer, build_scheduler, effective_optimizer, prepare_for_eval, prepare_for_train
from soup.stability import build_spike_guard
from soup.tasks import Task
from soup.tracking import peak_memory_mb, reset_peak_memory

Batch = dict[str, torch.Tensor]


@dataclass
class LoopResult:
    step: int
    trained_units: int
    train_time_s: float
    units_per_s: float
    last_train_loss: float | None
    last_eval_loss: float | None
    checkpoint: Path | None
    epochs_done: float
    # max_steps | epochs | signal; `signum` is set for a signal.
    stop_reason: str
    signum: int | None = None
    # Every key a resume changed (allow_resume_changes=true), oldest first, with the step it took effect.
    resume_changes: tuple[dict, ...] = ()
    # The model as the loop trained it: a DeepSpeed engine when it made one (final/ gathers from it).
    trained_model: torch.nn.Module | None = None

    @property
    def interrupted(self) -> bool:
        return self.stop_reason == "signal"


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint at the next step boundary and exits.

    Under a scheduler that warns of preemption with SIGUSR2 and handles it itself (submitit
    on SLURM: requeue the job), that signal stops the run the same way, and once the
    checkpoint is saved, the scheduler's own handler runs (hand_over): the requeued job then
    resumes from a checkpoint of the step the warning came at, not from the last periodic one."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @contextlib.contextmanager
    def installed(self):
        def handler(signum, _frame):
            self.signum = signum

        signals = [signal.SIGINT, signal.SIGTERM]
        if callable(signal.getsignal(signal.SIGUSR2)):  # someone (submitit) listens for the preemption warning
            signals.append(signal.SIGUSR2)
        self._previous = {sig: signal.signal(sig, handler) for sig in signals}
        try:
            yield self
        finally:
            for sig, old in self._previous.items():
                signal.signal(sig, old)

    def hand_over(self) -> None:
        """After the checkpoint: let the scheduler's handler of the preemption warning act (requeue)."""
        previous = self._previous.get(self.signum) if self.signum == signal.SIGUSR2 else None
        if callable(previous):
            previous(self.signum, None)


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in ("bf16", "fp16"):
        # "auto" must be resolved first (soup/train.py, soup/precision.py); fp16 must not be its fallback.
        raise ValueError(f"autocast_context: precision {precision!r} is not fp32, bf16 or fp16")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def total_optimizer_steps(train_cfg: DictConfig, batches_per_epoch: int, steps_per_draw: int = 1) -> int:
    """train.max_steps, else the steps of train.epochs (default 1) passes over the data
    (steps_per_draw optimizer steps per drawn batch: grpo's num_iterations)."""
    if train_cfg.max_steps is not None:
        return train_cfg.max_steps
    return math.ceil(epochs_to_run(train_cfg) * batches_per_epoch / train_cfg.grad_accum_steps) * steps_per_draw


def epochs_to_run(train_cfg: DictConfig) -> int:
    return 1 if train_cfg.epochs is None else train_cfg.epochs


def average_metrics(sums: dict[str, float], counts: dict[str, float], units: int) -> dict[str, float]:
    """Each summed metric over its own count when it has one, else over the units."""
    return {key: value / counts[key] if key in counts else value / max(units, 1)
            for key, value in sums.items() if counts.get(key, 1) > 0}


def accumulate(into: dict[str, float], values: dict[str, float]) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0.0) + float(value)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, task: Task, examples: list, collate: Callable, batch_size: int, device, precision: str,
             shard: bool = True) -> dict:
    """Loss per unit over `examples`, in order; the model is returned to train mode. With several
    ranks each evaluates its share (shard) and the sums are added up, or each evaluates all."""
    model.eval()
    world = current_world()
    shard = shard and world.distributed
    if shard:
        examples = examples[world.rank::world.world_size]
    loss_sum, units, metric_sums, metric_counts = 0.0, 0, {}, {}
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size])
        units += task.units(batch)
        with autocast_context(precision, device):
            out = task.forward(model, to_device(batch, device))
        loss_sum += float(out.loss_sum)
        accumulate(metric_sums, out.metric_sums)
        accumulate(metric_counts, out.metric_counts)
    if shard:
        loss_sum, units = sum_across_ranks([loss_sum, units])
        metric_sums, metric_counts = sum_dict_across_ranks(metric_sums), sum_dict_across_ranks(metric_counts)
    model.train()
    metrics = {"loss": loss_sum / max(units, 1)}
    metrics.update(average_metrics(metric_sums, metric_counts, units))
    if task.unit_name == "tokens":
        metrics["ppl"] = math.exp(min(metrics["loss"], 50.0))
    return metrics


def train_loop(
    cfg: DictConfig,
    model: torch.nn.Module,
    task: Task,
    train_examples: list,
    val_examples: list | None,
    collate: Callable[[list], Batch],
    run_dir: Path,
    tracker,
    device: torch.device,
    is_main_process: bool = True,
    sampler=None,
    eval_collate: Callable[[list], Batch] | None = None,
    resume_from: Path | None = None,
    resume_changes: list[dict] = (),
    eval_gate=None,
) -> LoopResult:
    """Optimise `model` on `train_examples`. `sampler` defaults to shuffled micro-batches
    of train.micro_batch_size (multipack passes its own); `eval_collate` defaults to `collate`.

    `resume_from`: a verified checkpoint to continue from (soup/train.py checks its config
    first); `resume_changes`: the keys this resume changes (soup/config/resume.py), recorded
    in later checkpoints. A run that resumes a changed length or lr recomputes each group's
    lr for the new schedule from the checkpoint's step on. `eval_gate`: soup/evals/gate.py's
    EvalGate (train.eval_gate), which may stop the run with a checkpoint."""
    train_cfg = cfg.train
    world = current_world()
    if sampler is None:
        sampler = ResumableBatchSampler(len(train_examples), train_cfg.micro_batch_size, cfg.seed,
                                        rank=world.rank, world_size=world.world_size)
    policy = unwrap(model)  # rollouts, evaluation and checkpoints use the model inside a DDP wrapper
    eval_collate = eval_collate or collate
    total_steps = total_optimizer_steps(train_cfg, sampler.batches_per_epoch, task.steps_per_draw)
    # In epoch mode the last step may hold fewer micro-batches; in max_steps mode the stream just continues.
    total_micro_batches = (None if train_cfg.max_steps is not None
                           else epochs_to_run(train_cfg) * sampler.batches_per_epoch)
    optimizer = build_optimizer(task.optimized_module(policy), cfg.optim, cfg.peft)
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps)
    config_base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    engine = None
    if cfg.parallelism.name in zero.STAGES:  # DeepSpeed partitions the model and wraps the optimizer
        engine, _ = zero.start_engine(model, optimizer, cfg)
        model = engine

    def shard_writer():
        """How each rank writes its part of a checkpoint, for a model sharded across ranks."""
        if engine is not None:
            return lambda directory: zero.save_partitions(engine, directory)
        if is_sharded(policy):
            return lambda directory: save_sharded(directory, policy, optimizer)
        return None

    def shard_loader():
        if engine is not None:
            return lambda directory: zero.load_partitions(engine, directory)
        if is_sharded(policy):
            return lambda directory: load_sharded(directory, policy, optimizer)
        return None

    length = (f"train.max_steps={train_cfg.max_steps}" if train_cfg.max_steps is not None
              else f"{epochs_to_run(train_cfg)} epoch(s) of {sampler.batches_per_epoch} micro-batches")
    print(f"[soup] {total_steps} optimizer steps ({length}, {train_cfg.grad_accum_steps} micro-batch(es) each); "
          f"optimizer {effective_optimizer(optimizer)}")
    scaler = torch.amp.GradScaler(device.type) if train_cfg.precision == "fp16" else None
    checkpoints_dir = run_dir / "checkpoints"

    step, trained_units, consumed_micro, train_time_s = 0, 0, 0, 0.0
    spike_guard = build_spike_guard(train_cfg)
    if spike_guard is not None:
        print(f"[soup] spike recovery: a step above {train_cfg.spike_factor:g} x the median loss of the last "
              f"{train_cfg.spike_window} steps (or not finite) rolls back to the newest checkpoint, lr x "
              f"{train_cfg.spike_lr_factor:g} each time, at most {train_cfg.spike_max_recoveries} times")
    config_record = OmegaConf.to_container(cfg, resolve=True)
    change_history: list[dict] = []
    if resume_from is not None:
        new_base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        state, extra = load_checkpoint(resume_from, policy, optimizer, scheduler, load_shards=shard_loader())
        if world.distributed:
            restore_rng(extra["rank_rng"][world.rank])  # rng.pt holds rank 0's; each rank had its own
        if state["step"] > total_steps:
            raise SoupError(f"resume: {resume_from} is at step {state['step']}, past this run's length of "
                            f"{total_steps} steps.\n  fix: resume with a train.max_steps (or train.epochs) "
                            "that reaches at least the checkpoint's step.")
        sampler.load_state_dict(state["sampler"])
        if spike_guard is not None:
            spike_guard.load_state_dict(state.get("spike_guard", {}))
        if eval_gate is not None:
            eval_gate.load_state_dict(state.get("eval_gate", {}))
        step, trained_units = state["step"], state["trained_units"]
        consumed_micro, train_time_s = state["consumed_micro_batches"], state["train_time_s"]
        if scaler is not None and "grad_scaler" in extra:
            scaler.load_state_dict(extra["grad_scaler"])
        task.load_state_dict(extra.get("task", {}))
        if "rank_task" in extra:
            task.load_rank_state_dict(rank_state_at(extra["rank_task"], world.rank, resume_from))
        tracker.truncate_after(step)
        change_history = [*state.get("resume_changes", []), *({**c, "at_step": step} for c in resume_changes)]
        if any(c["key"] in SCHEDULE_KEYS for c in resume_changes):
            follow_new_schedule(optimizer, scheduler, new_base_lrs)
        print(f"[soup] resumed from {resume_from} at step {step}"
              + "".join(f"; {c['key']} {c['from']} -> {c['to']}" for c in resume_changes))
    elif cfg.resume is not None:
        # resume=auto found no checkpoint: the run starts over, so a killed earlier attempt's lines go.
        tracker.truncate_after(-1)

    def checkpoint_now() -> Path | None:
        rank_rng = all_gather_objects(capture_rng()) if world.distributed else None
        rank_task = all_gather_objects(on_cpu(task.rank_state_dict()))
        if not is_main_process:
            return None
        trainer_state = {
            "step": step, "trained_units": trained_units, "consumed_micro_batches": consumed_micro,
            "train_time_s": train_time_s, "sampler": sampler.state_dict(), "total_steps": total_steps,
            # What wrote this checkpoint: a resume compares its own config with this one.
            "config": config_record, "resume_changes": change_history,
        }
        if spike_guard is not None:
            trainer_state["spike_guard"] = spike_guard.state_dict()
        if eval_gate is not None:
            trainer_state["eval_gate"] = eval_gate.state_dict()
        extra = {"task": task.state_dict()}
        if any(rank_task):
            extra["rank_task"] = rank_task
        if rank_rng is not None:
            extra["rank_rng"] = rank_rng
        if scaler is not None:
            extra["grad_scaler"] = scaler.state_dict()
        writer = shard_writer()
        if writer is not None:  # every rank writes its shards; rank 0 the rest
            return save_sharded_checkpoint(checkpoints_dir, step, writer, scheduler, trainer_state,
                                           train_cfg.keep_last_checkpoints, extra)
        if not world.is_main:
            return None
        return save_checkpoint(checkpoints_dir, step, policy, optimizer, scheduler, trainer_state,
                               train_cfg.keep_last_checkpoints, extra)

    def recover_from_spike(reason: str, spike_loss: float) -> None:
        """Roll back to the newest checkpoint, keeping the data stream where it is (soup/stability.py)."""
        nonlocal step, trained_units, train_time_s
        optimizer.zero_grad(set_to_none=True)
        spike_guard.recoveries += 1
        checkpoint = latest_checkpoint(checkpoints_dir)
        if spike_guard.recoveries > spike_guard.max_recoveries or checkpoint is None:
            why = (f"after {spike_guard.max_recoveries} recoveries" if checkpoint is not None
                   else f"and {checkpoints_dir} holds no checkpoint to roll back to")
            raise SoupError(f"step {step + 1}: {reason}, {why}; the run stops.\n  fix: lower optim.lr or "
                            "train.spike_lr_factor, raise train.max_grad_norm's protection (a smaller norm), or "
                            "check the data around this point; then resume=<checkpoint>.")
        spiked_at = step + 1
        state, extra = load_checkpoint(checkpoint, policy, optimizer, scheduler, load_shards=shard_loader())
        if world.distributed:
            restore_rng(extra["rank_rng"][world.rank])
        task.load_state_dict(extra.get("task", {}))
        skipped = consumed_micro - state["consumed_micro_batches"]
        step, trained_units, train_time_s = state["step"], state["trained_units"], state["train_time_s"]
        if spike_guard.lr_factor != 1.0:  # the config's lrs x factor^recoveries, on the same schedule
            scale = spike_guard.lr_factor ** spike_guard.recoveries
            follow_new_schedule(optimizer, scheduler, [base * scale for base in config_base_lrs])
        tracker.truncate_after(step)
        tracker.log({"spike_loss": spike_loss, "rolled_back_to": step, "skipped_micro_batches": skipped,
                     "recoveries": spike_guard.recoveries, "lr": optimizer.param_groups[0]["lr"]},
                    spiked_at, split="recovery")
        bar.n = step
        bar.refresh()
        print(f"[soup] step {spiked_at}: {reason}. Recovery {spike_guard.recoveries} of "
              f"{spike_guard.max_recoveries}: rolled back to {checkpoint.name}, skipping the {skipped} "
              f"micro-batches drawn since it" + (f", lr now {optimizer.param_groups[0]['lr']:.3g}"
                                                  if spike_guard.lr_factor != 1.0 else ""))

    def result(stop_reason: str, signum: int | None = None) -> LoopResult:
        return LoopResult(step, trained_units, train_time_s, trained_units / max(train_time_s, 1e-9), last_loss,
                          last_eval, last_checkpoint, consumed_micro / sampler.batches_per_epoch, stop_reason,
                          signum, tuple(change_history), model)

    def run_eval() -> float | None:
        if not val_examples:
            return None
        # Schedule-free optimizers evaluate at their averaged weights.
        prepare_for_eval(optimizer)
        metrics = task.evaluate(policy, val_examples, train_cfg.eval_batch_size, device)
        if metrics is None:
            # ZeRO-3 gathers weights in every forward, in lockstep across ranks: each rank evaluates all.
            metrics = evaluate(model, task, val_examples, eval_collate, train_cfg.eval_batch_size, device,
                               train_cfg.precision, shard=cfg.parallelism.name != "deepspeed_zero3")
        prepare_for_train(optimizer)
        tracker.log(metrics, step, split="eval")
        return metrics.get("loss")

    def gate_stops() -> bool:
        """Run the eval gate's suite now; whether it says stop."""
        prepare_for_eval(optimizer)
        check = eval_gate.check(policy, step, tracker)
        prepare_for_train(optimizer)
        policy.train()
        return eval_gate.stops(check)

    model.train()
    prepare_for_train(optimizer)
    reset_peak_memory(device)
    last_loss = last_eval = None
    last_checkpoint, evaluated_at = None, -1
    bar = tqdm(total=total_steps, initial=step, disable=not train_cfg.progress_bar, unit="step", dynamic_ncols=True)
    if train_cfg.eval_at_start and step == 0:
        run_eval()
    if eval_gate is not None:
        print(f"[soup] {eval_gate.describe()}")
        if step == 0 and eval_gate.needs_start:
            gate_stops()  # the baseline
    stop = StopFlag()
    with stop.installed():
        while step < total_steps:
            n_micro = train_cfg.grad_accum_steps
            if total_micro_batches is not None:
                n_micro = min(n_micro, total_micro_batches - consumed_micro)
                if n_micro <= 0:  # the epochs' data ran out first: a spike recovery skipped some
                    break
            step_start = time.perf_counter()
            epoch_before = consumed_micro / sampler.batches_per_epoch
            task.begin_step(step, total_steps, consumed_micro / sampler.batches_per_epoch, policy)
            draws = task.draws_rows(step)
            micro_rows = [[train_examples[i] for i in sampler.next_batch()] for _ in range(n_micro)] if draws else []
            # Offline tasks collate the rows; grpo's experience phase (rollouts, rewards) runs here.
            micro_batches = task.prepare_step(micro_rows, collate, policy, step)
            consumed_micro += len(micro_rows)
            # The step's units over every rank, before any backward: each rank's gradient is scaled
            # so that DDP's average over ranks is the gradient of the whole global batch.
            local_units = sum(task.units(b) for b in micro_batches)
            step_units = sum_across_ranks([local_units])[0]
            if step_units == 0 and not task.allows_empty_steps:
                raise SoupError(f"step {step + 1}: no micro-batch holds a trained token; "
                                "check data.train_on_responses_only and data.max_length.")

            step_loss = torch.zeros((), device=device)
            metric_sums: dict[str, float] = {}
            metric_counts: dict[str, float] = {}
            for index, batch in enumerate(micro_batches if step_units else ()):
                with no_sync(model, skip=index < len(micro_batches) - 1):
                    with autocast_context(train_cfg.precision, device):
                        out = task.forward(model, to_device(batch, device))
                    loss = out.loss_sum * world.world_size / step_units
                    if engine is not None:
                        zero.backward(engine, loss, last=index == len(micro_batches) - 1)
                    else:
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                step_loss += out.loss_sum.detach()
                accumulate(metric_sums, out.metric_sums)
                accumulate(metric_counts, out.metric_counts)
            step_log = task.step_log()
            if world.distributed:
                step_loss, metric_sums, metric_counts, step_log = reduce_step(step_loss, metric_sums, metric_counts,
                                                                              step_log, world.world_size)

            if spike_guard is not None and step_units:
                spike_loss = float(step_loss) / step_units
                reason = spike_guard.spike(spike_loss)
                if reason is not None:  # this step's update is not applied
                    recover_from_spike(reason, spike_loss)
                    continue
                spike_guard.record(spike_loss)
            lr = optimizer.param_groups[0]["lr"]
            if step_units and engine is not None:
                grad_norm = zero.step(engine)  # reduces, clips, steps and zeroes the gradients
            elif step_units:
                grad_norm = clipped_optimizer_step(optimizer, scaler, train_cfg.max_grad_norm)
            else:  # nothing to learn from (grpo: every group skipped); the schedule still moves
                grad_norm = torch.zeros(())
            scheduler.step()
            if engine is None:
                optimizer.zero_grad(set_to_none=True)
            step += 1
            trained_units += step_units
            step_time = time.perf_counter() - step_start
            train_time_s += step_time

            last_loss = float(step_loss) / max(step_units, 1)
            if not math.isfinite(last_loss):
                raise SoupError(
                    f"step {step}: the loss is {last_loss}. The last good checkpoint is in {checkpoints_dir}.\n"
                    "  fix: lower optim.lr, keep train.max_grad_norm > 0, or use train.precision=bf16 "
                    "instead of fp16; then resume=<checkpoint>."
                )
            rate = step_units / step_time
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", **{f"{task.unit_name}/s": f"{rate:.0f}"})
            if step % train_cfg.log_every_steps == 0 or step == total_steps:
                tracker.log({
                    "loss": last_loss, "lr": lr, "grad_norm": float(grad_norm),
                    f"trained_{task.unit_name}": step_units, f"trained_{task.unit_name}_per_s": rate,
                    "time/step_s": step_time,
                    "peak_memory_mb": peak_memory_mb(device),
                    "epoch": consumed_micro / sampler.batches_per_epoch,
                    **average_metrics(metric_sums, metric_counts, step_units), **step_log,
                }, step)

            if train_cfg.eval_every_steps and step % train_cfg.eval_every_steps == 0:
                last_eval, evaluated_at = run_eval(), step
            if eval_gate is not None and eval_gate.due(step, epoch_before, consumed_micro / sampler.batches_per_epoch) \
                    and gate_stops():
                if evaluated_at != step:
                    last_eval = run_eval()
                last_checkpoint = checkpoint_now()
                bar.close()
                print(f"[soup] stopped by the eval gate at step {step}; checkpoint: {last_checkpoint}")
                prepare_for_eval(optimizer)  # final/ holds the weights the gate evaluated (schedule-free: averaged)
                return result("eval_gate")
            if train_cfg.save_every_steps and step % train_cfg.save_every_steps == 0:
                last_checkpoint = checkpoint_now()
            if any_rank(stop.signum is not None):  # every rank stops at the same step
                signum = stop.signum or signal.SIGTERM
                last_checkpoint = checkpoint_now()
                bar.close()
                print(f"[soup] stopped by signal {signum} at step {step}; checkpoint: {last_checkpoint}")
                stop.hand_over()
                return result("signal", signum)
    bar.close()
    if evaluated_at != step:
        last_eval = run_eval()
    prepare_for_eval(optimizer)  # the final save holds the weights to evaluate
    return result("max_steps" if train_cfg.max_steps is not None else "epochs")


def reduce_step(step_loss: torch.Tensor, metric_sums: dict, metric_counts: dict, step_log: dict,
                world_size: int) -> tuple:
    """A step's sums over every rank (one collective): the loss and metric sums and counts
    add up; the task's own per-step figures (grpo's rewards) are averaged."""
    keys = {"loss": float(step_loss), **{f"sum/{k}": v for k, v in metric_sums.items()},
            **{f"count/{k}": v for k, v in metric_counts.items()}, **{f"log/{k}": v for k, v in step_log.items()}}
    total = sum_dict_across_ranks(keys)

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in total.items() if k.startswith(prefix)}

    return (torch.tensor(total["loss"]), part("sum/"), part("count/"),
            {k: v / world_size for k, v in part("log/").items()})


def clipped_optimizer_step(optimizer: torch.optim.Optimizer, scaler, max_grad_norm: float) -> torch.Tensor:
    """Clip the gradients (fp16: unscaled first), step the optimizer; return the norm before clipping."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    clip = max_grad_norm if max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients (fsdp2): the norm of the whole
        grad_norm = grad_norm.full_tensor()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


def rank_state_at(states: list[dict], rank: int, checkpoint: Path) -> dict:
    if rank >= len(states):
        raise SoupError(f"resume: {checkpoint} holds the task state of {len(states)} rank(s), not of rank {rank}.\n"
                        f"  fix: resume with {len(states)} process(es) (torchrun --nproc_per_node {len(states)}).")
    return states[rank]


def follow_new_schedule(optimizer: torch.optim.Optimizer, scheduler, base_lrs: list[float]) -> None:
    """After a resume that changed the run's length or optim.lr: continue the new schedule.

    The checkpoint restored the old base lrs and the lr its last step computed with the
    old total. `base_lrs` are this run's (from optim.lr and lr_groups); the scheduler's
    multiplier already uses the new total, so each group's next lr is base x multiplier at
    the checkpoint's step, exactly what a fresh run with these settings uses there."""
    scheduler.base_lrs = list(base_lrs)
    for group, base, multiplier in zip(optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * multiplier(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
