"""Sequence classification, regression and reranking losses, as pure functions of the head's outputs.

A sequence-classification head maps each sequence to num_labels scores. Every function returns one loss per row
(per sequence, or per group of candidates) so the caller chooses the reduction.

Classification and regression (the problem types of a `*ForSequenceClassification` head):

    weighted_cross_entropy   logits (B, C), labels (B,) int64, class_weights (C,) optional
                             loss_i = -w[y_i] log softmax(logits_i)[y_i]
                             Class weights counter an imbalanced label set (w_c ~ 1 / frequency is the usual pick).
                             Per row, the weighted mean of F.cross_entropy(weight=w) is losses.sum() / w[labels].sum(),
                             not losses.mean(): that division is the caller's, with the rest of the reduction.
    regression_mse           predictions (B,) or (B, 1), targets (B,) float:  loss_i = (prediction_i - target_i)^2
    sequence_classification_loss   picks one of the two as transformers does for single-label heads:
                             num_labels = 1 -> regression_mse, num_labels > 1 -> weighted_cross_entropy.

Reranking: G queries, each with C candidates scored by the model (a cross-encoder's relevance logit).

    listwise_softmax_ce      ListNet's top-one loss (Cao et al. 2007, "Learning to Rank: From Pairwise Approach to
                             Listwise Approach", ICML): cross-entropy between a target distribution over a group's
                             candidates and softmax(scores):  loss_g = -sum_c target_gc log softmax(scores_g)_c
                             The target comes from the graded relevance labels (G, C), two ways:
                               "normalized" (default): target = labels / sum_c labels, labels >= 0. With one relevant
                                   candidate (label 1) and the rest 0 (the usual "positive + hard negatives" group) it
                                   is plain cross-entropy on the positive, the contrastive objective most rerankers
                                   train with; a group without any relevant candidate has no target and is refused.
                               "softmax": target = softmax(labels), ListNet's choice (the top-one probability with
                                   phi = exp); every candidate keeps some mass, e^0 = 1 even for label 0, so binary
                                   labels give a soft target rather than a one-hot one.
                             Groups are of equal size C: pad or subsample candidates before the loss.
    pointwise_bce            scores (B,) logits, labels (B,) in [0, 1] (soft labels allowed):
                             loss_i = -[y_i log sigmoid(s_i) + (1 - y_i) log sigmoid(-s_i)]
                             Each (query, candidate) pair on its own, as monoBERT does
                             (Nogueira & Cho 2019, "Passage Re-ranking with BERT", arXiv 1901.04085).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LISTWISE_TARGETS = ("normalized", "softmax")


# --- classification and regression -----------------------------------------------------------------------
def weighted_cross_entropy(logits: Tensor, labels: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """(B,) -w[y_i] log softmax(logits_i)[y_i]; no class_weights means every w_c = 1 (module docstring).

    logits: (B, C) with C >= 2. labels: (B,) int64 class ids. class_weights: (C,) >= 0."""
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (B, C) and labels (B,), got shapes {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 class ids, got {labels.dtype} (float labels with one output "
                         "are regression: use regression_mse)")
    if class_weights is not None:
        if class_weights.shape != logits.shape[1:]:
            raise ValueError(f"class_weights must be (C,) = ({logits.shape[1]},), one per class, "
                             f"got shape {tuple(class_weights.shape)}")
        if bool((class_weights < 0).any()):
            raise ValueError("class_weights must be >= 0 (a negative weight would train away from that class)")
    # fp32 log-softmax: bf16 logits lose the small differences that decide a confident prediction's loss
    nll = F.cross_entropy(logits.float(), labels, reduction="none")
    if class_weights is None:
        return nll
    return nll * class_weights.to(nll)[labels]


def regression_mse(predictions: Tensor, targets: Tensor) -> Tensor:
    """(B,) (prediction_i - target_i)^2. predictions: (B,) or (B, 1) (a one-label head); targets: (B,) float."""
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        predictions = predictions.squeeze(1)
    if predictions.ndim != 1 or targets.shape != predictions.shape:
        raise ValueError(f"predictions must be (B,) or (B, 1) and targets (B,), got shapes "
                         f"{tuple(predictions.shape)} and {tuple(targets.shape)}")
    return (predictions.float() - targets.float()) ** 2


def sequence_classification_loss(logits: Tensor, labels: Tensor, class_weights: Tensor | None = None) -> Tensor:
    """(B,) regression_mse when logits is (B, 1), weighted_cross_entropy when (B, C >= 2)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (B, num_labels), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        if class_weights is not None:
            raise ValueError("class_weights apply to classification (num_labels >= 2); num_labels = 1 is "
                             "regression, which has no classes: drop class_weights")
        return regression_mse(logits, labels)
    return weighted_cross_entropy(logits, labels, class_weights)


# --- reranking -------------------------------------------------------------------------------------------------
def listwise_softmax_ce(scores: Tensor, labels: Tensor, target: str = "normalized") -> Tensor:
    """(G,) -sum_c target_gc log softmax(scores_g)_c, ListNet's top-one loss per group (module docstring).

    scores: (G, C) one score per candidate. labels: (G, C) graded relevance (float or int; higher is more relevant).
    target: "normalized" (labels / their sum; labels >= 0, each group with a positive sum) or "softmax"."""
    if target not in LISTWISE_TARGETS:
        raise ValueError(f"target={target!r}; expected one of {LISTWISE_TARGETS}")
    if scores.ndim != 2 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must both be (G, C), got shapes {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.float()
    if target == "softmax":
        target_probs = labels.softmax(-1)
    else:
        if bool((labels < 0).any()):
            raise ValueError("target='normalized' needs labels >= 0 (they become probabilities); "
                             "use target='softmax' for signed scores")
        totals = labels.sum(-1, keepdim=True)
        if bool((totals == 0).any()):
            empty = (totals.squeeze(-1) == 0).nonzero().flatten().tolist()
            raise ValueError(f"groups {empty} have no relevant candidate (all labels 0), so 'normalized' has no "
                             "target: drop those groups or use target='softmax'")
        target_probs = labels / totals
    return -(target_probs * F.log_softmax(scores.float(), dim=-1)).sum(-1)


def pointwise_bce(scores: Tensor, labels: Tensor) -> Tensor:
    """(B,) binary cross-entropy of each candidate's relevance logit against its label in [0, 1].

    scores: (B,) logits (or (B, 1) from a one-label head). labels: (B,) float in [0, 1]."""
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores.squeeze(1)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores must be (B,) or (B, 1) and labels (B,), got shapes {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.float()
    if bool(((labels < 0) | (labels > 1)).any()):
        raise ValueError("pointwise_bce labels must lie in [0, 1] (relevance as a probability); rescale graded "
                         "labels, e.g. label / max_label")
    # with_logits: the log-sigmoid form stays finite for any score, log(sigmoid(s)) does not once |s| > ~100
    return F.binary_cross_entropy_with_logits(scores.float(), labels, reduction="none")
