"""Online RL with the GRPO family: prompts -> completions -> rewards -> advantages -> policy loss.

One optimizer step on a batch of P prompts:

1. experience (make_experience, no gradient): each prompt is sampled G times from the
   policy being trained (soup/rollout/engine.py, seeded by the step so a resumed run
   draws what the uninterrupted one drew); the completions are decoded and scored by the
   reward functions (soup/rewards/); group advantages follow (soup/losses/grpo.py);
   the reference's per-token log-probs are computed when beta > 0 (the adapter-disabled
   policy with PEFT, a frozen copy otherwise). The result is micro-batches of
   prompt + completion rows.
2. training (forward, per micro-batch): the policy's per-token log-probs of the sampled
   tokens (logits / temperature, as the sampler drew them), the GRPO-family per-token
   loss and its reduction (loss_type), returned as (loss_sum, units) for the loop.

With one pass per generation batch the "old" policy is the current one, so old log-probs
are the current ones detached (ratio 1 on the first and only pass), as in GRPO with mu = 1.

The loop calls prepare_step with the prompt rows its sampler drew for the step
(train.micro_batch_size prompts per micro-batch), so experience happens inside the one
loop; each training micro-batch holds those prompts' num_generations completions.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from soup.losses.grpo import group_advantages, loss_units, policy_loss, reduce_loss, zero_std_groups
from soup.rewards import score
from soup.rollout.engine import SamplingParams, sample
from soup.tasks.base import Task, TaskData, TaskOutput
from soup.tasks.logps import final_hidden_states, head_logits
from soup.tasks.prompts import build_prompt_data, stop_token_ids


@dataclass
class GRPOSettings:
    sampling: SamplingParams
    num_generations: int = 4
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    objective: str = "clip"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    beta: float = 0.0
    micro_batch_size: int = 8
    seed: int = 0


@dataclass
class Experience:
    batches: list[dict[str, torch.Tensor]]
    metrics: dict[str, float] = field(default_factory=dict)
    completions: list[str] = field(default_factory=list)


class GRPOTask(Task):
    def __init__(self, settings: GRPOSettings, rewards: list[tuple], tokenizer,
                 stop_ids: set[int]):
        super().__init__(settings)
        self.settings, self.rewards, self.tokenizer, self.stop_ids = settings, rewards, tokenizer, stop_ids
        self.unit_name = "tokens" if settings.loss_type == "dapo" else "completions"
        self.reference: torch.nn.Module | None = None
        self._step_metrics: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "GRPOTask":
        from soup.rewards.registry import get_reward

        t = cfg.task
        sampling = SamplingParams(max_completion_length=t.max_completion_length, temperature=t.temperature,
                                  top_p=t.top_p, top_k=t.top_k, min_p=t.min_p, repetition_penalty=t.repetition_penalty)
        settings = GRPOSettings(sampling, num_generations=t.num_generations, loss_type=t.loss_type,
                                scale_rewards=t.scale_rewards, beta=t.beta, seed=cfg.seed,
                                micro_batch_size=cfg.train.micro_batch_size * t.num_generations)
        names = [str(name) for name in t.reward]
        weights = list(t.reward_weights) if t.reward_weights is not None else [1.0] * len(names)
        rewards = [(get_reward(name, **reward_params(name, t)), float(w)) for name, w in zip(names, weights)]
        return cls(settings, rewards, tokenizer, stop_token_ids(tokenizer))

    def build_data(self, cfg, tokenizer) -> TaskData:
        data = build_prompt_data(cfg, tokenizer, self.rewards)
        names = ", ".join(f"{spec.name} x {weight:g}" for spec, weight in self.rewards)
        data.lines.append(f"grpo: {self.settings.num_generations} completions per prompt of <= "
                          f"{self.settings.sampling.max_completion_length} tokens, rewards {names}, loss "
                          f"{self.settings.loss_type}, beta {self.settings.beta:g}")
        return data

    def prepare_step(self, micro_rows: list[list], collate, model: torch.nn.Module, step: int) -> list[dict]:
        """Experience for this step: every micro-batch's prompts, sampled and scored together."""
        experience = self.make_experience(model, [row for rows in micro_rows for row in rows], step)
        self._step_metrics = experience.metrics
        return experience.batches

    def setup(self, model, cfg=None, data=None, device=None, autocast=None) -> list[str]:
        if not self.settings.beta:
            return ["reference: none (beta=0)"]
        if hasattr(model, "disable_adapter"):
            return ["reference: adapter (the policy with its adapters disabled)"]
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        return ["reference: copy (a frozen copy of the initial policy)"]

    # ------------------------------------------------------------------ experience
    @torch.no_grad()
    def make_experience(self, model: torch.nn.Module, rows: list[dict], step: int) -> Experience:
        """Sample, score and batch the completions of `rows` (each: prompt_ids plus reward columns)."""
        s, group = self.settings, self.settings.num_generations
        started = time.perf_counter()
        prompts = [row["prompt_ids"] for row in rows for _ in range(group)]
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed * 1_000_003 + step)
        rollout = sample(model, prompts, s.sampling, pad_id=self.tokenizer.pad_token_id, stop_ids=self.stop_ids,
                         generator=generator)
        rollout_s = time.perf_counter() - started
        texts = self.tokenizer.batch_decode(rollout.completion_ids * rollout.completion_mask,
                                            skip_special_tokens=True)
        columns = {key: [row[key] for row in rows for _ in range(group)]
                   for key in rows[0] if key != "prompt_ids"}
        scores = score(self.rewards, texts, columns)
        scoring_s = time.perf_counter() - started - rollout_s
        rewards = torch.tensor(scores.total, dtype=torch.float32)
        advantages = group_advantages(rewards, group, s.scale_rewards)

        ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)
        mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                 "completion_ids": rollout.completion_ids, "completion_mask": rollout.completion_mask,
                 "advantages": advantages.to(ids.device)}
        batches = [{k: v[i:i + s.micro_batch_size] for k, v in batch.items()}
                   for i in range(0, ids.shape[0], s.micro_batch_size)]
        if s.beta:
            for b in batches:
                b["ref_logps"] = self._reference_logps(model, b)
        lengths = rollout.lengths.float()
        metrics = {
            "reward": float(rewards.mean()), "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
            "advantage_std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
            "frac_zero_std_groups": float(zero_std_groups(rewards, group).float().mean()),
            "completion_length": float(lengths.mean()), "completion_length_min": float(lengths.min()),
            "completion_length_max": float(lengths.max()), "truncated": float(rollout.truncated.float().mean()),
            "time/rollout_s": rollout_s, "time/scoring_s": scoring_s,
            "rollout_tokens_per_s": float(lengths.sum()) / max(rollout_s, 1e-9),
        }
        metrics.update({f"rewards/{key}": float(n) for key, n in scores.counts.items()})
        for name, values in scores.per_reward.items():
            applied = torch.tensor([v for v in values if v is not None])
            label = Path(name).stem if name.endswith(".py") else name  # a custom reward: its file's name
            if applied.numel():
                metrics[f"rewards/{label}"] = float(applied.mean())
                metrics[f"rewards/{label}_std"] = float(applied.std()) if applied.numel() > 1 else 0.0
        return Experience(batches, metrics, texts)

    def _reference_logps(self, model, batch) -> torch.Tensor:
        if self.reference is not None:
            return self.completion_logps(self.reference, batch)
        with model.disable_adapter():
            return self.completion_logps(model, batch)

    # ------------------------------------------------------------------ training
    def completion_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T) log-probs of the sampled completion tokens, from logits / temperature."""
        width = batch["completion_ids"].shape[1]
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        hidden = final_hidden_states(model, inputs)[:, -width - 1:-1]
        logits = head_logits(model, hidden)
        if self.settings.sampling.temperature > 0:
            logits = logits / self.settings.sampling.temperature
        return logits.log_softmax(-1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return loss_units(batch["completion_mask"], self.settings.loss_type)

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        s = self.settings
        logps = self.completion_logps(model, batch)
        mask = batch["completion_mask"].to(logps.dtype)
        out = policy_loss(logps, logps.detach(), batch["advantages"], mask, objective=s.objective,
                          epsilon=s.epsilon, epsilon_high=s.epsilon_high, delta=s.delta,
                          importance_sampling_level=s.importance_sampling_level, beta=s.beta,
                          ref_logps=batch.get("ref_logps"))
        reduced = reduce_loss(out.per_token, mask, s.loss_type, s.sampling.max_completion_length)
        # The loop divides each sum by the step's units: weighting by this micro-batch's units
        # averages the per-token metrics and passes the step's experience metrics through as they are.
        units = reduced.units
        sums = {key: value * units for key, value in {**self._step_metrics, **out.metrics}.items()}
        return TaskOutput(loss_sum=reduced.loss_sum, metric_sums=sums)


def reward_params(name: str, task_cfg) -> dict:
    """The task settings a built-in reward reads: the answer column, the format regex."""
    if name in ("accuracy", "math"):
        return {"answer_column": task_cfg.answer_column}
    if name == "format":
        return {"pattern": task_cfg.format_pattern}
    return {}
