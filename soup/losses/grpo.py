"""The GRPO family of policy-gradient objectives, as pure functions over per-token log-probs.

One generation batch holds P prompts x G completions each, grouped contiguously
(completions 0..G-1 answer prompt 0, and so on): B = P x G rows of T completion tokens.

    rewards        (B,)    one scalar per completion (the weighted sum of the reward functions)
    logps          (B, T)  log pi_theta(y_t | x, y_<t) of each sampled token, with gradient
    old_logps      (B, T)  the same under the policy that generated the batch (no gradient)
    ref_logps      (B, T)  the same under the reference policy (for the KL term)
    sampler_logps  (B, T)  what the sampler reported while generating (truncated IS)
    mask           (B, T)  1 on completion tokens that train, 0 on padding

Three steps, each a function here, each pinned by tests against hand-computed values
(tests/unit/losses/test_grpo.py):

1. group_advantages: A_i = (r_i - mean(r_group(i))) / (std + eps)   (GRPO, arXiv 2402.03300)
   with the std over the group (`scale="group"`), over the whole batch ("batch",
   the group mean with a batch std, arXiv 2508.08221) or not at all ("none": Dr. GRPO,
   arXiv 2503.20783, which shows the group std re-weights questions by difficulty). A group whose
   rewards are all equal gets A = 0: it carries no signal.

2. policy_loss: per-token loss l_t with the ratio rho_t = exp(logps - old_logps)
   - "clip" (PPO/GRPO): l_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A)
     eps_high > eps is DAPO's clip-higher (arXiv 2503.14476); `delta` caps rho_t
     itself from above before the min (two-sided clipping, INTELLECT-2, arXiv 2505.07291);
     importance_sampling_level="sequence" replaces rho_t by the sequence's
     length-normalised ratio exp(mean_t(logps - old_logps)) (GSPO, arXiv 2507.18071).
   - "cispo" (MiniMax-M1, arXiv 2506.13585): l_t = -sg(min(rho_t, 1 + eps_high)) A logps_t,
     a clipped, stop-gradient importance weight on REINFORCE, so no token's gradient is dropped.
   - "rft" (rejection-sampling fine-tuning, arXiv 2308.01825): l_t = -A logps_t with A in {0, 1}
     marking the completions kept (the task keeps each group's best; see rft_keep): supervised
     fine-tuning on the policy's own best samples, no ratio.
   - off-policy sequence masking (DeepSeek-V3.2, arXiv 2512.02556, eq. 9; off_policy_mask_threshold):
     a completion with A < 0 whose mean per-token KL(behaviour || policy) = mean_t(behaviour - logps)
     exceeds the threshold is dropped; the behaviour log-probs are the sampler's.
   - + beta * KL_t with the k3 estimator KL_t = exp(ref - logps) - (ref - logps) - 1 (unbiased, >= 0).
   - truncated importance sampling against the sampler (tis_threshold; Yao et al. 2025, "Your
     efficient RL framework secretly brings you off-policy RL training"): l_t *= min(exp(old - sampler), C),
     correcting the mismatch between the sampler's and the trainer's numerics.

3. reduce_loss: how per-token losses become one number (`loss_type`), returned as
   (loss_sum, units) so the loop's rule (a step's loss is the sum of its micro-batches'
   loss_sum over the units of the whole step, counted before the forward) gives each
   paper's normalisation:
     grpo     mean over sequences of each sequence's token mean    units: sequences
     bnpo     token mean of each micro-batch, averaged              units: 1 per micro-batch
     dr_grpo  token sum / (max_completion_length x sequences)       units: sequences
     dapo     token sum / tokens of the whole generation batch      units: tokens
     sequence mean over sequences of each sequence's token SUM      units: sequences
              (REINFORCE on log pi(y|x) = sum_t log pi(y_t|...), as RLOO, arXiv 2402.14740)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "sequence")
SCALES = ("group", "batch", "none")
OBJECTIVES = ("clip", "cispo", "rft")
IS_LEVELS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """(B,) advantages from (B,) rewards of B = P x group_size completions, grouped contiguously.

    The std is the unbiased one (as the GRPO paper and TRL compute it)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; expected one of {SCALES}")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be (P x {group_size},), got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    else:
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
    return (centred / (std + eps)).reshape(-1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: groups whose completions all scored the same (their advantages are 0)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def rft_keep(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) 1.0 for the completions RFT trains on: those scoring their group's best reward,
    in groups whose rewards differ (a uniform group says nothing about which sample is better)."""
    grouped = rewards.view(-1, group_size)
    best = grouped == grouped.max(dim=1, keepdim=True).values
    return (best & ~zero_std_groups(rewards, group_size).unsqueeze(1)).to(rewards.dtype).reshape(-1)


def off_policy_mask(advantages: torch.Tensor, logps: torch.Tensor, behaviour_logps: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """(B, 1) 0.0 for completions to drop: A < 0 and mean_t(behaviour - logps) > threshold
    (DeepSeek-V3.2's off-policy sequence mask), 1.0 otherwise. No gradient."""
    mask = mask.to(logps.dtype)
    kl = ((behaviour_logps - logps.detach()) * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    keep = (advantages >= 0) | (kl <= threshold)
    return keep.to(logps.dtype).unsqueeze(-1)


@dataclass
class PolicyLossOutput:
    per_token: torch.Tensor  # (B, T), zero where mask is 0
    # Masked token means, detached: clip_ratio/low_mean, high_mean, region_mean (fractions of tokens
    # whose ratio the clip cut), kl (when beta > 0), is_weight (with truncated IS).
    metrics: dict[str, float] = field(default_factory=dict)


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    objective: str = "clip",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    sampler_logps: torch.Tensor | None = None,
    tis_threshold: float | None = None,
    off_policy_mask_threshold: float | None = None,
) -> PolicyLossOutput:
    """Per-token losses of the GRPO family (module docstring, step 2). Shapes: (B, T), advantages (B,)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}; expected one of {OBJECTIVES}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r}; expected one of {IS_LEVELS}")
    mask = mask.to(logps.dtype)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(logps)
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1).to(logps.dtype)

    if objective == "clip":
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
        per_token = -torch.min(capped * adv, clipped * adv)
    elif objective == "cispo":
        weight = torch.clamp(ratio, max=1 + eps_high).detach()
        per_token = -weight * adv * logps
    else:
        per_token = -adv * logps

    metrics: dict[str, float] = {}
    if off_policy_mask_threshold is not None:
        behaviour = sampler_logps if sampler_logps is not None else old_logps
        keep = off_policy_mask(advantages, logps, behaviour, mask, off_policy_mask_threshold)
        per_token = per_token * keep
        metrics["off_policy_masked"] = float(1 - keep.mean())
    if sampler_logps is not None and tis_threshold is not None:
        is_weight = torch.clamp(torch.exp(old_logps - sampler_logps), max=tis_threshold).detach()
        per_token = per_token * is_weight
        metrics["is_weight"] = _masked_mean(is_weight, mask)
    if beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl, mask)

    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        metrics["clip_ratio/low_mean"] = _masked_mean(low.to(mask.dtype), mask)
        metrics["clip_ratio/high_mean"] = _masked_mean(high.to(mask.dtype), mask)
        metrics["clip_ratio/region_mean"] = _masked_mean((low | high).to(mask.dtype), mask)
    return PolicyLossOutput(per_token * mask, metrics)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float((values.detach() * mask).sum() / mask.sum().clamp(min=1.0))


@dataclass
class Reduction:
    loss_sum: torch.Tensor  # scalar; the step's loss is the sum over its micro-batches / the step's units
    units: float


def loss_units(mask: torch.Tensor, loss_type: str) -> float:
    """How many units a micro-batch with this completion mask counts for (before any forward)."""
    if loss_type in ("grpo", "dr_grpo", "sequence"):
        return float(mask.shape[0])
    if loss_type == "bnpo":
        return 1.0
    if loss_type == "dapo":
        return float(mask.sum())
    raise ValueError(f"loss_type={loss_type!r}; expected one of {LOSS_TYPES}")


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
                max_completion_length: int | None = None) -> Reduction:
    """(loss_sum, units) of a micro-batch under `loss_type` (module docstring, step 3)."""
    mask = mask.to(per_token.dtype)
    units = loss_units(mask, loss_type)
    masked = per_token * mask
    if loss_type == "grpo":
        loss_sum = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    elif loss_type == "bnpo":
        loss_sum = masked.sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        if not max_completion_length:
            raise ValueError("loss_type=dr_grpo needs max_completion_length")
        loss_sum = masked.sum() / max_completion_length
    else:
        loss_sum = masked.sum()
    return Reduction(loss_sum, units)
