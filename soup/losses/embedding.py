"""Contrastive sentence-embedding losses, as pure functions over pooled embeddings.

An encoder turns each text into hidden states (B, T, H); `pool` reduces them to one vector per
text (B, H). Every loss below compares texts by cosine similarity, cos(u, v) = u.v / (|u| |v|),
so the embeddings' norms never matter.

1. info_nce: in-batch negatives ("multiple negatives ranking"; van den Oord et al. 2018,
   arXiv 1807.03748; Henderson et al. 2017, arXiv 1705.00652). Anchor i must pick its positive
   among the positives of the whole batch (and every hard negative of the batch):
       logits_ij = scale * cos(anchor_i, candidate_j),    loss_i = -log softmax_j(logits_i)[i]
   scale is 1 / temperature: 20 is temperature 0.05 (SimCSE, arXiv 2104.08821, uses 0.05).
   symmetric=True also asks positive i to pick anchor i among the anchors, and averages the two.
2. cosent: CoSENT (Su 2022, "CoSENT: a more efficient sentence vector scheme than Sentence-BERT",
   kexue.fm/archives/8847). Pairs carry a gold similarity score; only the order of the scores is
   used. With c_i = cos(emb1_i, emb2_i):
       loss = log(1 + sum_{(i, j): score_i > score_j} exp(scale * (c_j - c_i)))
   a smooth version of "every pair scored higher must have the higher cosine".
3. cosine_regression: (c_i - score_i)^2, the Sentence-BERT regression objective (Reimers and
   Gurevych 2019, arXiv 1908.10084); the caller puts the scores in cosine's range (e.g. [0, 1]).
4. matryoshka: Kusupati et al. 2022, "Matryoshka Representation Learning" (arXiv 2205.13147):
   sum_d w_d * loss(embeddings truncated to their first d dimensions), so every prefix of the
   vector is itself a usable embedding.

Similarities are computed in float32 whatever the embeddings' dtype: in bf16, scale * cos at scale 20
carries an error of ~0.1 per logit, as large as the differences the loss is trained on.

Each loss returns an EmbeddingLossOutput: `losses` per row (B,) where the loss decomposes over rows,
one 0-dim tensor for CoSENT (one log-sum-exp over every pair of the batch); the caller reduces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

POOLING_MODES = ("mean", "cls", "last")


# --- pooling -------------------------------------------------------------------------------------
def pool(hidden: Tensor, attention_mask: Tensor, mode: str = "mean") -> Tensor:
    """(B, H) one vector per text from hidden states (B, T, H) and attention_mask (B, T), 1 on real tokens.

    mean: average of the real tokens (Sentence-BERT's default).
    cls:  the first real token (BERT's [CLS]; position 0 under right padding).
    last: the last real token (decoder-only embedders such as E5-Mistral, arXiv 2401.00368, whose
          last token has attended to the whole text). Both cls and last find the token from the mask,
          so they work with left and right padding alike."""
    if mode not in POOLING_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {POOLING_MODES}")
    if hidden.ndim != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (B, T, H) and attention_mask (B, T), got shapes "
                         f"{tuple(hidden.shape)} and {tuple(attention_mask.shape)}")
    real = attention_mask != 0
    if not bool(real.any(-1).all()):
        raise ValueError("every row of attention_mask needs at least one real token")
    if mode == "mean":
        # accumulate in float32: a bf16 sum over hundreds of tokens keeps only ~3 significant digits
        weights = real.to(torch.float32).unsqueeze(-1)
        summed = (hidden.to(torch.float32) * weights).sum(1)
        return (summed / weights.sum(1)).to(hidden.dtype)
    seq_len = hidden.shape[1]
    positions = torch.arange(seq_len, device=hidden.device).expand_as(real)
    if mode == "cls":
        index = torch.where(real, positions, seq_len).amin(-1)
    else:
        index = torch.where(real, positions, -1).amax(-1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, index]


def normalise(embeddings: Tensor, eps: float = 1e-12) -> Tensor:
    """embeddings / |embeddings| along the last dimension; a zero vector stays zero (eps avoids 0 / 0)."""
    return F.normalize(embeddings, p=2.0, dim=-1, eps=eps)


def _check_pairs(name1: str, emb1: Tensor, name2: str, emb2: Tensor) -> None:
    if emb1.ndim != 2 or emb1.shape != emb2.shape or emb1.shape[0] == 0:
        raise ValueError(f"{name1} and {name2} must both be (B, H) with B >= 1, got shapes "
                         f"{tuple(emb1.shape)} and {tuple(emb2.shape)}")


def _check_scores(scores: Tensor, batch: int) -> None:
    if scores.shape != (batch,):
        raise ValueError(f"scores must be (B,) = ({batch},), got shape {tuple(scores.shape)}")


@dataclass
class EmbeddingLossOutput:
    """What every loss here returns.

    losses: (B,) per row, or 0-dim for CoSENT; differentiable; the caller reduces.
    metrics: detached 0-dim tensors (left on the device, so logging them costs no sync here)."""

    losses: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


# --- 1. in-batch negatives -------------------------------------------------------------------------
def info_nce(anchors: Tensor, positives: Tensor, hard_negatives: Tensor | None = None, scale: float = 20.0,
             symmetric: bool = False) -> EmbeddingLossOutput:
    """Per-row InfoNCE with in-batch negatives (module docstring, 1).

    Args:
        anchors, positives: (B, H); positives[i] is the match of anchors[i].
        hard_negatives: (B, K, H) or None. They are flattened into the candidates of every anchor, so
            anchor i is scored against B + B*K candidates (its own negatives and everyone else's).
        scale: 1 / temperature, usually 10-50.
        symmetric: add the positive -> anchor direction (positive i picks anchor i among the B anchors;
            hard negatives only serve the anchor -> candidate direction) and average the two.

    A duplicate text in the batch (two anchors with the same positive) is a false negative that this
    loss pushes away; deduplicate batches upstream.

    metrics: accuracy (share of anchors whose top candidate is their positive), positive_cos and
    negative_cos (mean cosine to the positive, and to all other candidates)."""
    _check_pairs("anchors", anchors, "positives", positives)
    batch, hidden = anchors.shape
    candidates = positives
    if hard_negatives is not None:
        if hard_negatives.ndim != 3 or hard_negatives.shape[0] != batch or hard_negatives.shape[2] != hidden:
            raise ValueError(f"hard_negatives must be (B, K, H) = ({batch}, K, {hidden}), "
                             f"got shape {tuple(hard_negatives.shape)}")
        candidates = torch.cat([positives, hard_negatives.reshape(-1, hidden)])
    if candidates.shape[0] < 2:
        raise ValueError("info_nce needs at least one negative: a batch of 1 without hard negatives "
                         "has none (its loss would be 0 whatever the model does)")
    anchors, positives, candidates = anchors.float(), positives.float(), candidates.float()
    cos = normalise(anchors) @ normalise(candidates).T  # (B, B + B*K)
    targets = torch.arange(batch, device=anchors.device)
    losses = F.cross_entropy(scale * cos, targets, reduction="none")
    if symmetric:
        backward_cos = normalise(positives) @ normalise(anchors).T  # (B, B)
        losses = 0.5 * (losses + F.cross_entropy(scale * backward_cos, targets, reduction="none"))

    with torch.no_grad():
        is_positive = F.one_hot(targets, cos.shape[1]).bool()
        metrics = {
            "accuracy": (cos.argmax(-1) == targets).to(cos.dtype).mean(),
            "positive_cos": cos[is_positive].mean(),
            "negative_cos": cos[~is_positive].mean(),
        }
    return EmbeddingLossOutput(losses, {name: value.detach() for name, value in metrics.items()})


# --- 2-3. scored pairs -----------------------------------------------------------------------------
def pair_cosine(emb1: Tensor, emb2: Tensor) -> Tensor:
    """(B,) cos(emb1_i, emb2_i), in float32 (module docstring)."""
    return (normalise(emb1.float()) * normalise(emb2.float())).sum(-1)


def cosent(emb1: Tensor, emb2: Tensor, scores: Tensor, scale: float = 20.0) -> EmbeddingLossOutput:
    """CoSENT over the batch (module docstring, 2): a 0-dim loss.

    Args:
        emb1, emb2: (B, H), the two texts of each pair.
        scores: (B,) gold similarity; only its order is used, so any scale works. Tied scores form no pair.
        scale: multiplies the cosine differences, 20 in the paper.

    Computed as logsumexp over [0, scale (c_j - c_i) for each ordered pair], which is finite for any
    scale (the direct sum of exponentials overflows float32 once scale * 2 > ~88).
    A batch whose scores are all equal has no pair: its loss is log(1) = 0.

    metrics: pair_accuracy, the share of ordered pairs with c_i > c_j (nan when there is no pair)."""
    _check_pairs("emb1", emb1, "emb2", emb2)
    _check_scores(scores, emb1.shape[0])
    cos = pair_cosine(emb1, emb2)
    # ordered[i, j] is True when pair i is scored above pair j, so c_i should exceed c_j
    ordered = scores.unsqueeze(1) > scores.unsqueeze(0)
    violations = scale * (cos.unsqueeze(0) - cos.unsqueeze(1))  # [i, j] = scale * (c_j - c_i)
    violations = violations.masked_fill(~ordered, float("-inf"))
    zero = torch.zeros(1, dtype=cos.dtype, device=cos.device)  # the "1 +" inside the log
    loss = torch.logsumexp(torch.cat([zero, violations.flatten()]), dim=0)

    with torch.no_grad():
        right = (cos.unsqueeze(1) > cos.unsqueeze(0)) & ordered
        metrics = {"pair_accuracy": right.sum().to(cos.dtype) / ordered.sum().to(cos.dtype)}
    return EmbeddingLossOutput(loss, metrics)


def cosine_regression(emb1: Tensor, emb2: Tensor, scores: Tensor) -> EmbeddingLossOutput:
    """(B,) squared error (cos(emb1_i, emb2_i) - scores_i)^2 (module docstring, 3).

    scores must already be in the range the cosine should reach (e.g. STS-B's 0-5 divided by 5);
    they are targets, never differentiated. metrics: mean_cos."""
    _check_pairs("emb1", emb1, "emb2", emb2)
    _check_scores(scores, emb1.shape[0])
    cos = pair_cosine(emb1, emb2)
    losses = (cos - scores.detach().to(cos.dtype)) ** 2
    return EmbeddingLossOutput(losses, {"mean_cos": cos.detach().mean()})


# --- 4. Matryoshka --------------------------------------------------------------------------------
def matryoshka(loss_fn: Callable[..., EmbeddingLossOutput], dims: Sequence[int],
               weights: Sequence[float] | None = None) -> Callable[..., EmbeddingLossOutput]:
    """Wrap loss_fn so it returns sum_d weights[d] * loss_fn(inputs truncated to d dims) (module docstring, 4).

    Every tensor argument with at least 2 dimensions is taken for embeddings ((B, H) or (B, K, H)):
    it is cut to its first d features and re-normalised. 1-dim tensors (scores) and other arguments
    pass through unchanged. Re-normalising changes nothing for the cosine losses here, but keeps the
    wrapper correct for a loss that uses raw dot products.

    weights default to 1 for every dim (the paper's choice). metrics of the wrapped loss come back
    as "dim{d}/{name}", with "dim{d}/loss" the mean of that dimension's losses."""
    dims = [int(d) for d in dims]
    if not dims or min(dims) < 1 or len(set(dims)) != len(dims):
        raise ValueError(f"dims must be distinct positive sizes, got {dims}")
    weights = [1.0] * len(dims) if weights is None else [float(w) for w in weights]
    if len(weights) != len(dims):
        raise ValueError(f"weights must have one entry per dim: {len(weights)} weights for dims {dims}")

    def truncate(value, dim: int):
        if not isinstance(value, Tensor) or value.ndim < 2:
            return value
        if dim > value.shape[-1]:
            raise ValueError(f"matryoshka dim {dim} exceeds the embedding size {value.shape[-1]}")
        return normalise(value[..., :dim])

    def wrapped(*args, **kwargs) -> EmbeddingLossOutput:
        total, metrics = None, {}
        for dim, weight in zip(dims, weights):
            out = loss_fn(*[truncate(a, dim) for a in args], **{k: truncate(v, dim) for k, v in kwargs.items()})
            total = weight * out.losses if total is None else total + weight * out.losses
            metrics[f"dim{dim}/loss"] = out.losses.detach().mean()
            metrics.update({f"dim{dim}/{name}": value for name, value in out.metrics.items()})
        return EmbeddingLossOutput(total, metrics)

    return wrapped
