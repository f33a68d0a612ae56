"""Online RL with the GRPO family: prompts -> completions -> rewards -> advantages -> policy loss.

One generation batch of P prompts, trained on for `num_iterations` (mu) optimizer steps:

1. experience (make_experience, no gradient), on the first of those steps: each prompt is
   sampled G times from the policy being trained (soup/rollout/engine.py, seeded by the step
   so a resumed run draws what the uninterrupted one drew); the completions are decoded and
   scored by the reward functions (soup/rewards/); group advantages follow
   (soup/losses/grpo.py). Then the batch is shaped: truncated completions masked
   (mask_truncated_completions), groups whose rewards were all equal replaced from the replay
   buffer or dropped (replay_buffer_size, skip_zero_advantage), RFT's kept completions chosen.
   The "old" per-token log-probs are computed here when they can differ from the current
   ones (mu > 1, replayed groups), the reference's when beta > 0 (the adapter-disabled policy
   with PEFT, a frozen copy otherwise, optionally pulled toward the policy every
   ref_sync_steps). The result is micro-batches of prompt + completion rows.
2. training (forward, per micro-batch): the policy's per-token log-probs of the sampled
   tokens (logits / temperature, as the sampler drew them), the GRPO-family per-token loss
   and its reduction (loss_type), returned as (loss_sum, units) for the loop.

With mu = 1 and no replay the old policy is the current one, so old log-probs are the
current ones detached (ratio 1 on the only pass), as in GRPO with mu = 1.

The loop calls prepare_step with the prompt rows its sampler drew for the step
(train.micro_batch_size prompts per micro-batch) and draws rows only on the steps that
generate (draws_rows), so no prompt is skipped; each training micro-batch holds those
prompts' num_generations completions. The generation batch being trained on, the replay
buffer and a moving reference are task state, saved in every checkpoint.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soup.distributed import any_rank, current_world, forward_is_collective, gathered_parameters
from soup.losses.grpo import (group_advantages, loss_units, policy_loss, reduce_loss, rft_keep,
                              zero_std_groups)
from soup.losses.ppo import rloo_advantages
from soup.rewards import score
from soup.rollout.engine import SamplingParams, sample
from soup.tasks.base import Task, TaskData, TaskOutput
from soup.tasks.grpo_batches import ReplayBuffer, micro_batches, split_groups, stack_groups
from soup.tasks.logps import completion_logps
from soup.tasks.prompts import build_prompt_data, stop_token_ids

# loss_type -> (objective, reduction): cispo and rft are objectives that reduce as dapo does.
LOSS_TYPE_PARTS = {"grpo": ("clip", "grpo"), "bnpo": ("clip", "bnpo"), "dr_grpo": ("clip", "dr_grpo"),
                   "dapo": ("clip", "dapo"), "cispo": ("cispo", "dapo"), "rft": ("rft", "dapo"),
                   "rloo": ("clip", "sequence")}


@dataclass
class GRPOSettings:
    sampling: SamplingParams
    num_generations: int = 4
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    beta: float = 0.0
    num_iterations: int = 1
    tis_threshold: float | None = None
    mask_truncated_completions: bool = False
    skip_zero_advantage: bool = False
    off_policy_mask_threshold: float | None = None
    replay_buffer_size: int = 0
    ref_sync_steps: int = 0
    ref_model_ema_alpha: float = 1.0
    micro_batch_size: int = 8
    seed: int = 0
    # group: GRPO's group-normalised advantages; rloo: REINFORCE leave-one-out (task=rloo)
    advantage: str = "group"
    # rloo: the KL to the reference goes into each completion's reward (beta x its summed
    # k1 estimate) instead of into the loss
    kl_in_reward: bool = False

    @property
    def loss_beta(self) -> float:
        """The KL coefficient of the loss: none when the KL is in the reward."""
        return 0.0 if self.kl_in_reward else self.beta

    @property
    def objective(self) -> str:
        return LOSS_TYPE_PARTS[self.loss_type][0]

    @property
    def reduction(self) -> str:
        return LOSS_TYPE_PARTS[self.loss_type][1]

    @property
    def needs_old_logps(self) -> bool:
        return self.num_iterations > 1 or self.replay_buffer_size > 0


@dataclass
class Experience:
    batches: list[dict[str, torch.Tensor]]
    metrics: dict[str, float] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)


class GRPOTask(Task):
    allows_empty_steps = True  # every group skipped (all rewards equal): the step updates nothing

    def __init__(self, settings: GRPOSettings, rewards: list[tuple], tokenizer,
                 stop_ids: set[int]):
        super().__init__(settings)
        self.settings, self.rewards, self.tokenizer, self.stop_ids = settings, rewards, tokenizer, stop_ids
        self.unit_name = "tokens" if settings.reduction == "dapo" else "completions"
        self.steps_per_draw = settings.num_iterations
        self.reference: torch.nn.Module | None = None
        self.replay = ReplayBuffer(settings.replay_buffer_size)
        self._experience: Experience | None = None
        self._experience_step = -1

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "GRPOTask":
        t = cfg.task
        settings = GRPOSettings(
            sampling_params(t), num_generations=t.num_generations, loss_type=t.loss_type, scale_rewards=t.scale_rewards,
            epsilon=t.epsilon, epsilon_high=t.epsilon_high, delta=t.delta,
            importance_sampling_level=t.importance_sampling_level, beta=t.beta, num_iterations=t.num_iterations,
            tis_threshold=t.tis_threshold, mask_truncated_completions=t.mask_truncated_completions,
            skip_zero_advantage=t.skip_zero_advantage, off_policy_mask_threshold=t.off_policy_mask_threshold,
            replay_buffer_size=t.replay_buffer_size, ref_sync_steps=t.ref_sync_steps,
            ref_model_ema_alpha=t.ref_model_ema_alpha, seed=cfg.seed,
            micro_batch_size=cfg.train.micro_batch_size * t.num_generations,
            advantage="rloo" if t.name == "rloo" else "group", kl_in_reward=t.name == "rloo" and t.kl_in_reward)
        return cls(settings, bound_rewards(t), tokenizer, stop_token_ids(tokenizer))

    def build_data(self, cfg, tokenizer) -> TaskData:
        data = build_prompt_data(cfg, tokenizer, self.rewards)
        s = self.settings
        names = ", ".join(f"{spec.name} x {weight:g}" for spec, weight in self.rewards)
        kind = "rloo (leave-one-out baseline)" if s.advantage == "rloo" else "grpo"
        kl = f"beta {s.beta:g}" + (" (KL in the reward)" if s.kl_in_reward and s.beta else "")
        data.lines.append(f"{kind}: {s.num_generations} completions per prompt of <= "
                          f"{s.sampling.max_completion_length} tokens, rewards {names}, loss {s.loss_type}, "
                          f"{kl}, {s.num_iterations} optimizer step(s) per generation batch")
        return data

    # ------------------------------------------------------------------ the loop's hooks
    def draws_rows(self, step: int) -> bool:
        return step % self.settings.num_iterations == 0

    def prepare_step(self, micro_rows: list[list], collate, model: torch.nn.Module, step: int) -> list[dict]:
        """A generating step samples and scores every micro-batch's prompts together; the
        num_iterations - 1 steps after it train on the same experience again."""
        if self.draws_rows(step):
            self._experience = self.make_experience(model, [row for rows in micro_rows for row in rows], step)
            self._experience_step = step
        if self._experience is None or step - self._experience_step >= self.settings.num_iterations:
            raise RuntimeError(f"grpo: no generation batch for step {step}")  # the loop draws on the first
        return self._experience.batches

    def step_log(self) -> dict[str, float]:
        return dict(self._experience.metrics) if self._experience else {}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: list, batch_size: int, device) -> dict:
        """The rewards of num_generations completions per validation prompt, sampled as in
        training from a fixed seed, so evaluations at different steps draw alike."""
        s = self.settings
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed * 1_000_003 - 1)
        texts, lengths, truncated = [], [], []
        for start in range(0, len(examples), batch_size):
            rollout = self._sample_groups(model, examples[start:start + batch_size], generator)
            texts += self._completion_texts(rollout)
            lengths.append(rollout.lengths.float())
            truncated.append(rollout.truncated.float())
        scores = score(self.rewards, texts, self._reward_columns(examples))
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        lengths_all = torch.cat(lengths)
        metrics = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
                   "completions/mean_length": float(lengths_all.mean()),
                   "completions/clipped_ratio": float(torch.cat(truncated).mean())}
        metrics.update(per_reward_metrics(scores))
        return metrics

    def begin_step(self, step: int, total_steps: int, epoch: float, model: torch.nn.Module) -> None:
        s = self.settings
        if self.reference is not None and s.ref_sync_steps and step and step % s.ref_sync_steps == 0:
            pull_toward(self.reference, model, s.ref_model_ema_alpha)

    def setup(self, model, cfg=None, data=None, device=None, autocast=None) -> list[str]:
        if not self.settings.beta:
            return ["reference: none (beta=0)"]
        if hasattr(model, "disable_adapter"):
            return ["reference: adapter (the policy with its adapters disabled)"]
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        s = self.settings
        sync = (f", pulled toward the policy every {s.ref_sync_steps} steps (alpha {s.ref_model_ema_alpha:g})"
                if s.ref_sync_steps else "")
        return [f"reference: copy (a frozen copy of the initial policy{sync})"]

    def state_dict(self) -> dict:
        """The moving reference, the same on every rank."""
        if self.reference is not None and self.settings.ref_sync_steps:
            return {"reference": {k: v.detach().cpu() for k, v in self.reference.state_dict().items()}}
        return {}

    def rank_state_dict(self) -> dict:
        """This rank's own rollouts: the generation batch being trained and the replay buffer."""
        state: dict = {"replay": self.replay.state_dict()}
        if self._experience is not None:
            state["experience"] = {"step": self._experience_step, "batches": self._experience.batches,
                                   "metrics": self._experience.metrics}
        return state

    def load_rank_state_dict(self, state: dict) -> None:
        self.load_state_dict(state)

    def load_state_dict(self, state: dict) -> None:
        if "replay" in state:
            self.replay.load_state_dict(state["replay"])
        if "experience" in state:
            saved = state["experience"]
            self._experience = Experience(saved["batches"], dict(saved["metrics"]))
            self._experience_step = int(saved["step"])
        if "reference" in state and self.reference is not None:
            self.reference.load_state_dict(state["reference"])

    # ------------------------------------------------------------------ experience
    @torch.no_grad()
    def make_experience(self, model: torch.nn.Module, rows: list[dict], step: int) -> Experience:
        """Sample, score and batch the completions of `rows` (each: prompt_ids plus reward columns)."""
        s, group = self.settings, self.settings.num_generations
        started = time.perf_counter()
        # Seeded by the step (a resumed run draws the same) and the rank (ranks draw differently).
        seed = s.seed * 1_000_003 + step + current_world().rank * 100_000_007
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        rollout = self._sample_groups(model, rows, generator)
        rollout_s = time.perf_counter() - started
        texts = self._completion_texts(rollout)
        scores = score(self.rewards, texts, self._reward_columns(rows))
        scoring_s = time.perf_counter() - started - rollout_s
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        if s.advantage == "rloo":
            shaped, kl_metrics = self._rewards_with_kl(model, rollout, rewards)
            advantages = rloo_advantages(shaped, group)
        else:
            advantages, kl_metrics = group_advantages(rewards, group, s.scale_rewards), {}
        metrics = {**rollout_metrics(rollout, rewards, advantages, group, scores, rollout_s, scoring_s), **kl_metrics}

        completion_mask = rollout.completion_mask
        if s.mask_truncated_completions:
            completion_mask = completion_mask * ~rollout.truncated.unsqueeze(-1)
        if s.objective == "rft":  # train only on each group's best completions
            advantages = rft_keep(rewards, group)
            completion_mask = completion_mask * advantages.bool().unsqueeze(-1).to(completion_mask.device)
        fresh = split_groups({
            "prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
            "completion_ids": rollout.completion_ids, "completion_mask": completion_mask,
            "sampler_logps": rollout.sampler_logps, "advantages": advantages.to(rollout.prompt_ids.device),
        }, group, pad_id=self.tokenizer.pad_token_id)
        keep = ~zero_std_groups(rewards, group)
        chosen = self._choose_groups(fresh, keep.tolist(), rewards.view(-1, group).std(dim=1), step, metrics)

        batches = micro_batches(stack_groups(chosen, self.tokenizer.pad_token_id), s.micro_batch_size) if chosen else []
        if s.needs_old_logps:
            for batch in batches:
                fresh_rows = ~batch.pop("replayed")
                old = self.completion_logps(model, batch)
                batch["old_logps"] = torch.where(fresh_rows.unsqueeze(-1), old, batch["old_logps"])
            self._remember(chosen, batches)
        else:
            for batch in batches:
                batch.pop("replayed"), batch.pop("old_logps")
        if s.loss_beta:
            for batch in batches:
                batch["ref_logps"] = self._reference_logps(model, batch)
        return Experience(batches, metrics, texts)

    def _rewards_with_kl(self, model, rollout, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """RLOO's rewards: with the KL in the reward, each completion's score minus beta x its
        summed per-token k1 estimate log pi - log pi_ref (the sampler's log-probs, the policy's
        at generation; arXiv 2402.14740). Otherwise the scores as they are."""
        s = self.settings
        if not (s.kl_in_reward and s.beta):
            return rewards, {}
        rows = split_groups({"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                             "completion_ids": rollout.completion_ids, "completion_mask": rollout.completion_mask,
                             "sampler_logps": rollout.sampler_logps,
                             "advantages": torch.zeros(rewards.shape[0], device=rollout.prompt_ids.device)},
                            s.num_generations, pad_id=self.tokenizer.pad_token_id)
        kl = []
        for batch in micro_batches(stack_groups(rows, self.tokenizer.pad_token_id), s.micro_batch_size):
            mask = batch["completion_mask"].to(torch.float32)
            kl.append(((batch["sampler_logps"] - self._reference_logps(model, batch)) * mask).sum(-1))
        kl = torch.cat(kl).float().cpu()
        return rewards - s.beta * kl, {"kl": float(kl.mean()), "non_score_reward": float(-s.beta * kl.mean())}

    def _sample_groups(self, model: torch.nn.Module, rows: list[dict], generator: torch.Generator):
        """num_generations completions of each row's prompt, grouped contiguously."""
        prompts = [row["prompt_ids"] for row in rows for _ in range(self.settings.num_generations)]
        return sample(model, prompts, self.settings.sampling, pad_id=self.tokenizer.pad_token_id,
                      stop_ids=self.stop_ids, generator=generator, decode=self.tokenizer.decode,
                      any_rank_live=any_rank if forward_is_collective(model) else None)

    def _completion_texts(self, rollout) -> list[str]:
        return rollout.completion_texts(self.tokenizer)

    def _reward_columns(self, rows: list[dict]) -> dict[str, list]:
        """Each row column but the prompt ids, repeated for the row's num_generations completions."""
        group = self.settings.num_generations
        return {key: [row[key] for row in rows for _ in range(group)] for key in rows[0] if key != "prompt_ids"}

    def _choose_groups(self, fresh: list[dict], informative: list[bool], stds: torch.Tensor, step: int,
                       metrics: dict) -> list[dict]:
        """The groups to train on: every informative group; each uninformative one replaced
        by a replayed group when the buffer has one, else dropped with skip_zero_advantage."""
        s = self.settings
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + step + 1)
        chosen, replayed, skipped = [], 0, 0
        for group, useful, std in zip(fresh, informative, stds.tolist()):
            group["priority"] = std
            if useful:
                chosen.append(group)
            elif s.replay_buffer_size and len(self.replay):
                chosen.append(self.replay.draw(generator, group["prompt_ids"].device))
                replayed += 1
            elif s.skip_zero_advantage:
                skipped += 1
            else:
                chosen.append(group)
        if s.replay_buffer_size:
            metrics["replay/groups_replayed"] = float(replayed)
        if s.skip_zero_advantage:
            metrics["skipped_groups"] = float(skipped)
        return chosen

    def _remember(self, chosen: list[dict], batches: list[dict]) -> None:
        """Store the fresh informative groups, with their old log-probs, in the replay buffer."""
        if not self.settings.replay_buffer_size:
            return
        old = torch.cat([b["old_logps"] for b in batches])
        row = 0
        for group in chosen:
            size = group["completion_ids"].shape[0]
            if not group.get("from_replay"):
                width = group["completion_ids"].shape[1]
                group["old_logps"] = old[row:row + size, :width].clone()
                if group["priority"] > 0:
                    self.replay.add(group)
            row += size

    def _reference_logps(self, model, batch) -> torch.Tensor:
        if self.reference is not None:
            return self.completion_logps(self.reference, batch)
        with model.disable_adapter():
            return self.completion_logps(model, batch)

    # ------------------------------------------------------------------ training
    def completion_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                         with_entropy: bool = False):
        """(B, T) log-probs of the sampled completion tokens, from logits / temperature (soup/tasks/logps.py)."""
        return completion_logps(model, batch, self.settings.sampling.temperature, with_entropy)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return loss_units(batch["completion_mask"], self.settings.reduction)

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        s = self.settings
        logps, entropy = self.completion_logps(model, batch, with_entropy=True)
        mask = batch["completion_mask"].to(logps.dtype)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        out = policy_loss(logps, old, batch["advantages"], mask, objective=s.objective,
                          epsilon=s.epsilon, epsilon_high=s.epsilon_high, delta=s.delta,
                          importance_sampling_level=s.importance_sampling_level, beta=s.loss_beta,
                          ref_logps=batch.get("ref_logps"), sampler_logps=batch["sampler_logps"],
                          tis_threshold=s.tis_threshold, off_policy_mask_threshold=s.off_policy_mask_threshold)
        reduced = reduce_loss(out.per_token, mask, s.reduction, s.sampling.max_completion_length)
        # Token means, weighted by this micro-batch's units: the loop divides by the step's units.
        metrics = {**out.metrics, "entropy": float((entropy * mask).sum() / mask.sum().clamp(min=1.0))}
        return TaskOutput(loss_sum=reduced.loss_sum, metric_sums={k: v * reduced.units for k, v in metrics.items()})


def pull_toward(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """reference <- alpha x policy + (1 - alpha) x reference, parameter by parameter
    (TR-DPO's soft update, arXiv 2404.09656; alpha = 1 copies the policy)."""
    ref_params = list(reference.parameters())
    # A sharded policy (fsdp2, ZeRO-3) is gathered on every rank; the reference is a plain copy.
    with torch.no_grad(), gathered_parameters(policy) as policy_params:
        if [p.shape for p in ref_params] != [p.shape for p in policy_params]:
            raise RuntimeError("grpo: the reference copy no longer matches the policy's parameters")
        for ref, param in zip(ref_params, policy_params):
            ref.mul_(1 - alpha).add_(param.detach().to(ref.dtype), alpha=alpha)


def rollout_metrics(rollout, rewards, advantages, group, scores, rollout_s, scoring_s) -> dict[str, float]:
    """What a researcher reads about a generation batch, under TRL's GRPOTrainer names."""
    lengths = rollout.lengths.float()
    terminated = lengths[~rollout.truncated]
    metrics = {
        "reward": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        "advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "frac_reward_zero_std": float(zero_std_groups(rewards, group).float().mean()),
        "completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
        "completions/max_length": float(lengths.max()),
        "completions/mean_terminated_length": float(terminated.mean()) if terminated.numel() else 0.0,
        "completions/clipped_ratio": float(rollout.truncated.float().mean()),
        "time/rollout_s": rollout_s, "time/scoring_s": scoring_s,
        "rollout_tokens_per_s": float(lengths.sum()) / max(rollout_s, 1e-9),
    }
    metrics.update(per_reward_metrics(scores))
    return metrics


def per_reward_metrics(scores) -> dict[str, float]:
    """Each reward's mean and std over the completions it applied to, and its event counts."""
    metrics = {f"rewards/{key}": float(n) for key, n in scores.counts.items()}
    for name, values in scores.per_reward.items():
        applied = torch.tensor([v for v in values if v is not None])
        label = Path(name).stem if name.endswith(".py") else Path(name).name  # a file or directory: its name
        if applied.numel():
            metrics[f"rewards/{label}/mean"] = float(applied.mean())
            metrics[f"rewards/{label}/std"] = float(applied.std()) if applied.numel() > 1 else 0.0
    return metrics


def sampling_params(task_cfg) -> SamplingParams:
    """How an online task (grpo, rloo, ppo) samples, from its config."""
    t = task_cfg
    return SamplingParams(max_completion_length=t.max_completion_length, temperature=t.temperature, top_p=t.top_p,
                          top_k=t.top_k, min_p=t.min_p, repetition_penalty=t.repetition_penalty,
                          stop=tuple(t.stop or ()))


def bound_rewards(task_cfg) -> list[tuple]:
    """[(reward, weight)] of task.reward and task.reward_weights, each reward's settings bound."""
    from soup.rewards.registry import get_reward

    names = [str(name) for name in task_cfg.reward]
    weights = list(task_cfg.reward_weights) if task_cfg.reward_weights is not None else [1.0] * len(names)
    return [(get_reward(name, **reward_params(name, task_cfg)), float(w)) for name, w in zip(names, weights)]


def reward_params(name: str, task_cfg) -> dict:
    """The task settings a built-in reward reads: the answer column, the format regex."""
    if name in ("accuracy", "math"):
        return {"answer_column": task_cfg.answer_column}
    if name == "format":
        return {"pattern": task_cfg.format_pattern}
    return {}
