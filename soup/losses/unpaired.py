"""Unpaired preference losses (KTO, BCO) on rows {prompt, completion, desirable}.

Each row carries one completion and a binary label instead of a chosen/rejected pair.
Same conventions as preference.py: pure functions over per-sequence log-probs summed over
completion tokens, per-example losses, the caller reduces.

Notation, per row, shape [batch]: π policy log p(completion | prompt), r_ref the reference's,
r = π − r_ref the log-ratio, β = beta, σ = sigmoid.

Outputs: `UnpairedLossOutput.losses` is [batch]; `rewards` is β·r for every row, detached,
and `desirable` the row labels, so `chosen_rewards` / `rejected_rewards` (the desirable /
undesirable rows' rewards, variable length) can be summed and counted exactly across
micro-batches. `metrics` adds per-batch means "rewards/chosen", "rewards/rejected" (NaN
when the batch has no such row) and the counts "count/chosen", "count/rejected".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from soup.losses.registry import register_loss


@dataclass
class UnpairedLogps:
    """Per-sequence log-probs of a batch of labelled completions; every tensor [batch].

    logps: policy log p(completion | prompt), summed over completion tokens.
    tokens: completion lengths (float or long), each >= 1.
    desirable: bool, True for a good (chosen-like) completion.
    ref_logps: the same under the reference model (detached).
    kl_logps / kl_ref_logps: policy / reference log p(completion_j | prompt_i) for MISMATCHED
        pairs (completion of another row), the baseline of KTO's reference point; None when
        the loss does not use it. [kl_rows], one row per batch row, or those of every rank
        (gathered under data parallelism).
    """

    logps: Tensor
    tokens: Tensor
    desirable: Tensor
    ref_logps: Tensor
    kl_logps: Tensor | None = None
    kl_ref_logps: Tensor | None = None

    def __post_init__(self) -> None:
        if self.logps.dim() != 1:
            raise ValueError(f"UnpairedLogps.logps must be [batch], got shape {tuple(self.logps.shape)}")
        if self.desirable.dtype != torch.bool:
            raise ValueError(f"UnpairedLogps.desirable must be a bool tensor, got {self.desirable.dtype}")
        for name in ("tokens", "desirable", "ref_logps"):
            value = getattr(self, name)
            if value.shape != self.logps.shape:
                raise ValueError(f"UnpairedLogps.{name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self.logps.shape)} like logps")
        kl = [t for t in (self.kl_logps, self.kl_ref_logps) if t is not None]
        if kl and (len(kl) == 1 or kl[0].dim() != 1 or kl[0].shape != kl[1].shape or kl[0].numel() == 0):
            raise ValueError("UnpairedLogps.kl_logps and kl_ref_logps must be given together, as two non-empty "
                             f"[kl_rows] tensors; got shapes {[tuple(t.shape) for t in kl]}")


@dataclass
class UnpairedLossOutput:
    """What every unpaired loss returns.

    losses: [batch] per-row loss, differentiable; the caller reduces it.
    rewards: [batch] detached implicit reward β·(π − r_ref) of every row.
    desirable: [batch] bool, the row labels (a copy of the input's).
    metrics: detached scalars (see module doc).
    """

    losses: Tensor
    rewards: Tensor
    desirable: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    @property
    def chosen_rewards(self) -> Tensor:
        """[n_desirable] rewards of the desirable rows."""
        return self.rewards[self.desirable]

    @property
    def rejected_rewards(self) -> Tensor:
        """[n_undesirable] rewards of the undesirable rows."""
        return self.rewards[~self.desirable]


def _output(losses: Tensor, rewards: Tensor, desirable: Tensor, **metrics: Tensor) -> UnpairedLossOutput:
    rewards = rewards.detach()
    n_chosen = desirable.sum()
    n_rejected = (~desirable).sum()
    metrics = {k: v.detach() for k, v in metrics.items()}
    # Masked sums over counts: 0/0 gives NaN for an absent class, with no host sync.
    metrics["rewards/chosen"] = torch.where(desirable, rewards, 0).sum() / n_chosen
    metrics["rewards/rejected"] = torch.where(desirable, 0, rewards).sum() / n_rejected
    metrics["count/chosen"] = n_chosen
    metrics["count/rejected"] = n_rejected
    return UnpairedLossOutput(losses=losses, rewards=rewards, desirable=desirable, metrics=metrics)


@register_loss("kto", kind="unpaired", needs_reference=True,
               params=("beta", "desirable_weight", "undesirable_weight"))
def kto(logps: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> UnpairedLossOutput:
    """KTO, a prospect-theory value of each completion against a KL reference point (arXiv:2402.01306).

    r = π − r_ref
    z0 = max(0, mean_batch(kl_logps − kl_ref_logps)), detached
    desirable rows:   λD·(1 − σ(β(r − z0)))
    undesirable rows: λU·(1 − σ(β(z0 − r)))

    Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization": humans judge
    outcomes relative to a reference point and weigh losses more than gains; KTO needs only a
    good/bad label per completion, not pairs. The reference point z0 estimates
    KL(π ‖ π_ref) from mismatched (prompt_i, completion_j) pairs; it is clamped at 0 and
    carries no gradient, as in the paper. z0 is a mean over THIS batch: under data
    parallelism the paper's estimate averages over all devices, which the caller must do by
    gathering kl_logps − kl_ref_logps before calling if it wants that.

    Args:
        beta: inverse temperature, usually 0.01–0.5; default 0.1.
        desirable_weight: λD, default 1.0.
        undesirable_weight: λU, default 1.0. The paper advises
            λD·n_desirable / (λU·n_undesirable) in [1, 4/3].
    Shapes: every UnpairedLogps tensor [batch]; kl_logps and kl_ref_logps required
        -> losses, rewards [batch]. Metrics add "kl" (z0, scalar).
    """
    if logps.kl_logps is None or logps.kl_ref_logps is None:
        raise ValueError("loss 'kto' needs UnpairedLogps.kl_logps and kl_ref_logps (log-probs of "
                         "mismatched prompt/completion pairs under policy and reference)")
    logratio = logps.logps - logps.ref_logps
    z0 = (logps.kl_logps - logps.kl_ref_logps).mean().clamp(min=0).detach()
    desirable = logps.desirable
    desirable_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratio - z0)))
    undesirable_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return _output(losses, beta * logratio, desirable, kl=z0)


@register_loss("bco", kind="unpaired", needs_reference=True, params=("beta", "delta"))
def bco(logps: UnpairedLogps, *, beta: float = 0.1, delta: float = 0.0) -> UnpairedLossOutput:
    """BCO, a binary classifier whose logit is the implicit reward (arXiv:2404.04656).

    reward = β(π − r_ref)
    desirable rows:   −log σ(reward − δ)
    undesirable rows: −log σ(−(reward − δ))

    Jung et al., "Binary Classifier Optimization for Large Language Model Alignment": train
    the implicit reward as a classifier of good vs bad completions; shifting by δ, the running
    mean of the rewards, is the paper's reward shift that tightens the link to the DPO loss.
    The caller keeps δ in a `RunningMean` (updated with the detached rewards each step and
    saved with the checkpoint) and passes `delta=running_mean.value`. The paper's
    underlying-distribution-matching density ratio is not included.

    Args:
        beta: inverse temperature, usually 0.01–0.5; default 0.1.
        delta: reward shift δ; default 0 (start of training).
    Shapes: logps, ref_logps, desirable [batch] -> losses, rewards [batch].
    """
    rewards = beta * (logps.logps - logps.ref_logps)
    shifted = rewards - delta
    losses = torch.where(logps.desirable, -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
    return _output(losses, rewards, logps.desirable)


class RunningMean:
    """Exact mean of every value seen so far: BCO's reward shift δ.

    `update(values)` folds in a tensor (any shape) of detached rewards; `value` is the mean
    of all values ever passed (0.0 before the first update). The state is two Python numbers
    (float64 mean, int count), so `state_dict()` / `load_state_dict()` resume bit-exactly.
    Under data parallelism, gather the rewards of all ranks before `update` so every rank
    holds the same δ.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0

    def update(self, values: Tensor) -> None:
        values = values.detach().reshape(-1).to(torch.float64)
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        total = self.count + n
        self.mean += (batch_mean - self.mean) * (n / total)
        self.count = total

    @property
    def value(self) -> float:
        return self.mean

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean = float(state["mean"])
        self.count = int(state["count"])
