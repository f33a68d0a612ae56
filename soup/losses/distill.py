"""Token-level knowledge distillation: divergences between a student's and a teacher's next-token distributions.

Knowledge distillation: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (arXiv 1503.02531).
Forward/reverse KL and the generalised JSD for language models: Agarwal et al. 2023, "On-Policy Distillation
of Language Models: Learning from Self-Generated Mistakes" (GKD, arXiv 2306.13649).

The caller selects the N labelled positions first (teacher-forced or student-generated, on-policy or not):

    student_logits  (N, V)  the student's logits at those positions (with gradient)
    teacher         (N, V)  the teacher's logits there (no gradient is taken through them), or a TopKTeacher
    temperature     T > 0   both distributions are softmax(logits / T):  p_S = softmax(z_S / T),  p_T = softmax(z_T / T)

Every function returns per-position losses (N,): the caller reduces over tokens (soup/losses/sft.py explains why
the reduction belongs to the loop).

Divergences, summed over the vocabulary v:

    forward_kl        KL(p_T || p_S) = sum_v p_T (log p_T - log p_S)      mode-covering (Hinton's soft-target loss)
    reverse_kl        KL(p_S || p_T) = sum_v p_S (log p_S - log p_T)      mode-seeking
    generalized_jsd   JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M),   M = beta p_T + (1 - beta) p_S

The limits of JSD_beta. Taken literally, both ends are 0: at beta = 0, M = p_S and only
KL(p_S || p_S) = 0 is left; at beta = 1, M = p_T and only KL(p_T || p_T) = 0 is left. Near the ends it behaves
like a scaled KL: expanding M around p_S, KL(p_S || M) is O(beta^2), so JSD_beta = beta KL(p_T || p_S) + O(beta^2);
symmetrically JSD_beta = (1 - beta) KL(p_S || p_T) + O((1 - beta)^2) (GKD notes the gradients behave like forward
KL near beta = 0 and reverse KL near 1). The convention of GKD implementations (TRL's GKDTrainer among them), kept
here, replaces the vanishing ends by their directions, without the vanishing factor:
    beta = 0  ->  forward_kl  KL(p_T || p_S)
    beta = 1  ->  reverse_kl  KL(p_S || p_T)
so the loss jumps at the ends (beta = 1e-6 gives about 1e-6 x forward KL); that is the convention, not a bug.
beta = 0.5 is the ordinary (symmetric) Jensen-Shannon divergence, bounded by log 2.

Temperature. d KL(p_T || p_S) / d z_S = (p_S - p_T) / T, and for large T, p_S - p_T itself shrinks like 1 / T,
so the soft-target gradient shrinks like 1 / T^2. Hinton et al. (sec. 2) multiply the soft loss by T^2 to keep its
weight against the hard-label cross-entropy unchanged when T is tuned. scale_by_t_squared defaults to True: it is a
no-op at T = 1 (GKD's setting) and at T > 1 it is what the paper prescribes; without it, raising T silently
shrinks the distillation term of distill_loss. The hard-label cross-entropy always uses T = 1 (Hinton sec. 2).

Top-k teachers. A cached (offline) teacher often stores only its top-k log-probs per position, TopKTeacher(logprobs
(N, k), indices (N, k)). The divergence is then taken between two distributions over k + 1 buckets: the k teacher
tokens, plus one "rest" bucket holding everything else,
    teacher:  p_T(i_1), ..., p_T(i_k),  1 - sum_j p_T(i_j)
    student:  p_S(i_1), ..., p_S(i_k),  1 - sum_j p_S(i_j)     (the student's mass outside the teacher's top k)
Merging tokens into a bucket can only lose information, so for every divergence here (all are f-divergences)
the bucketed value is <= the full one (data-processing inequality), with equality when k = V (the rest bucket is
then empty and dropped). The cached log-probs must already be at the distillation temperature, i.e.
log_softmax(teacher_logits / T) gathered at the indices: the tail's mass under another temperature cannot be
recovered from k values. Indices must be distinct within a row (as torch.topk gives).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd")


class TopKTeacher(NamedTuple):
    """A cached teacher: its log-probs at temperature T of its top-k tokens per position.

    logprobs: (N, k) float, log_softmax(teacher_logits / T) at `indices`; their probabilities sum to <= 1.
    indices:  (N, k) int64, distinct vocabulary ids within each row.
    """

    logprobs: Tensor
    indices: Tensor


# --- validation --------------------------------------------------------------------------------------------
def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be a finite number > 0 (T = 1 is the model's own "
                         "distribution; T > 1 softens both)")


def _check_unit_interval(name: str, value: float, meaning: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} must be in [0, 1] ({meaning})")


def _check_student(student_logits: Tensor) -> None:
    if student_logits.ndim != 2:
        raise ValueError(f"student_logits must be (N, V) (select the labelled positions first), "
                         f"got shape {tuple(student_logits.shape)}")


# --- distributions -----------------------------------------------------------------------------------------
def _log_distributions(student_logits: Tensor, teacher: Tensor | TopKTeacher,
                       temperature: float) -> tuple[Tensor, Tensor]:
    """(student_logp, teacher_logp), fp32, over the vocabulary (N, V) or the top-k buckets (N, k [+ 1])."""
    _check_student(student_logits)
    _check_temperature(temperature)
    # fp32 because bf16 log-softmax differences of near-equal distributions are mostly rounding error
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if isinstance(teacher, TopKTeacher):
        return _topk_buckets(student_logp, teacher)
    if teacher.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher.shape)} must have the student's shape "
                         f"{tuple(student_logits.shape)} (same positions, same vocabulary)")
    teacher_logp = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    return student_logp, teacher_logp


def _topk_buckets(student_logp: Tensor, teacher: TopKTeacher) -> tuple[Tensor, Tensor]:
    """Both distributions over the teacher's k tokens plus a rest bucket (module docstring, "Top-k teachers")."""
    teacher_logp, indices = teacher.logprobs.detach().float(), teacher.indices
    num_positions, vocab_size = student_logp.shape
    if teacher_logp.ndim != 2 or teacher_logp.shape != indices.shape or teacher_logp.shape[0] != num_positions:
        raise ValueError(f"TopKTeacher logprobs {tuple(teacher_logp.shape)} and indices {tuple(indices.shape)} "
                         f"must both be (N, k) with N = {num_positions}, the student's number of positions")
    if teacher_logp.shape[1] > vocab_size:
        raise ValueError(f"top-k teacher has k={teacher_logp.shape[1]} > V={vocab_size} (the student's vocabulary)")
    if indices.dtype != torch.int64:
        raise ValueError(f"TopKTeacher indices must be int64 (as torch.topk returns), got {indices.dtype}")
    teacher_top_mass_log = teacher_logp.logsumexp(-1, keepdim=True)
    if bool((teacher_top_mass_log > 1e-3).any()):
        raise ValueError("TopKTeacher logprobs sum to more than probability 1 in some row: pass log-probs "
                         "(log_softmax(teacher_logits / T) gathered at the indices), not raw logits")
    student_top = student_logp.gather(-1, indices)
    if teacher_logp.shape[1] == vocab_size:  # k = V: nothing is left over, the buckets are the vocabulary
        return student_top, teacher_logp
    # The student's rest: logsumexp over the tokens outside the top k, exact (no 1 - sum cancellation).
    outside = student_logp.scatter(-1, indices, float("-inf"))
    student_rest = outside.logsumexp(-1, keepdim=True)
    # The teacher's rest is only known as 1 - sum. -expm1 keeps precision when the sum is close to 1; the
    # floor at the smallest normal float keeps the reverse KL finite when rounding makes the sum reach 1.
    tiny = torch.finfo(teacher_logp.dtype).tiny
    teacher_rest = torch.log((-torch.expm1(teacher_top_mass_log.clamp(max=0.0))).clamp(min=tiny))
    return torch.cat([student_top, student_rest], -1), torch.cat([teacher_logp, teacher_rest], -1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) over the last dimension, with 0 log 0 = 0.

    A token masked to -inf in p (e.g. padded vocabulary rows) would otherwise give 0 x (-inf) = nan; masking the
    log-probs where p = 0 keeps the value and the gradient finite."""
    p = log_p.exp()
    supported = p > 0
    zero = torch.zeros_like(log_p)
    return (p * (torch.where(supported, log_p, zero) - torch.where(supported, log_q, zero))).sum(-1)


def _scale(losses: Tensor, temperature: float, scale_by_t_squared: bool) -> Tensor:
    return losses * temperature ** 2 if scale_by_t_squared else losses


# --- divergences -------------------------------------------------------------------------------------------
def forward_kl(student_logits: Tensor, teacher: Tensor | TopKTeacher, temperature: float = 1.0,
               scale_by_t_squared: bool = True) -> Tensor:
    """(N,) KL(p_T || p_S) per position: Hinton's soft-target loss, mode-covering (module docstring).

    student_logits: (N, V). teacher: (N, V) logits, or a TopKTeacher. Unscaled, its gradient with respect to
    the student's logits is (p_S - p_T) / T; scale_by_t_squared multiplies the loss (and gradient) by T^2."""
    student_logp, teacher_logp = _log_distributions(student_logits, teacher, temperature)
    return _scale(_kl(teacher_logp, student_logp), temperature, scale_by_t_squared)


def reverse_kl(student_logits: Tensor, teacher: Tensor | TopKTeacher, temperature: float = 1.0,
               scale_by_t_squared: bool = True) -> Tensor:
    """(N,) KL(p_S || p_T) per position: mode-seeking, the student is penalised for mass the teacher lacks.

    Shapes and temperature as forward_kl."""
    student_logp, teacher_logp = _log_distributions(student_logits, teacher, temperature)
    return _scale(_kl(student_logp, teacher_logp), temperature, scale_by_t_squared)


def generalized_jsd(student_logits: Tensor, teacher: Tensor | TopKTeacher, beta: float = 0.5,
                    temperature: float = 1.0, scale_by_t_squared: bool = True) -> Tensor:
    """(N,) GKD's generalised Jensen-Shannon divergence JSD_beta (arXiv 2306.13649).

    JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M),  M = beta p_T + (1 - beta) p_S,  beta in [0, 1].
    beta = 0 returns forward_kl and beta = 1 returns reverse_kl (the module docstring derives why the formula
    itself vanishes there). Shapes and temperature as forward_kl."""
    _check_unit_interval("beta", beta, "0 = forward KL, 0.5 = symmetric JSD, 1 = reverse KL")
    student_logp, teacher_logp = _log_distributions(student_logits, teacher, temperature)
    if beta == 0.0:
        jsd = _kl(teacher_logp, student_logp)
    elif beta == 1.0:
        jsd = _kl(student_logp, teacher_logp)
    else:
        # log M by logsumexp: summing probabilities and taking the log underflows for rare tokens
        mixture_logp = torch.logsumexp(torch.stack([teacher_logp + math.log(beta),
                                                    student_logp + math.log(1.0 - beta)]), dim=0)
        jsd = beta * _kl(teacher_logp, mixture_logp) + (1.0 - beta) * _kl(student_logp, mixture_logp)
    return _scale(jsd, temperature, scale_by_t_squared)


def divergence(name: str, student_logits: Tensor, teacher: Tensor | TopKTeacher, beta: float = 0.5,
               temperature: float = 1.0, scale_by_t_squared: bool = True) -> Tensor:
    """(N,) the divergence called `name` (one of DIVERGENCES); beta is read by generalized_jsd only."""
    if name == "forward_kl":
        return forward_kl(student_logits, teacher, temperature, scale_by_t_squared)
    if name == "reverse_kl":
        return reverse_kl(student_logits, teacher, temperature, scale_by_t_squared)
    if name == "generalized_jsd":
        return generalized_jsd(student_logits, teacher, beta, temperature, scale_by_t_squared)
    raise ValueError(f"divergence={name!r}; expected one of {DIVERGENCES}")


# --- the training loss -------------------------------------------------------------------------------------
def distill_loss(student_logits: Tensor, teacher: Tensor | TopKTeacher, labels: Tensor | None, alpha: float,
                 divergence_name: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 scale_by_t_squared: bool = True, return_terms: bool = False):
    """(N,) alpha * divergence(p_S, p_T at temperature T) + (1 - alpha) * cross-entropy(student at T = 1, labels).

    Hinton et al. sec. 2: a weighted average of the soft-target term and the ordinary hard-label loss, the latter
    at T = 1 because that is the distribution the student is deployed with. alpha = 1 is pure distillation
    (GKD; labels may then be None, e.g. for student-generated tokens that have no ground truth); alpha = 0 is
    plain supervised fine-tuning.

    labels: (N,) int64 target token ids at the same N positions (already selected: no ignore index here).
    The other arguments are those of `divergence`; with scale_by_t_squared=True (default) alpha keeps its
    meaning as T changes (module docstring, "Temperature").
    return_terms: return (loss, divergence term, cross-entropy term or None) so a caller that logs the two
    terms does not compute them again; the cross-entropy is then computed whenever labels are given.
    """
    _check_unit_interval("alpha", alpha, "the weight of the distillation term; 1 - alpha weighs the label loss")
    soft = divergence(divergence_name, student_logits, teacher, beta, temperature, scale_by_t_squared)
    hard = None
    if alpha < 1.0 or (return_terms and labels is not None):
        if labels is None:
            raise ValueError(f"alpha={alpha} < 1 mixes in the label cross-entropy, so labels are needed; "
                             "pass labels or set alpha=1 for pure distillation")
        if labels.shape != student_logits.shape[:1]:
            raise ValueError(f"labels must be (N,) = ({student_logits.shape[0]},), one target per selected "
                             f"position, got shape {tuple(labels.shape)}")
        hard = F.cross_entropy(student_logits.float(), labels, reduction="none")
    loss = soft if alpha == 1.0 else alpha * soft + (1.0 - alpha) * hard
    return (loss, soft, hard) if return_terms else loss
