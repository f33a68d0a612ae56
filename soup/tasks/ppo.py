"""RLHF with PPO: prompts -> completions -> scores -> per-token rewards -> GAE -> clipped losses.

One rollout batch is the P prompts the loop draws for a step (train.micro_batch_size x
train.grad_accum_steps), one completion each. It is trained on for task.ppo_epochs passes of
task.num_mini_batches optimizer steps (Task.steps_per_draw), each pass in a new order:

1. experience (make_experience, no gradient), on the first of those steps: the policy samples
   the completions (soup/rollout/engine.py, seeded by the step, so a resumed run draws what the
   uninterrupted one drew); the rewards score them (a reward model directory reads the token
   ids, EOS included, as it was trained; other rewards read the decoded text), with
   task.missing_eos_penalty off the score of a completion that hit the length cap. Then, per
   token of every completion: the policy's log-probs (the "old" ones of the ratio), the
   reference's (the adapter-disabled policy with PEFT, a frozen copy otherwise), the value
   model's V(s_t); the rewards -kl_coef x KL_t plus the score on the last real token, GAE
   advantages (whitened) and returns (soup/losses/ppo.py). The KL controller then moves
   (task.target_kl) toward its target.
2. training (forward, per micro-batch of a mini-batch): the policy's log-probs and the value
   model's values with gradients, PPO's clipped policy loss plus vf_coef x the clipped value
   loss per token; the loop divides the summed token losses by the mini-batch's tokens.

The value model is a score head on a decoder (transformers' *ForSequenceClassification, as
task=reward_model trains), read at every position: V(s_t) is the head on the hidden state
that predicts completion token t. It starts from the reward model or from the policy
(task.value_init) and trains beside the policy in the run's one optimizer (optimized_module);
with PEFT it gets adapters of the same config and a trainable head. Its weights, the KL
coefficient and the rollout batch being trained are task state, saved in every checkpoint.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from soup.errors import ConfigError
from soup.losses.ppo import (AdaptiveKLController, FixedKLController, clipped_policy_loss, clipped_value_loss,
                             explained_variance, gae, masked_mean, masked_whiten, per_token_kl, ppo_rewards)
from soup.rewards import score
from soup.rollout.engine import SamplingParams, sample
from soup.tasks.base import Task, TaskData, TaskOutput
from soup.tasks.grpo import bound_rewards, per_reward_metrics, sampling_params
from soup.tasks.grpo_batches import micro_batches
from soup.tasks.logps import completion_logps
from soup.tasks.prompts import build_prompt_data, stop_token_ids

VALUE_INITS = ("auto", "reward_model", "policy")
ROLLOUT_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")


@dataclass
class PPOSettings:
    sampling: SamplingParams
    value_init: str = "auto"
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    target_kl: float | None = None
    kl_horizon: float = 10000.0
    missing_eos_penalty: float | None = None
    whiten_rewards: bool = False
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    num_mini_batches: int = 1
    micro_batch_size: int = 8
    seed: int = 0

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0


@dataclass
class Experience:
    """A scored rollout batch: `rows` holds (P, ...) tensors, prompts left-padded and completions
    right-padded, with old_logps, old_values, advantages and returns per completion token."""

    rows: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)


def reward_model_paths(rewards: list[tuple]) -> list[str]:
    """The task.reward entries that are reward model directories."""
    from soup.rewards.registry import REWARDS

    return [spec.name for spec, _ in rewards if spec.name not in REWARDS and Path(spec.name).expanduser().is_dir()]


def token_values(value_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T) fp32 V(s_t): the score head on the hidden state before each completion token."""
    inner = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    backbone = getattr(inner, inner.base_model_prefix)
    width = batch["completion_ids"].shape[1]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, -width - 1:-1]
    return inner.score(hidden).squeeze(-1).float()


def trimmed(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`rows` without the prompt columns that are padding in every row, nor the completion
    columns past the longest completion."""
    prompt_start = int(rows["prompt_mask"].any(0).float().argmax())
    width = max(int(rows["completion_mask"].sum(-1).max()), 1)
    out = {}
    for key, value in rows.items():
        if key.startswith("prompt_"):
            out[key] = value[:, prompt_start:]
        elif value.ndim == 2:
            out[key] = value[:, :width]
        else:
            out[key] = value
    return out


class PPOTask(Task):
    unit_name = "tokens"

    def __init__(self, settings: PPOSettings, rewards: list[tuple], tokenizer, stop_ids: set[int]):
        super().__init__(settings)
        self.settings, self.rewards, self.tokenizer, self.stop_ids = settings, rewards, tokenizer, stop_ids
        self.steps_per_draw = settings.ppo_epochs * settings.num_mini_batches
        self.kl_controller = (AdaptiveKLController(settings.kl_coef, settings.target_kl, settings.kl_horizon)
                              if settings.target_kl is not None else FixedKLController(settings.kl_coef))
        self.reference: torch.nn.Module | None = None
        self.value_model: torch.nn.Module | None = None
        self._experience: Experience | None = None
        self._experience_step = -1

    @classmethod
    def from_config(cls, cfg, tokenizer) -> "PPOTask":
        t = cfg.task
        settings = PPOSettings(
            sampling_params(t), value_init=t.value_init, kl_coef=t.kl_coef, kl_estimator=t.kl_estimator,
            target_kl=t.target_kl, kl_horizon=t.kl_horizon, missing_eos_penalty=t.missing_eos_penalty,
            whiten_rewards=t.whiten_rewards, gamma=t.gamma, lam=t.lam, cliprange=t.cliprange,
            cliprange_value=t.cliprange_value, vf_coef=t.vf_coef, ppo_epochs=t.ppo_epochs,
            num_mini_batches=t.num_mini_batches, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.seed)
        return cls(settings, bound_rewards(t), tokenizer, stop_token_ids(tokenizer))

    def build_data(self, cfg, tokenizer) -> TaskData:
        data = build_prompt_data(cfg, tokenizer, self.rewards)
        s = self.settings
        names = ", ".join(f"{spec.name} x {weight:g}" for spec, weight in self.rewards)
        kl = (f"adaptive KL from {s.kl_coef:g} toward {s.target_kl:g} nats per completion" if s.target_kl is not None
              else f"kl_coef {s.kl_coef:g}")
        data.lines.append(f"ppo: 1 completion per prompt of <= {s.sampling.max_completion_length} tokens, rewards "
                          f"{names}, {kl} ({s.kl_estimator}), {s.ppo_epochs} epoch(s) x {s.num_mini_batches} "
                          "mini-batch(es) per rollout batch")
        return data

    # ------------------------------------------------------------------ models
    def setup(self, model, cfg=None, data=None, device=None, autocast=None) -> list[str]:
        from soup.rewards.reward_model import load_reward_model

        lines = []
        for path in reward_model_paths(self.rewards):
            load_reward_model(path, device)  # scores on the training device
        if not self.settings.needs_reference:
            lines.append("reference: none (kl_coef=0)")
        elif hasattr(model, "disable_adapter"):
            lines.append("reference: adapter (the policy with its adapters disabled)")
        else:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
            lines.append("reference: copy (a frozen copy of the initial policy)")
        self.value_model, source = self._build_value_model(model, cfg)
        self.value_model.to(device).train()
        trainable = sum(p.numel() for p in self.value_model.parameters() if p.requires_grad)
        lines.append(f"value model: {source}, {trainable / 1e6:.2f}M trainable parameters, trained beside the "
                     f"policy (vf_coef {self.settings.vf_coef:g})")
        return lines

    def _build_value_model(self, policy: torch.nn.Module, cfg) -> tuple[torch.nn.Module, str]:
        from soup.models.load import apply_peft, build_model
        from soup.rewards.reward_model import load_reward_model

        paths = reward_model_paths(self.rewards)
        init = self.settings.value_init
        if init == "auto":
            init = "reward_model" if paths else "policy"
        if init == "reward_model":
            reward_model = load_reward_model(paths[0])
            if paths[0] not in self._id_scored_rewards:
                raise ConfigError(f"task.value_init=reward_model: the reward model {paths[0]} has another tokenizer "
                                  "than the policy, so it cannot read the policy's tokens.\n  fix: "
                                  "task.value_init=policy, or train the reward model on the policy's tokenizer.")
            value = copy.deepcopy(reward_model.model).requires_grad_(True)
            source = f"initialised from the reward model {paths[0]}"
        else:
            value = build_model(cfg.model, self.tokenizer, cfg.seed, "sequence_score")
            copy_backbone(value, policy)
            source = "initialised from the policy, with a new score head"
        if not hasattr(value, "score") or not hasattr(value, value.base_model_prefix):
            raise ConfigError(f"task.value_init={init}: the value model ({type(value).__name__}) is not a decoder with "
                              "a `score` head.\n  fix: use a decoder model (Llama, Qwen2, Mistral, GPT-2, ...).")
        return apply_peft(value, cfg.peft, cfg.seed), source

    def optimized_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The policy and the value model: one optimizer, one gradient clip over both."""
        return torch.nn.ModuleDict({"policy": model, "value": self.value_model})

    # ------------------------------------------------------------------ the loop's hooks
    def draws_rows(self, step: int) -> bool:
        return step % self.steps_per_draw == 0

    def prepare_step(self, micro_rows: list[list], collate, model: torch.nn.Module, step: int) -> list[dict]:
        """A drawing step samples and scores the rollout batch; every step then trains on one
        mini-batch of it, in an order drawn anew for each pass (seeded by the drawing step)."""
        if self.draws_rows(step):
            self._experience = self.make_experience(model, [row for rows in micro_rows for row in rows], step)
            self._experience_step = step
        offset = step - self._experience_step
        if self._experience is None or not 0 <= offset < self.steps_per_draw:
            raise RuntimeError(f"ppo: no rollout batch for step {step}")  # the loop draws on the first
        s = self.settings
        epoch, mini = divmod(offset, s.num_mini_batches)
        rows = self._experience.rows
        count = rows["prompt_ids"].shape[0]
        generator = torch.Generator().manual_seed(s.seed * 1_000_003 + self._experience_step * 1_009 + epoch)
        order = torch.randperm(count, generator=generator)
        size = -(-count // s.num_mini_batches)
        chosen = order[mini * size:(mini + 1) * size].to(rows["prompt_ids"].device)
        if not chosen.numel():
            return []
        taken = trimmed({key: value[chosen] for key, value in rows.items()})
        return micro_batches(taken, s.micro_batch_size)

    def step_log(self) -> dict[str, float]:
        return dict(self._experience.metrics) if self._experience else {}

    # ------------------------------------------------------------------ experience
    @torch.no_grad()
    def make_experience(self, model: torch.nn.Module, rows: list[dict], step: int) -> Experience:
        s = self.settings
        started = time.perf_counter()
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(s.seed * 1_000_003 + step)
        rollout = self._sample(model, rows, generator)
        rollout_s = time.perf_counter() - started
        scores, score_metrics = self._scores(rollout, rows)
        scoring_s = time.perf_counter() - started - rollout_s
        raw_scores = scores.clone()
        if s.missing_eos_penalty is not None:
            scores = scores - s.missing_eos_penalty * rollout.truncated.float().cpu()

        stacked = {"prompt_ids": rollout.prompt_ids, "prompt_mask": rollout.prompt_mask,
                   "completion_ids": rollout.completion_ids, "completion_mask": rollout.completion_mask}
        old_logps, ref_logps, values = [], [], []
        for batch in micro_batches(stacked, s.micro_batch_size):
            old_logps.append(completion_logps(model, batch, s.sampling.temperature))
            ref_logps.append(self._reference_logps(model, batch) if s.needs_reference else old_logps[-1])
            values.append(token_values(self.value_model, batch))
        old_logps, ref_logps, values = torch.cat(old_logps), torch.cat(ref_logps), torch.cat(values)
        mask = rollout.completion_mask.to(torch.float32)
        values = values * mask

        kl_coef = self.kl_controller.value
        rewards, non_score = ppo_rewards(scores.to(mask.device), old_logps, ref_logps, mask, kl_coef, s.kl_estimator)
        if s.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) if mask.sum() > 1 else rewards
        advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
        if mask.sum() > 1:
            advantages = masked_whiten(advantages, mask)
        kl = per_token_kl(old_logps, ref_logps, mask, s.kl_estimator).sum(-1)
        self.kl_controller.update(float(kl.mean()), kl.numel())

        lengths = rollout.lengths.float()
        metrics = {
            "score": float(raw_scores.mean()), "non_score_reward": float(non_score.sum(-1).mean()),
            "rlhf_reward": float(scores.mean() + non_score.sum(-1).mean().cpu()),
            "kl": float(kl.mean()), "kl_coef": kl_coef,
            "values/mean": float(masked_mean(values, mask)), "returns/mean": float(masked_mean(returns, mask)),
            "values/explained_variance": explained_variance(values, returns, mask) if mask.sum() > 1 else float("nan"),
            "completions/mean_length": float(lengths.mean()),
            "completions/eos_fraction": float((~rollout.truncated).float().mean()),
            "time/rollout_s": rollout_s, "time/scoring_s": scoring_s,
            "rollout_tokens_per_s": float(lengths.sum()) / max(rollout_s, 1e-9),
            **score_metrics,
        }
        if s.missing_eos_penalty is not None:
            metrics["score_with_eos_penalty"] = float(scores.mean())
        rows_out = {**stacked, "old_logps": old_logps, "old_values": values, "advantages": advantages,
                    "returns": returns}
        return Experience(rows_out, metrics)

    def _sample(self, model: torch.nn.Module, rows: list[dict], generator: torch.Generator):
        return sample(model, [row["prompt_ids"] for row in rows], self.settings.sampling,
                      pad_id=self.tokenizer.pad_token_id, stop_ids=self.stop_ids, generator=generator,
                      decode=self.tokenizer.decode)

    def _scores(self, rollout, rows: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        """(P,) weighted sum of the rewards of each completion, and per-reward metrics.

        A reward model that shares the policy's tokenizer reads prompt + completion ids as
        sampled (the stop token included, as its training pairs ended); other rewards read text."""
        id_scored = self._id_scored_rewards
        total = torch.zeros(rollout.prompt_ids.shape[0])
        metrics: dict[str, float] = {}
        text_rewards = [(spec, w) for spec, w in self.rewards if spec.name not in id_scored]
        if text_rewards:
            texts = rollout.completion_texts(self.tokenizer)
            columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt_ids"}
            scores = score(text_rewards, texts, columns)
            total += torch.tensor(scores.total, dtype=torch.float32)
            metrics.update(per_reward_metrics(scores))
        for spec, weight in self.rewards:
            if spec.name in id_scored:
                values = self._reward_model_scores(spec.name, rollout)
                total += weight * values
                label = Path(spec.name).name
                metrics[f"rewards/{label}/mean"] = float(values.mean())
                metrics[f"rewards/{label}/std"] = float(values.std()) if values.numel() > 1 else 0.0
        return total, metrics

    @cached_property
    def _id_scored_rewards(self) -> set[str]:
        """The reward model directories that read the policy's token ids (same vocabulary), decided
        once: comparing vocabularies on every rollout would cost a dict of the whole vocabulary."""
        return {path for path in reward_model_paths(self.rewards) if self._shares_tokenizer(path)}

    def _shares_tokenizer(self, path: str) -> bool:
        from soup.rewards.reward_model import load_reward_model

        return load_reward_model(path).tokenizer.get_vocab() == self.tokenizer.get_vocab()

    def _reward_model_scores(self, path: str, rollout) -> torch.Tensor:
        """The reward model's logit of each prompt + completion, right-padded so its own pooling
        (the last token that is not padding) reads where it read in training."""
        from soup.rewards.reward_model import load_reward_model

        reward_model = load_reward_model(path).model
        pad = self.tokenizer.pad_token_id
        sequences = [torch.cat([p[m.bool()], c[cm.bool()]]) for p, m, c, cm in
                     zip(rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), pad, dtype=torch.long, device=rollout.prompt_ids.device)
        attention = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, :len(sequence)] = sequence
            attention[row, :len(sequence)] = 1
        values = []
        for start in range(0, len(sequences), self.settings.micro_batch_size):
            end = start + self.settings.micro_batch_size
            values.append(reward_model(input_ids=ids[start:end], attention_mask=attention[start:end]).logits[:, 0])
        return torch.cat(values).float().cpu()

    def _reference_logps(self, model, batch) -> torch.Tensor:
        temperature = self.settings.sampling.temperature
        if self.reference is not None:
            return completion_logps(self.reference, batch, temperature)
        with model.disable_adapter():
            return completion_logps(model, batch, temperature)

    # ------------------------------------------------------------------ training
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["completion_mask"].sum())

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> TaskOutput:
        s = self.settings
        logps, entropy = completion_logps(model, batch, s.sampling.temperature, with_entropy=True)
        values = token_values(self.value_model, batch)
        mask = batch["completion_mask"].to(logps.dtype)
        policy = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, s.cliprange)
        value = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, s.cliprange_value)
        per_token = policy.per_token + s.vf_coef * value.per_token
        tokens = float(mask.sum())
        with torch.no_grad():
            ratio = float(masked_mean(torch.exp(logps - batch["old_logps"]), mask))
        # Token means weighted by this micro-batch's tokens: the loop divides by the step's tokens.
        sums = {"loss/policy": float(policy.per_token.detach().sum()), "loss/value": float(value.per_token.detach().sum()),
                **{key: v * tokens for key, v in (
                    ("policy/clip_frac", policy.metrics["clip_frac"]), ("policy/approx_kl", policy.metrics["approx_kl"]),
                    ("value/clip_frac", value.metrics["clip_frac"]), ("ratio", ratio),
                    ("entropy", float((entropy * mask).sum() / mask.sum().clamp(min=1.0))))}}
        return TaskOutput(loss_sum=per_token.sum(), metric_sums=sums)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, examples: list, batch_size: int, device) -> dict:
        """The scores of one completion per validation prompt, sampled as in training from a
        fixed seed, so evaluations at different steps draw alike."""
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(
            self.settings.seed * 1_000_003 - 1)
        scores, lengths, truncated = [], [], []
        for start in range(0, len(examples), batch_size):
            rows = examples[start:start + batch_size]
            rollout = self._sample(model, rows, generator)
            scores.append(self._scores(rollout, rows)[0])
            lengths.append(rollout.lengths.float().cpu())
            truncated.append(rollout.truncated.float().cpu())
        every = torch.cat(scores)
        return {"score": float(every.mean()), "score_std": float(every.std()) if every.numel() > 1 else 0.0,
                "completions/mean_length": float(torch.cat(lengths).mean()),
                "completions/eos_fraction": float(1 - torch.cat(truncated).mean())}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """The value model's trained weights and the KL coefficient."""
        trained = {name: p.detach().cpu().clone() for name, p in self.value_model.named_parameters() if p.requires_grad}
        return {"value_model": trained, "kl_controller": self.kl_controller.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "value_model" in state:
            names = {name for name, p in self.value_model.named_parameters() if p.requires_grad}
            missing = sorted(names - state["value_model"].keys())
            if missing:
                raise RuntimeError(f"ppo: the checkpoint lacks the value model's {missing[:3]}")
            self.value_model.load_state_dict(state["value_model"], strict=False)
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])

    def rank_state_dict(self) -> dict:
        """The rollout batch being trained on."""
        if self._experience is None:
            return {}
        return {"experience": {"step": self._experience_step, "rows": self._experience.rows,
                               "metrics": self._experience.metrics}}

    def load_rank_state_dict(self, state: dict) -> None:
        if "experience" in state:
            saved = state["experience"]
            device = next(self.value_model.parameters()).device
            self._experience = Experience({k: v.to(device) for k, v in saved["rows"].items()}, dict(saved["metrics"]))
            self._experience_step = int(saved["step"])


def copy_backbone(value_model: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Load the policy's decoder weights into the value model (all but its score head).

    A PEFT policy's base weights sit under `base_layer`; its adapters are not part of the
    decoder the value model starts from."""
    from soup.distributed import unwrap

    source = unwrap(policy)
    if hasattr(source, "get_base_model"):
        source = source.get_base_model()
    weights = {}
    for name, tensor in source.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        weights[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    target = value_model.state_dict()
    wanted = [name for name in target if not name.startswith("score.")]
    missing = [name for name in wanted if name not in weights or weights[name].shape != target[name].shape]
    if missing:
        raise ConfigError(f"task.value_init=policy: the policy has no weights for the value model's {missing[:3]}.\n"
                          "  fix: task.value_init=reward_model, or a policy whose decoder the value model shares.")
    value_model.load_state_dict({name: weights[name] for name in wanted}, strict=False)
