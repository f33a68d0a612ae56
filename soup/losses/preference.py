"""Paired preference losses: DPO and its loss types, SimPO, CPO, ORPO.

Every loss is a pure function of per-sequence log-probabilities (no model inside), takes a
`PairedLogps` plus keyword-only hyper-parameters, and returns per-example losses so the
caller picks the reduction (sum over the optimizer step / number of pairs, see sft.py).

Notation used in every docstring below, all per example, shape [batch]:
    πc, πr   policy log p(chosen | prompt), log p(rejected | prompt), SUMMED over completion tokens
    rc, rr   the same under the frozen reference model
    |yc|, |yr|  completion lengths in tokens
    h = (πc − rc) − (πr − rr)   the DPO implicit-reward margin (before β)
    σ = sigmoid, β = beta, ε = label_smoothing
Rewards are β(πc − rc) and β(πr − rr) unless a docstring says otherwise; they are detached
and are what the caller logs as rewards/chosen, rewards/rejected, margins and accuracies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from soup.errors import ConfigError
from soup.losses.registry import register_loss


@dataclass
class PairedLogps:
    """Per-sequence log-probs of a batch of (prompt, chosen, rejected) triples; every tensor [batch].

    chosen / rejected: policy log p(completion | prompt), summed over completion tokens.
    chosen_tokens / rejected_tokens: completion lengths (float or long), each >= 1.
    ref_chosen / ref_rejected: the same for the reference model (detached); None for
    reference-free losses.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None

    def __post_init__(self) -> None:
        if self.chosen.dim() != 1:
            raise ValueError(f"PairedLogps.chosen must be [batch], got shape {tuple(self.chosen.shape)}")
        for name in ("rejected", "chosen_tokens", "rejected_tokens", "ref_chosen", "ref_rejected"):
            value = getattr(self, name)
            if value is not None and value.shape != self.chosen.shape:
                raise ValueError(f"PairedLogps.{name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(self.chosen.shape)} like chosen")


@dataclass
class PreferenceLossOutput:
    """What every paired loss returns.

    losses: [batch] per-example loss, differentiable; the caller reduces it.
    chosen_rewards / rejected_rewards: [batch], detached implicit rewards (see module doc).
    metrics: extra detached scalars or [batch] tensors, named per loss.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _reference(logps: PairedLogps, loss: str) -> tuple[Tensor, Tensor]:
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(f"loss '{loss}' needs reference log-probs: PairedLogps.ref_chosen and "
                         f"ref_rejected are None (the task must run the reference model)")
    return logps.ref_chosen, logps.ref_rejected


def _logratios(logps: PairedLogps, loss: str) -> tuple[Tensor, Tensor]:
    """(πc − rc, πr − rr), each [batch]."""
    ref_chosen, ref_rejected = _reference(logps, loss)
    return logps.chosen - ref_chosen, logps.rejected - ref_rejected


def _per_token(summed: Tensor, tokens: Tensor) -> Tensor:
    return summed / tokens.to(summed.dtype)


def _smoothed_logistic(x: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε) log σ(x) − ε log σ(−x): the logistic loss against a label flipped with probability ε."""
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def _check_smoothing(label_smoothing: float, loss: str, *, below: float = 0.5, allow_equal: bool = True) -> None:
    ok = 0.0 <= label_smoothing <= below if allow_equal else 0.0 <= label_smoothing < below
    if not ok:
        bound = "<=" if allow_equal else "<"
        raise ConfigError(f"loss '{loss}': label_smoothing={label_smoothing} must satisfy 0 <= ε {bound} {below}.\n"
                          f"  fix: set label_smoothing to the assumed label-noise rate, e.g. 0.1")


def _output(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor,
            **metrics: Tensor) -> PreferenceLossOutput:
    return PreferenceLossOutput(losses=losses, chosen_rewards=chosen_rewards.detach(),
                                rejected_rewards=rejected_rewards.detach(),
                                metrics={k: v.detach() for k, v in metrics.items()})


def chosen_nll(logps: PairedLogps) -> Tensor:
    """Per-token negative log-likelihood of the chosen completion: −πc / |yc|, shape [batch].

    The SFT term of CPO and ORPO, and the RPO term (Pang et al., arXiv:2404.19733) the task
    adds as `rpo_alpha * chosen_nll(logps)` to any DPO variant. Differentiable.
    """
    return -_per_token(logps.chosen, logps.chosen_tokens)


# ----------------------------------------------------------------------------- DPO loss types


@register_loss("sigmoid", kind="paired", needs_reference=True, params=("beta", "label_smoothing"))
def dpo_sigmoid(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """DPO, the logistic (Bradley-Terry) loss on the implicit-reward margin (arXiv:2305.18290).

    loss = −(1−ε) log σ(βh) − ε log σ(−βh)

    Rafailov et al., "Direct Preference Optimization": the optimal policy of KL-regularised
    reward maximisation defines a reward β log π/π_ref, so fitting Bradley-Terry on it trains
    the policy directly. ε > 0 is conservative DPO (cDPO, Mitchell 2023): the label is assumed
    flipped with probability ε, which stops the margin growing without bound.
    With policy == reference the loss is log 2 for any β, ε.

    Args:
        beta: inverse temperature / KL strength, usually 0.01–0.5; default 0.1.
        label_smoothing: ε in [0, 0.5]; default 0 (plain DPO).
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    _check_smoothing(label_smoothing, "sigmoid")
    chosen_lr, rejected_lr = _logratios(logps, "sigmoid")
    margin = chosen_lr - rejected_lr
    losses = _smoothed_logistic(beta * margin, label_smoothing)
    return _output(losses, beta * chosen_lr, beta * rejected_lr)


@register_loss("hinge", kind="paired", needs_reference=True, params=("beta",))
def dpo_hinge(logps: PairedLogps, *, beta: float = 0.1) -> PreferenceLossOutput:
    """SLiC-style hinge loss on the implicit-reward margin (arXiv:2305.10425).

    loss = relu(1 − βh)

    Zhao et al., "SLiC-HF": a max-margin calibration loss; once the margin h exceeds 1/β the
    pair contributes no gradient, so β sets the target margin 1/β in log-prob units.

    Args:
        beta: inverse margin, usually 0.01–0.5; default 0.1 (target margin h = 10 nats).
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    chosen_lr, rejected_lr = _logratios(logps, "hinge")
    losses = torch.relu(1 - beta * (chosen_lr - rejected_lr))
    return _output(losses, beta * chosen_lr, beta * rejected_lr)


@register_loss("ipo", kind="paired", needs_reference=True, params=("beta",))
def dpo_ipo(logps: PairedLogps, *, beta: float = 0.1) -> PreferenceLossOutput:
    """IPO, squared regression of the length-averaged margin onto 1/(2β) (arXiv:2310.12036).

    h̄ = (πc − rc)/|yc| − (πr − rr)/|yr|        (per-token averages, not sums)
    loss = (h̄ − 1/(2β))²

    Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (Eq. 17): DPO's logistic loss keeps pushing deterministic preferences to an
    infinite margin; IPO regresses the margin to a finite target, so β regularises even when
    the data are noiseless. Averaging over tokens (as TRL and the IPO authors' follow-ups do)
    keeps the target comparable across lengths. With policy == reference the loss is 1/(4β²).

    Args:
        beta: τ in the paper; the target margin is 1/(2β). Usually 0.01–1; default 0.1.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses [batch].
    Rewards: β·(πc − rc)/|yc| and β·(πr − rr)/|yr|, the per-token quantities the loss compares.
    """
    chosen_lr, rejected_lr = _logratios(logps, "ipo")
    chosen_avg = _per_token(chosen_lr, logps.chosen_tokens)
    rejected_avg = _per_token(rejected_lr, logps.rejected_tokens)
    losses = (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2
    return _output(losses, beta * chosen_avg, beta * rejected_avg)


@register_loss("robust", kind="paired", needs_reference=True, params=("beta", "label_smoothing"))
def dpo_robust(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """Robust DPO, an unbiased loss under labels flipped with known rate ε (arXiv:2403.00409).

    loss = (−(1−ε) log σ(βh) + ε log σ(−βh)) / (1 − 2ε)

    Chowdhury et al., "Provably Robust DPO": if each preference is flipped with probability
    ε, the expectation of this loss over the noise equals the clean DPO loss. Unlike cDPO the
    ε-term enters with a plus sign. ε = 0 is exactly DPO (`sigmoid`).

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
        label_smoothing: the flip rate ε, in [0, 0.5) (the loss divides by 1 − 2ε); default 0.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    _check_smoothing(label_smoothing, "robust", allow_equal=False)
    chosen_lr, rejected_lr = _logratios(logps, "robust")
    logits = beta * (chosen_lr - rejected_lr)
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits)
              + label_smoothing * F.logsigmoid(-logits)) / (1 - 2 * label_smoothing)
    return _output(losses, beta * chosen_lr, beta * rejected_lr)


@register_loss("exo_pair", kind="paired", needs_reference=True, params=("beta", "label_smoothing"))
def dpo_exo_pair(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """EXO, reverse KL from the label distribution to the model's preference (arXiv:2402.00856).

    p = σ(βh), q = (1 − ε, ε) with ε = label_smoothing, or 1e-3 when label_smoothing == 0
    loss = KL(p ‖ q) = σ(βh)(log σ(βh) − log(1−ε)) + σ(−βh)(log σ(−βh) − log ε)

    Ji et al., "Towards Efficient Exact Optimization of Language Model Alignment" (pairwise
    case): DPO minimises the forward KL, which is mean-seeking; EXO minimises the reverse KL,
    which is mode-seeking like RLHF's objective. ε must be > 0 or log ε is −∞, hence the
    1e-3 fallback.

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
        label_smoothing: ε in [0, 0.5]; 0 means ε = 1e-3. Default 0.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    _check_smoothing(label_smoothing, "exo_pair")
    eps = label_smoothing if label_smoothing > 0 else 1e-3
    chosen_lr, rejected_lr = _logratios(logps, "exo_pair")
    logits = beta * (chosen_lr - rejected_lr)
    losses = (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
              + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps)))
    return _output(losses, beta * chosen_lr, beta * rejected_lr)


@register_loss("nca_pair", kind="paired", needs_reference=True, params=("beta",))
def dpo_nca_pair(logps: PairedLogps, *, beta: float = 0.1) -> PreferenceLossOutput:
    """NCA, noise-contrastive alignment on absolute rewards (arXiv:2402.05369).

    loss = −log σ(β(πc − rc)) − ½ log σ(−β(πc − rc)) − ½ log σ(−β(πr − rr))

    Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards": DPO
    only fixes the reward difference, so both likelihoods may fall together; NCA scores each
    response's own reward against a noise baseline, which keeps the chosen likelihood from
    decreasing.

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    chosen_lr, rejected_lr = _logratios(logps, "nca_pair")
    chosen_r, rejected_r = beta * chosen_lr, beta * rejected_lr
    losses = -F.logsigmoid(chosen_r) - 0.5 * F.logsigmoid(-chosen_r) - 0.5 * F.logsigmoid(-rejected_r)
    return _output(losses, chosen_r, rejected_r)


@register_loss("bco_pair", kind="paired", needs_reference=True, params=("beta", "delta"))
def dpo_bco_pair(logps: PairedLogps, *, beta: float = 0.1, delta: float = 0.0) -> PreferenceLossOutput:
    """BCO on pairs, a binary classifier of chosen vs rejected rewards (arXiv:2404.04656).

    loss = −log σ(β(πc − rc) − δ) − log σ(−(β(πr − rr) − δ))

    Jung et al., "Binary Classifier Optimization for Large Language Model Alignment": train
    the implicit reward as the logit of "this response is good", shifted by δ, the running
    mean of all rewards, which the paper shows tightens the bound on the DPO loss.
    The caller keeps δ (e.g. `soup.losses.unpaired.RunningMean` updated with both reward
    tensors each step, checkpointed with the run) and passes its value in.

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
        delta: reward shift δ, the running mean of β·log-ratios; default 0 (start of training).
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    chosen_lr, rejected_lr = _logratios(logps, "bco_pair")
    chosen_r, rejected_r = beta * chosen_lr, beta * rejected_lr
    losses = -F.logsigmoid(chosen_r - delta) - F.logsigmoid(-(rejected_r - delta))
    return _output(losses, chosen_r, rejected_r)


@register_loss("sppo_hard", kind="paired", needs_reference=True, params=("beta",))
def dpo_sppo_hard(logps: PairedLogps, *, beta: float = 0.1) -> PreferenceLossOutput:
    """SPPO with hard labels: regress each log-ratio onto ±1/(2β) (arXiv:2405.00675).

    loss = (πc − rc − 1/(2β))² + (πr − rr + 1/(2β))²

    Wu et al., "Self-Play Preference Optimization": the self-play update targets
    log π/π_ref = η(P(y wins) − ½); with hard win probabilities 1 and 0 and η = 1/β this is
    a square loss pulling the chosen log-ratio up to +1/(2β) and the rejected one down to
    −1/(2β), each independently. With policy == reference the loss is 1/(2β²).

    Args:
        beta: 1/η of the paper (the targets are ±η/2 = ±1/(2β)); default 0.1.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    chosen_lr, rejected_lr = _logratios(logps, "sppo_hard")
    target = 1 / (2 * beta)
    losses = (chosen_lr - target) ** 2 + (rejected_lr + target) ** 2
    return _output(losses, beta * chosen_lr, beta * rejected_lr)


@register_loss("aot", kind="paired", needs_reference=True, params=("beta", "label_smoothing"))
def dpo_aot(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """AOT paired: distributional alignment via optimal transport on sorted margins (arXiv:2406.05882).

    Δ = sort(πc − πr) − sort(rc − rr)      (each sorted ascending over the batch, elementwise)
    loss = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)

    Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal Transport": instead
    of every pair beating its reference, the distribution of policy margins should first-order
    stochastically dominate the reference's; in 1-D the optimal transport plan pairs sorted
    samples, so the dominance violation is a logistic loss on sorted differences.
    NOTE: losses[i] belongs to the i-th quantile, not to example i; only the batch reduction
    is meaningful, and the loss depends on the whole batch (micro-batch size changes it).

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
        label_smoothing: ε in [0, 0.5]; default 0.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses [batch] (by quantile),
        rewards [batch] (by example, unsorted).
    """
    _check_smoothing(label_smoothing, "aot")
    ref_chosen, ref_rejected = _reference(logps, "aot")
    policy_sorted = torch.sort(logps.chosen - logps.rejected, dim=0).values
    reference_sorted = torch.sort(ref_chosen - ref_rejected, dim=0).values
    losses = _smoothed_logistic(beta * (policy_sorted - reference_sorted), label_smoothing)
    return _output(losses, beta * (logps.chosen - ref_chosen), beta * (logps.rejected - ref_rejected))


@register_loss("aot_unpaired", kind="paired", needs_reference=True, params=("beta", "label_smoothing"))
def dpo_aot_unpaired(logps: PairedLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """AOT unpaired: chosen rewards should dominate rejected rewards in distribution (arXiv:2406.05882).

    Δ = sort(πc − rc) − sort(πr − rr)      (each sorted ascending over the batch, elementwise)
    loss = −(1−ε) log σ(βΔ) − ε log σ(−βΔ)

    Melnyk et al., the unpaired form: it ignores which chosen went with which rejected and
    asks the distribution of chosen log-ratios to dominate that of rejected log-ratios,
    quantile by quantile. Like `aot`, losses[i] is the i-th quantile, not example i.

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
        label_smoothing: ε in [0, 0.5]; default 0.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses [batch] (by quantile),
        rewards [batch] (by example, unsorted).
    """
    _check_smoothing(label_smoothing, "aot_unpaired")
    chosen_lr, rejected_lr = _logratios(logps, "aot_unpaired")
    delta = torch.sort(chosen_lr, dim=0).values - torch.sort(rejected_lr, dim=0).values
    losses = _smoothed_logistic(beta * delta, label_smoothing)
    return _output(losses, beta * chosen_lr, beta * rejected_lr)


@register_loss("apo_zero", kind="paired", needs_reference=True, params=("beta",))
def dpo_apo_zero(logps: PairedLogps, *, beta: float = 0.1) -> PreferenceLossOutput:
    """APO-zero, anchored preference: raise chosen, lower rejected, each in absolute terms (arXiv:2408.06266).

    loss = 1 − σ(β(πc − rc)) + σ(β(πr − rr))

    D'Oosterlinck et al., "Anchored Preference Optimization and Contrastive Revisions": DPO
    only controls the margin; APO anchors each side to the reference. Use APO-zero when the
    chosen outputs are better than the current model's (e.g. from a stronger model).

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    chosen_lr, rejected_lr = _logratios(logps, "apo_zero")
    chosen_r, rejected_r = beta * chosen_lr, beta * rejected_lr
    losses = 1 - torch.sigmoid(chosen_r) + torch.sigmoid(rejected_r)
    return _output(losses, chosen_r, rejected_r)


@register_loss("apo_down", kind="paired", needs_reference=True, params=("beta",))
def dpo_apo_down(logps: PairedLogps, *, beta: float = 0.1) -> PreferenceLossOutput:
    """APO-down: lower both likelihoods, the rejected one more (arXiv:2408.06266).

    loss = σ(β(πc − rc)) + 1 − σ(β(πc − rc) − β(πr − rr))

    D'Oosterlinck et al.: use APO-down when the model already beats the chosen outputs, so
    even the chosen likelihood should fall, while the margin still grows.

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    chosen_lr, rejected_lr = _logratios(logps, "apo_down")
    chosen_r, rejected_r = beta * chosen_lr, beta * rejected_lr
    losses = torch.sigmoid(chosen_r) + 1 - torch.sigmoid(chosen_r - rejected_r)
    return _output(losses, chosen_r, rejected_r)


@register_loss("discopop", kind="paired", needs_reference=True, params=("beta", "discopop_tau"))
def dpo_discopop(logps: PairedLogps, *, beta: float = 0.1, discopop_tau: float = 0.05) -> PreferenceLossOutput:
    """DiscoPOP, the LLM-discovered log-ratio modulated loss (LRML) (arXiv:2406.08414).

    ρ = βh,  m = σ(ρ / τ)
    loss = (1 − m)·(−log σ(ρ)) + m·exp(−ρ)

    Lu et al., "Discovering Preference Optimization Algorithms with and for Large Language
    Models": a blend of the logistic (DPO) and exponential losses, gated by the scaled margin
    itself: pairs already ranked correctly (ρ > 0) move to the exponential loss, pairs ranked
    wrongly keep DPO's logistic loss. Sign conventions follow the authors' code: the gate sees
    the β-scaled margin ρ, not h, and τ = 0.05 makes it nearly a step at ρ = 0. The loss is
    neither convex nor monotone: with τ = 0.05 its slope in ρ is positive for ρ in about
    (−0.12, 0.07), ρ = 0 included, so near policy == reference a gradient step can shrink the
    margin before the logistic part takes over.
    m·exp(−ρ) is computed as exp(log σ(ρ/τ) − ρ), finite for τ < 1 even when ρ ≪ 0.

    Args:
        beta: as in DPO, usually 0.01–0.5; default 0.1.
        discopop_tau: gate temperature τ, default 0.05 (the paper's); must be in (0, 1).
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses, rewards [batch].
    """
    if not 0.0 < discopop_tau < 1.0:
        raise ConfigError(f"loss 'discopop': discopop_tau={discopop_tau} must be in (0, 1) "
                          f"(the exponential term diverges otherwise).\n  fix: use the paper's 0.05")
    chosen_lr, rejected_lr = _logratios(logps, "discopop")
    rho = beta * (chosen_lr - rejected_lr)
    gate = torch.sigmoid(rho / discopop_tau)
    losses = (1 - gate) * -F.logsigmoid(rho) + torch.exp(F.logsigmoid(rho / discopop_tau) - rho)
    return _output(losses, beta * chosen_lr, beta * rejected_lr, gate=gate)


@register_loss("sigmoid_norm", kind="paired", needs_reference=True, params=("beta",))
def dpo_sigmoid_norm(logps: PairedLogps, *, beta: float = 5.0) -> PreferenceLossOutput:
    """Length-normalised DPO, the Tülu 3 preference loss (arXiv:2411.15124).

    h̄ = (πc − rc)/|yc| − (πr − rr)/|yr|
    loss = −log σ(βh̄)

    Lambert et al., "Tülu 3: Pushing Frontiers in Open Language Model Post-Training": DPO on
    per-token log-ratios rather than sums, so a long completion cannot win (or lose) on length
    alone; it keeps the reference model, unlike SimPO. This is TRL's loss_type "sigmoid_norm".
    Per-token margins are ~|y| times smaller than summed ones, so β is larger: Tülu 3 uses 5.

    Args:
        beta: inverse temperature on the per-token margin, usually 1–10; default 5.0 (Tülu 3).
    Shapes: every PairedLogps tensor [batch] (reference required) -> losses [batch].
    Rewards: β·(πc − rc)/|yc| and β·(πr − rr)/|yr|, the quantities the loss compares.
    """
    chosen_lr, rejected_lr = _logratios(logps, "sigmoid_norm")
    chosen_avg = _per_token(chosen_lr, logps.chosen_tokens)
    rejected_avg = _per_token(rejected_lr, logps.rejected_tokens)
    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg))
    return _output(losses, beta * chosen_avg, beta * rejected_avg)


# ----------------------------------------------------------------------------- reference-free families


@register_loss("simpo", kind="paired", needs_reference=False, params=("beta", "simpo_gamma", "label_smoothing"))
def simpo(logps: PairedLogps, *, beta: float = 2.0, simpo_gamma: float = 0.5,
          label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """SimPO, reference-free DPO on average log-probs with a target margin (arXiv:2405.14734).

    z = β(πc/|yc| − πr/|yr|) − γ
    loss = −(1−ε) log σ(z) − ε log σ(−z)

    Meng et al., "SimPO: Simple Preference Optimization with a Reference-Free Reward": the
    reward is the length-normalised log-likelihood the model generates with, so no reference
    model is needed, and the chosen reward must beat the rejected one by the margin γ (Eq. 6).
    γ is subtracted as the paper writes it, OUTSIDE the β scaling; the authors' code takes
    the ratio γ/β inside instead, which is the same loss: β(Δ − γ/β) = βΔ − γ.

    Args:
        beta: reward scale, usually 2–10 (paper); default 2.0.
        simpo_gamma: target reward margin γ >= 0 (the authors tune it through γ/β); default 0.5.
        label_smoothing: ε in [0, 0.5]; default 0.
    Shapes: chosen, rejected, *_tokens [batch] (reference ignored) -> losses [batch].
    Rewards: β·πc/|yc| and β·πr/|yr|.
    """
    _check_smoothing(label_smoothing, "simpo")
    chosen_r = beta * _per_token(logps.chosen, logps.chosen_tokens)
    rejected_r = beta * _per_token(logps.rejected, logps.rejected_tokens)
    losses = _smoothed_logistic(chosen_r - rejected_r - simpo_gamma, label_smoothing)
    return _output(losses, chosen_r, rejected_r)


@register_loss("cpo", kind="paired", needs_reference=False, params=("beta", "cpo_alpha"))
def cpo(logps: PairedLogps, *, beta: float = 0.1, cpo_alpha: float = 1.0) -> PreferenceLossOutput:
    """CPO, reference-free DPO plus an SFT term on the chosen completion (arXiv:2401.08417).

    loss = −log σ(β(πc − πr)) + α·NLL(chosen),   NLL(chosen) = −πc/|yc|

    Xu et al., "Contrastive Preference Optimization": drops the reference model (a uniform
    reference) from DPO and adds behaviour cloning on the preferred outputs, which keeps the
    policy close to the preferred data without a second model in memory. The preference term
    uses summed log-probs, the NLL term the per-token mean.

    Args:
        beta: inverse temperature, usually 0.01–0.5; default 0.1 (the paper's).
        cpo_alpha: weight α of the NLL term, usually 0–1; default 1.0.
    Shapes: chosen, rejected, chosen_tokens [batch] (reference ignored) -> losses [batch].
    Rewards: β·πc and β·πr. Metrics: "nll" [batch].
    """
    nll = chosen_nll(logps)
    losses = -F.logsigmoid(beta * (logps.chosen - logps.rejected)) + cpo_alpha * nll
    return _output(losses, beta * logps.chosen, beta * logps.rejected, nll=nll)


# The mean log-prob ORPO's odds are taken at is capped just below 0: p = 1 has infinite odds.
# exp(-1e-6) = 1 - 1e-6 caps the log-odds at about 13.8, far beyond any useful signal.
_LOG_ODDS_MAX_LOGP = -1e-6


def _log_odds(mean_logp: Tensor) -> Tensor:
    """log(p / (1 − p)) from ℓ = log p ≤ 0, with log(1 − e^ℓ) computed without cancellation.

    Near ℓ = 0, 1 − e^ℓ cancels; use log(−expm1(ℓ)) there and log1p(−e^ℓ) below −log 2
    (Mächler, "Accurately computing log(1 − exp(−|a|))"). torch.where evaluates (and
    differentiates) both branches everywhere, so each branch gets its input clamped to its
    own side of −log 2 first: log1p(−e^ℓ) at ℓ ≈ −3e-8 is log1p(−1) = −inf in float32, whose
    gradient would turn the loss's gradient into NaN although the branch is not selected.
    ℓ is capped at −1e-6 (p = 1 has infinite odds).
    """
    mean_logp = mean_logp.clamp(max=_LOG_ODDS_MAX_LOGP)
    split = -math.log(2.0)
    log1m = torch.where(mean_logp > split,
                        torch.log(-torch.expm1(mean_logp.clamp(min=split))),
                        torch.log1p(-torch.exp(mean_logp.clamp(max=split))))
    return mean_logp - log1m


@register_loss("orpo", kind="paired", needs_reference=False, params=("orpo_lambda",))
def orpo(logps: PairedLogps, *, orpo_lambda: float = 0.1) -> PreferenceLossOutput:
    """ORPO, SFT plus an odds-ratio penalty on the rejected completion (arXiv:2403.07691).

    ℓc = πc/|yc|, ℓr = πr/|yr|      (per-token average log-probs, so p = e^ℓ is in (0, 1))
    log odds(y) = ℓ − log(1 − e^ℓ)
    L_OR = −log σ(log odds(yc) − log odds(yr))
    loss = NLL(chosen) + λ·L_OR,   NLL(chosen) = −ℓc

    Hong et al., "ORPO: Monolithic Preference Optimization without Reference Model": SFT
    alone raises the rejected style too; a weak odds-ratio term added to the SFT loss
    contrasts them in one stage, with no reference model and no separate SFT run.

    Args:
        orpo_lambda: weight λ of the odds-ratio term; default 0.1, the paper's main setting.
    Shapes: chosen, rejected, *_tokens [batch] (reference ignored) -> losses [batch].
    Rewards: ℓc and ℓr (the paper has no β). Metrics: "nll", "log_odds_ratio",
        "log_odds_chosen", "log_odds_rejected", each [batch].
    """
    chosen_mean = _per_token(logps.chosen, logps.chosen_tokens)
    rejected_mean = _per_token(logps.rejected, logps.rejected_tokens)
    odds_chosen, odds_rejected = _log_odds(chosen_mean), _log_odds(rejected_mean)
    log_odds_ratio = odds_chosen - odds_rejected
    nll = -chosen_mean
    losses = nll - orpo_lambda * F.logsigmoid(log_odds_ratio)
    return _output(losses, chosen_mean, rejected_mean, nll=nll, log_odds_ratio=log_odds_ratio,
                   log_odds_chosen=odds_chosen, log_odds_rejected=odds_rejected)
