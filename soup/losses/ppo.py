"""PPO (RLHF) and RLOO, as pure functions over per-token log-probs, values and rewards.

PPO for language models: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
(arXiv 1909.08593); the details that make it work: Huang et al. 2024, "The N+ Implementation Details
of RLHF with PPO" (arXiv 2403.17031). RLOO: Ahmadian et al. 2024, "Back to Basics: Revisiting
REINFORCE Style Optimization for Learning from Human Feedback in LLMs" (arXiv 2402.14740).

One generation batch holds B completions of T tokens (right-padded):

    score          (B,)    the reward model's scalar for each completion
    logps          (B, T)  log pi_theta(y_t | x, y_<t) of each sampled token (with gradient in the loss)
    old_logps      (B, T)  the same under the policy that generated the batch (no gradient)
    ref_logps      (B, T)  the same under the frozen reference policy (for the KL penalty)
    values         (B, T)  the value head's V(s_t) (with gradient in the loss)
    old_values     (B, T)  the same when the batch was generated (no gradient)
    mask           (B, T)  1 on real completion tokens, 0 on padding; every row has >= 1 real token

PPO, one step at a time (each a function here, pinned by tests/unit/losses/test_ppo.py):

1. per_token_kl: KL_t between the policy and the reference, per sampled token:
     k1: logps - ref_logps                          (unbiased, can be negative)
     k3: exp(ref - logps) - (ref - logps) - 1       (unbiased, >= 0; Schulman's "Approximating KL")
2. ppo_rewards: r_t = -kl_coef * KL_t on every token, plus the score on the last real token
   (Ziegler et al. eq. 2: R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x)), spread over the tokens).
3. gae: generalised advantage estimation (Schulman et al. 2015, arXiv 1506.02438)
     delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   returns_t = A_t + V_t
   with V and A past the last real token taken as 0 (the episode ends there).
   Huang et al. whiten the advantages before the loss: masked_whiten(advantages, mask).
4. clipped_policy_loss: l_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = exp(logps - old_logps).
5. clipped_value_loss: l_t = 0.5 max((V_t - R_t)^2, (clip(V_t, V_old - c, V_old + c) - R_t)^2).
6. explained_variance: 1 - Var(R - V) / Var(R), a health metric of the value head.
7. the KL coefficient comes from a controller: FixedKLController or AdaptiveKLController
   (Ziegler et al. sec. 2.2: e = clip(KL / KL_target - 1, -0.2, 0.2), beta <- beta (1 + e n_steps / horizon)).

RLOO replaces the value head by the other samples of the same prompt. B = P x k rows, grouped
contiguously (rows 0..k-1 answer prompt 0, and so on):

8. rloo_rewards: R_i = score_i - kl_coef * sum_t KL_t, the KL penalty at the sequence level (arXiv 2402.14740 sec. 3).
9. rloo_advantages: A_i = R_i - mean_{j != i in the group} R_j = k / (k - 1) * (R_i - mean_group R),
   broadcast over the completion's tokens and trained with clipped_policy_loss (which takes (B,) advantages).

Every function reduces over real tokens only: padding never moves a statistic, and padded
positions of every (B, T) output are 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

KL_ESTIMATORS = ("k1", "k3")


# --- masked statistics ----------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask is 1: a scalar, or reduced along `dim` when given."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim) / mask.sum(dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the entries where mask is 1 (a scalar).

    unbiased=True applies Bessel's correction n / (n - 1) with n the number of real entries,
    so it needs n >= 2."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = mask.sum()
        if count < 2:
            raise ValueError(f"the unbiased variance needs at least 2 real entries, got {int(count)}")
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the real entries (unbiased variance); padded positions are 0.

    shift_mean=False scales to unit variance but keeps the original mean (as OpenAI's
    lm-human-preferences whitens rewards: centring them would change what "no reward" means)."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


# --- step 1-2: KL penalty and per-token rewards -------------------------------------------------------
def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                 estimator: str = "k1") -> torch.Tensor:
    """(B, T) per-token estimate of KL(pi_theta || pi_ref) from the sampled tokens, 0 on padding.

    k1 = logps - ref_logps is what Ziegler et al. put in the reward; k3 is always >= 0 with lower
    variance when the two policies are close."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}; expected one of {KL_ESTIMATORS}")
    log_ratio = logps - ref_logps
    if estimator == "k1":
        kl = log_ratio
    else:
        kl = torch.exp(-log_ratio) + log_ratio - 1
    return kl * mask.to(kl.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row."""
    if not bool((mask.sum(-1) > 0).all()):
        raise ValueError("every row of mask needs at least one real token")
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * (mask != 0)).amax(-1)


@torch.no_grad()  # rewards are targets, never differentiated
def ppo_rewards(score: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                kl_coef: float, estimator: str = "k1") -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, non_score_reward), both (B, T), 0 on padding.

    non_score_reward_t = -kl_coef * KL_t; rewards = non_score_reward plus score (B,) on the last
    real token of each row (the reward model judges the whole completion, once)."""
    non_score_reward = -kl_coef * per_token_kl(logps, ref_logps, mask, estimator)
    rewards = non_score_reward.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += score.to(rewards.dtype)
    return rewards, non_score_reward


# --- step 3: advantages --------------------------------------------------------------------------------
@torch.no_grad()  # advantages and returns are targets: no gradient may flow into them
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T), 0 on padding (module docstring, step 3).

    Huang et al. use gamma = 1 (the only reward that is not a KL term comes at the end) and lam = 0.95."""
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # masking here makes V and A past the last real token 0, whatever the padding holds
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantage
    returns = (advantages + values) * mask
    return advantages, returns


# --- step 4-6: losses and the value head's health -------------------------------------------------------
@dataclass
class PPOLossOutput:
    per_token: torch.Tensor  # (B, T), zero where mask is 0; reduce it with the caller's rule
    # Masked token means, detached: clip_frac (share of real tokens where the clipped term was the
    # active one, i.e. their gradient is 0) and, for the policy, two estimates of KL(old || new) from
    # tokens sampled by the old policy: approx_kl = mean 0.5 (logps - old)^2 (k2) and kl_k1 = mean (old - logps).
    metrics: dict[str, float] = field(default_factory=dict)


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float = 0.2) -> PPOLossOutput:
    """PPO's clipped surrogate per token: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) (arXiv 1707.06347 eq. 7).

    advantages: (B, T) per token (GAE) or (B,) per completion (RLOO), broadcast over its tokens."""
    mask = mask.to(logps.dtype)
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logps.dtype)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    per_token = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        metrics = {
            "clip_frac": float(masked_mean((clipped > unclipped).to(mask.dtype), mask)),
            "approx_kl": float(masked_mean(0.5 * log_ratio**2, mask)),
            "kl_k1": float(masked_mean(-log_ratio, mask)),
        }
    return PPOLossOutput(per_token * mask, metrics)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float = 0.2) -> PPOLossOutput:
    """0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2) per token.

    The max keeps the more pessimistic loss, so clipping never lets the value head move
    further than c from V_old in one batch when that move would look better (Huang et al. detail)."""
    mask = mask.to(values.dtype)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped, clipped)
    with torch.no_grad():
        metrics = {"clip_frac": float(masked_mean((clipped > unclipped).to(mask.dtype), mask))}
    return PPOLossOutput(per_token * mask, metrics)


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the real tokens.

    1: the values predict the returns; 0: no better than their mean; < 0: worse than it.
    nan when the returns are all equal (nothing to explain)."""
    var_returns = masked_var(returns, mask)
    if var_returns == 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_returns)


# --- step 7: the KL coefficient ------------------------------------------------------------------------
class FixedKLController:
    """A constant KL coefficient; `update` does nothing (same interface as AdaptiveKLController)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. 2019 sec. 2.2: steer the KL towards `target` with a proportional controller.

        e = clip(current_kl / target - 1, -0.2, 0.2),    value <- value * (1 + e * n_steps / horizon)

    current_kl: the batch's KL(pi || ref) summed over a completion's tokens, averaged over completions
    (the quantity `target` is set in, e.g. 6 nats in the paper); n_steps: completions in the batch;
    horizon: the timescale, in completions (10,000 in the paper). The error is clipped so a
    single bad batch moves the coefficient by at most 20% of n_steps / horizon."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        # only the coefficient is state; target and horizon are config, read from the run's flags on resume
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


# --- RLOO ---------------------------------------------------------------------------------------------
@torch.no_grad()  # rewards are targets, never differentiated
def rloo_rewards(score: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                 kl_coef: float, estimator: str = "k1") -> torch.Tensor:
    """(B,) score_i - kl_coef * sum_t KL_t over the real tokens of row i (module docstring, step 8).

    RLOO treats the whole completion as one action, so the KL penalty is the sequence's
    log-ratio log pi(y|x) - log pi_ref(y|x) (k1), not a per-token reward."""
    kl = per_token_kl(logps, ref_logps, mask, estimator).sum(-1)
    return score.to(kl.dtype) - kl_coef * kl


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) A_i = R_i - mean of the other k - 1 rewards of its group; B = P x k, grouped contiguously.

    Equivalently A_i = k / (k - 1) * (R_i - mean of the group): the leave-one-out baseline is
    independent of R_i, so the policy gradient stays unbiased (arXiv 2402.14740 eq. 8)."""
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt (the baseline is the others' mean), got k={k}")
    if rewards.ndim != 1 or rewards.numel() % k:
        raise ValueError(f"rewards must be (P x {k},), got shape {tuple(rewards.shape)}")
    grouped = rewards.view(-1, k)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others_mean).reshape(-1)
