"""The Bradley-Terry loss of an outcome reward model, as a pure function of scalar rewards.

A reward model maps (prompt, completion) to one scalar r. Trained on preference pairs it
should score the chosen completion above the rejected one; under the Bradley-Terry model
P(chosen > rejected) = sigmoid(r_c - r_r), so the loss is that pair's negative log-likelihood
(InstructGPT, arXiv 2203.02155, eq. 1):

    rc, rr   (B,)  rewards of the chosen and rejected completions, with gradient
    m        (B,)  optional per-pair margin (>= 0 by convention), no gradient
    loss_i = -log sigmoid(rc_i - rr_i - m_i)  +  eta * (rc_i + rr_i)^2

- The margin (Llama 2, arXiv 2307.09288, eq. 2) asks the chosen reward to beat the rejected one
  by m_i, larger for pairs the annotators rated as clearly better; no margin is m = 0.
- The centring term (Eisenstein et al. 2023, "Helping or Herding? Reward Model Ensembles Mitigate
  but do not Eliminate Reward Hacking", arXiv 2312.09244) is added only when eta
  (`center_rewards_coefficient`) is set. The Bradley-Terry likelihood sees only differences, so the
  rewards' offset drifts freely; penalising (rc + rr)^2 pulls every pair's mean to zero, which
  keeps rewards comparable across checkpoints and ensemble members.

Losses are per pair so the caller picks the reduction (see soup/losses/preference.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RewardModelLossOutput:
    """What bradley_terry_loss returns.

    losses: (B,) per-pair loss, differentiable; the caller reduces it.
    metrics: detached 0-dim tensors (left on the device, so logging them costs no sync here):
        accuracy         share of pairs with rc > rr, a tie counting 0.5 (see bradley_terry_loss)
        margin           mean of rc - rr (without the target margin m)
        chosen_reward    mean rc
        rejected_reward  mean rr
    """

    losses: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None,
                       center_rewards_coefficient: float | None = None) -> RewardModelLossOutput:
    """Per-pair Bradley-Terry loss with an optional margin and centring term (module docstring).

    Args:
        chosen_rewards, rejected_rewards: (B,) scalar rewards, any float dtype.
        margin: (B,) per-pair target margin, or one float for every pair; None means 0.
        center_rewards_coefficient: eta >= 0 of the centring term; None (or 0) leaves it out.
            Keep it small (e.g. 0.01) so it only anchors the offset and does not fight the ranking.

    -log sigmoid(x) is computed as -logsigmoid(x), which is finite for any finite x
    (log(sigmoid(x)) underflows to log(0) = -inf once x < -~100 in float32).

    Accuracy counts a tie (rc == rr) as half right: a model that scores everything alike is
    then at chance, 0.5, like its loss at log 2, instead of looking worse than a coin flip.
    """
    if chosen_rewards.ndim != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen_rewards and rejected_rewards must both be (B,), got shapes "
                         f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
        raise ValueError(f"center_rewards_coefficient={center_rewards_coefficient} must be >= 0 "
                         "(a negative weight would reward drifting away from zero)")
    difference = chosen_rewards - rejected_rewards
    target = difference
    if margin is not None:
        margin = torch.as_tensor(margin, dtype=difference.dtype, device=difference.device)
        if margin.ndim not in (0, 1) or (margin.ndim == 1 and margin.shape != difference.shape):
            raise ValueError(f"margin must be a float or (B,) = {tuple(difference.shape)}, "
                             f"got shape {tuple(margin.shape)}")
        # The margin is data (how much better the annotators rated the chosen answer), never trained.
        target = difference - margin.detach()
    losses = -F.logsigmoid(target)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2

    with torch.no_grad():
        wins = (difference > 0).to(difference.dtype) + 0.5 * (difference == 0).to(difference.dtype)
        metrics = {
            "accuracy": wins.mean(),
            "margin": difference.mean(),
            "chosen_reward": chosen_rewards.mean(),
            "rejected_reward": rejected_rewards.mean(),
        }
    return RewardModelLossOutput(losses, {name: value.detach() for name, value in metrics.items()})
