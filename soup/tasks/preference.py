"""Preference optimisation: a batch of pairs (or labelled rows) -> log-probs -> a registered loss.

One forward pass scores chosen and rejected together (they are stacked in the
batch); the LM head runs only on completion positions (soup/tasks/logps.py). The
loss functions themselves are pure and live in soup/losses/; this file picks them
from the config, feeds them log-probs and the reference's, and reports the metrics
researchers know (rewards/chosen, rewards/accuracies, logps/chosen, kl, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from soup.data.collate import add_ref_logps, collate_pairs, collate_unpaired
from soup.data.packing import MASK_ATTN_IMPLEMENTATIONS
from soup.data.preference import build_preference_datasets
from soup.data.shared_prompt import collate_shared_prompt, units_in
from soup.distributed import all_gather_objects, current_world
from soup.losses.preference import PairedLogps, chosen_nll
from soup.losses.registry import LossSpec, get_loss
from soup.losses.unpaired import RunningMean, UnpairedLogps
from soup.models.reference import (
    DisabledAdapterReference,
    FrozenCopyReference,
    attach_reference_logps,
    weights_fingerprint,
)
from soup.tasks.base import Task, TaskData, TaskOutput
from soup.tasks.logps import sequence_logps

# Which registered loss each task trains; task=dpo reads task.loss_type, task=preference
# task.preference_loss (or the keys of task.preference_loss_weights).
TASK_LOSS = {"ipo": "ipo", "simpo": "simpo", "cpo": "cpo", "orpo": "orpo", "kto": "kto", "bco": "bco"}
# Friendly names for a mix: {dpo: 0.7, bco: 0.3} on paired data.
LOSS_ALIASES = {"dpo": "sigmoid", "bco": "bco_pair"}
UNPAIRED_TASKS = ("kto", "bco")
# Config fields a loss can read, by the keyword the loss function takes.
LOSS_PARAM_FIELDS = ("beta", "label_smoothing", "discopop_tau", "simpo_gamma", "cpo_alpha", "orpo_lambda",
                     "desirable_weight", "undesirable_weight")


def selected_losses(task_cfg) -> list[tuple[LossSpec, float]]:
    """The (loss, weight) pairs a preference task config trains on."""
    if task_cfg.name == "dpo":
        return [(get_loss(task_cfg.loss_type), 1.0)]
    if task_cfg.name in TASK_LOSS:
        return [(get_loss(TASK_LOSS[task_cfg.name]), 1.0)]
    if task_cfg.preference_loss_weights:
        return [(get_loss(LOSS_ALIASES.get(name, name)), float(weight))
                for name, weight in task_cfg.preference_loss_weights.items()]
    return [(get_loss(LOSS_ALIASES.get(task_cfg.preference_loss, task_cfg.preference_loss)), 1.0)]


def beta_at(task_cfg, progress: float) -> float:
    """beta after `progress` (0 -> 1) of the run under task.beta_schedule."""
    start, end = task_cfg.beta, task_cfg.beta_end
    if task_cfg.beta_schedule == "constant" or end is None:
        return start
    if task_cfg.beta_schedule == "linear":
        return start + (end - start) * progress
    if task_cfg.beta_schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if task_cfg.beta_schedule == "exponential":
        return start * (end / start) ** progress
    raise ValueError(f"unknown beta schedule {task_cfg.beta_schedule!r}")  # validate() rejects it earlier


def resolve_sequence_layout(task_cfg, attn_implementation: str, kernels_name: str) -> str:
    """shared_prompt | stacked, resolving `auto`: shared_prompt wherever the attention
    implementation takes the 4-D mask it needs (sdpa, eager), since it computes the same
    log-probs with less work."""
    if task_cfg.sequence_layout != "auto":
        return task_cfg.sequence_layout
    takes_mask = attn_implementation in MASK_ATTN_IMPLEMENTATIONS and kernels_name != "flash_attn"
    return "shared_prompt" if takes_mask else "stacked"


def preference_collate(unpaired: bool, layout: str, attn_implementation: str):
    """collate(examples, pad_token_id) -> batch for this task's rows in `layout`."""
    if layout == "stacked":
        return collate_unpaired if unpaired else collate_pairs
    keys = ("completion_ids", "kl_completion_ids") if unpaired else ("chosen_ids", "rejected_ids")

    def collate(examples, pad_token_id):
        batch = collate_shared_prompt(examples, pad_token_id, keys, attn_implementation)
        if unpaired:
            batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
        ref_keys = ("ref_logp", "ref_kl_logp") if unpaired else ("ref_chosen", "ref_rejected")
        return add_ref_logps(batch, examples, ref_keys)

    return collate


def reference_strategy(task_cfg, peft_name: str, needs_reference: bool) -> str:
    """copy | adapter | precomputed | none, resolving `auto`."""
    if not needs_reference:
        return "none"
    if task_cfg.reference != "auto":
        return task_cfg.reference
    return "adapter" if peft_name != "none" else "copy"


class PreferenceTask(Task):
    def __init__(self, task_cfg):
        super().__init__(task_cfg)
        self.losses = selected_losses(task_cfg)
        self.unpaired = task_cfg.name in UNPAIRED_TASKS
        self.unit_name = "rows" if self.unpaired else "pairs"
        self.needs_reference = any(spec.needs_reference for spec, _ in self.losses)
        self.uses_delta = any("delta" in spec.params for spec, _ in self.losses)
        self.reward_mean = RunningMean()
        self.beta = task_cfg.beta
        self.reference = None
        self.strategy = "none"
        self.refreshed_at_epoch = 0

    # ------------------------------------------------------------------ setup

    def build_data(self, cfg, tokenizer) -> TaskData:
        splits = build_preference_datasets(cfg.data, tokenizer, "unpaired" if self.unpaired else "paired", cfg.seed)
        layout = resolve_sequence_layout(cfg.task, cfg.model.attn_implementation, cfg.kernels.name)
        collate_rows = preference_collate(self.unpaired, layout, cfg.model.attn_implementation)

        def collate(examples):
            return collate_rows(examples, tokenizer.pad_token_id)

        lines = [f"sequence layout: {layout}" + (" (each prompt forwarded once; units packed into rows)"
                                                 if layout == "shared_prompt" else ""), splits.report.summary()]
        if splits.val_report is not None:
            lines.append(splits.val_report.summary())
        return TaskData(train=splits.train, val=splits.val, collate=collate, files=splits.files,
                        report=splits.report, val_report=splits.val_report, chat_template=splits.chat_template,
                        lines=lines)

    def setup(self, model: torch.nn.Module, cfg, data: TaskData, device: torch.device, autocast) -> list[str]:
        return [self.build_reference(model, cfg.peft.name, data, data.collate, cfg.train.eval_batch_size, device,
                                     cfg.train.precision, autocast)]

    def build_reference(self, model: torch.nn.Module, peft_name: str, splits, collate, batch_size: int,
                        device: torch.device, precision: str, autocast) -> str:
        """Build the reference (and precompute its log-probs when asked). Returns a log line."""
        self.strategy = reference_strategy(self.cfg, peft_name, self.needs_reference)
        if self.strategy == "none":
            return "reference: none (reference-free loss)"
        build_with = self.cfg.precompute_with
        if self.strategy != "precomputed":
            build_with = self.strategy
        elif build_with == "auto":
            build_with = "adapter" if peft_name != "none" else "copy"
        reference = DisabledAdapterReference(model) if build_with == "adapter" else FrozenCopyReference(model)
        if self.strategy != "precomputed":
            self.reference = reference
            return f"reference: {self.strategy}"
        # Precision is in the key: a bf16-autocast pass must not serve an fp32 run.
        model_key = weights_fingerprint(reference.model if build_with == "copy" else model) + f"|{precision}"
        keys = (("ref_logp", "ref_kl_logp"), ("prompt_ids", "completion_ids", "kl_completion_ids")) if self.unpaired \
            else (("ref_chosen", "ref_rejected"), ("prompt_ids", "chosen_ids", "rejected_ids"))
        cached = []
        for examples in (splits.train, splits.val):
            if examples:
                with autocast():
                    cached.append(attach_reference_logps(examples, reference, collate, batch_size, device,
                                                         keys[0], keys[1], Path(self.cfg.ref_cache_dir), model_key))
        del reference  # a frozen copy is not needed once its numbers are on disk
        source = "cache" if all(cached) else "one pass before training"
        return f"reference: precomputed ({build_with}; {source}; cache dir {self.cfg.ref_cache_dir})"

    # ------------------------------------------------------------------ hooks

    def begin_step(self, step: int, total_steps: int, epoch: float, model: torch.nn.Module) -> None:
        self.beta = beta_at(self.cfg, step / max(1, total_steps))
        every = self.cfg.ref_refresh_epochs
        if every and isinstance(self.reference, FrozenCopyReference) and int(epoch) >= self.refreshed_at_epoch + every:
            self.reference.refresh_from(model)
            self.refreshed_at_epoch = int(epoch) // every * every

    def state_dict(self) -> dict:
        state = {"reward_mean": self.reward_mean.state_dict(), "refreshed_at_epoch": self.refreshed_at_epoch}
        if self.refreshed_at_epoch and isinstance(self.reference, FrozenCopyReference):
            state["reference"] = {k: v.cpu() for k, v in self.reference.model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.reward_mean.load_state_dict(state["reward_mean"])
        self.refreshed_at_epoch = state["refreshed_at_epoch"]
        if "reference" in state and isinstance(self.reference, FrozenCopyReference):
            self.reference.model.load_state_dict(state["reference"])

    # ------------------------------------------------------------------ forward

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return units_in(batch)

    def _reference_logps(self, batch) -> torch.Tensor | None:
        if not self.needs_reference:
            return None
        if "ref_logps" in batch:
            return batch["ref_logps"]
        return self.reference.logps(batch)

    def _params(self, spec: LossSpec) -> dict:
        params = {name: getattr(self.cfg, name) for name in spec.params if name in LOSS_PARAM_FIELDS}
        if "beta" in spec.params:
            params["beta"] = self.beta
        if "delta" in spec.params:
            params["delta"] = self.reward_mean.value
        return params

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        logps, tokens = sequence_logps(model, batch)
        ref = self._reference_logps(batch)
        n = self.units(batch)
        tokens = tokens.to(logps.dtype)
        if self.unpaired:
            kl_logps, kl_ref_logps = logps[n:].detach(), ref[n:]
            if model.training:  # KTO's z0 averages the mismatched pairs of every rank, as the paper's devices
                kl_logps, kl_ref_logps = gather_rows(kl_logps), gather_rows(kl_ref_logps)
            inputs = UnpairedLogps(logps=logps[:n], tokens=tokens[:n], desirable=batch["desirable"].to(logps.device),
                                   ref_logps=ref[:n], kl_logps=kl_logps, kl_ref_logps=kl_ref_logps)
        else:
            inputs = PairedLogps(chosen=logps[:n], rejected=logps[n:], chosen_tokens=tokens[:n],
                                 rejected_tokens=tokens[n:],
                                 ref_chosen=None if ref is None else ref[:n],
                                 ref_rejected=None if ref is None else ref[n:])
        if self.uses_delta and model.training:
            self._update_reward_mean(inputs)

        total, main, main_weight = 0.0, None, -1.0
        for spec, weight in self.losses:
            out = spec(inputs, **self._params(spec))
            total = total + weight * out.losses
            if weight > main_weight:
                main, main_weight = out, weight
        if self.cfg.rpo_alpha is not None:
            total = total + self.cfg.rpo_alpha * chosen_nll(inputs)
        sums, counts = self._metrics(inputs, main)
        return TaskOutput(loss_sum=total.sum(), metric_sums=sums, metric_counts=counts)

    def _update_reward_mean(self, inputs) -> None:
        # BCO's delta: the running mean of all rewards seen so far, updated before use
        # so the first batch is centred on its own rewards.
        with torch.no_grad():
            if self.unpaired:
                rewards = self.beta * (inputs.logps - inputs.ref_logps)
            else:
                rewards = self.beta * torch.cat([inputs.chosen - inputs.ref_chosen, inputs.rejected - inputs.ref_rejected])
            self.reward_mean.update(gather_rows(rewards))  # every rank's rewards: one δ on all ranks

    def _metrics(self, inputs, out) -> tuple[dict[str, float], dict[str, float]]:
        """(sums, counts) over this micro-batch; the loop divides sums by the step's units
        or, where given, by the summed count."""
        if self.unpaired:
            desirable = inputs.desirable
            rewards = out.rewards.detach()
            sums = {
                "rewards/chosen": float(rewards[desirable].sum()),
                "rewards/rejected": float(rewards[~desirable].sum()),
                "logps/chosen": float(inputs.logps.detach()[desirable].sum()),
                "logps/rejected": float(inputs.logps.detach()[~desirable].sum()),
                "kl": float(out.metrics["kl"]) * desirable.numel() if "kl" in out.metrics else 0.0,
            }
            n_chosen, n_rejected = float(desirable.sum()), float((~desirable).sum())
            counts = {"rewards/chosen": n_chosen, "logps/chosen": n_chosen,
                      "rewards/rejected": n_rejected, "logps/rejected": n_rejected}
            if "kl" not in out.metrics:
                del sums["kl"]
            return sums, counts
        chosen, rejected = out.chosen_rewards.detach(), out.rejected_rewards.detach()
        return {
            "rewards/chosen": float(chosen.sum()),
            "rewards/rejected": float(rejected.sum()),
            "rewards/accuracies": float((chosen > rejected).float().sum()),
            "rewards/margins": float((chosen - rejected).sum()),
            "logps/chosen": float(inputs.chosen.detach().sum()),
            "logps/rejected": float(inputs.rejected.detach().sum()),
        }, {}


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of a detached tensor, in rank order (the rows themselves in one
    process): what one process would hold with the global micro-batch. Training only, where
    every rank runs the same number of micro-batches."""
    if not current_world().distributed:
        return values
    return torch.cat(all_gather_objects(values.detach().cpu())).to(values.device)
