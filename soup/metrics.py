"""Evaluation metrics, as pure functions over tensors that return Python floats.

Correlation (STS benchmarks): spearman, the Pearson correlation of the two vectors' ranks, with
tied values sharing the average of the ranks they span (so [1, 2, 2, 3] ranks as [1, 2.5, 2.5, 4]).

Retrieval, for Q queries scored against D documents (higher score = more relevant):
    rank of a document   = the number of documents scoring at least as high as it (itself included)
    recall_at_k          = share of queries whose relevant document has rank <= k
    mrr                  = mean over queries of 1 / rank of the relevant document
    ndcg_at_k            = DCG@k / IDCG@k, DCG@k = sum_{r=1..k} gain(doc at rank r) / log2(r + 1)
                           (Jarvelin and Kekalainen 2002), IDCG@k the DCG of the best possible order.
Ties count against the model everywhere: a tied document is ranked ahead of the relevant one (and in
ndcg, tied documents are ordered worst gain first). A collapsed encoder that gives every document the
same score thus gets no credit, instead of whatever a sort happens to break the tie into.

Classification: accuracy, and macro_f1 = mean over classes of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c).
A class absent from both predictions and gold labels has F1 = 0 / 0; it is left out of the mean,
since a small evaluation set that lacks a class says nothing about the model on it (counting it as 0
would punish, as 1 would reward). This is also the set sklearn's f1_score(average="macro") averages
over when it is not given labels=: the labels found in either vector.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


# --- correlation ---------------------------------------------------------------------------------
def average_ranks(values: Tensor) -> Tensor:
    """(N,) float64 ranks 1..N of a 1-dim tensor; tied values share the mean of the ranks they span."""
    order = torch.argsort(values, stable=True)
    _, group_of_sorted, group_sizes = torch.unique_consecutive(values[order], return_inverse=True,
                                                              return_counts=True)
    last = group_sizes.cumsum(0).to(torch.float64)  # 1-based rank of each group's last member
    first = last - group_sizes + 1
    ranks = torch.empty(values.shape[0], dtype=torch.float64, device=values.device)
    ranks[order] = ((first + last) / 2)[group_of_sorted]
    return ranks


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman's rank correlation of two (N,) tensors, N >= 2, with average ranks for ties.

    nan when either input is constant (its ranks have no variance, the correlation is undefined)."""
    if x.ndim != 1 or x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(f"x and y must both be (N,) with N >= 2, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if not bool(torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("x and y must be finite: a nan or inf has no rank")
    rank_x = average_ranks(x) - (x.shape[0] + 1) / 2  # the mean of ranks 1..N, ties included
    rank_y = average_ranks(y) - (y.shape[0] + 1) / 2
    denominator = math.sqrt(float((rank_x**2).sum() * (rank_y**2).sum()))
    if denominator == 0:
        return float("nan")
    return float((rank_x * rank_y).sum()) / denominator


# --- retrieval -----------------------------------------------------------------------------------
def _check_score_matrix(scores: Tensor, k: int | None = None) -> None:
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(f"scores must be (Q, D) with Q, D >= 1, got shape {tuple(scores.shape)}")
    if k is not None and not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k={k} must be between 1 and the number of documents D={scores.shape[1]}")


def rank_of_relevant(scores: Tensor, relevant_index: Tensor) -> Tensor:
    """(Q,) rank of each query's relevant document: how many documents score at least as high (ties count against)."""
    _check_score_matrix(scores)
    if relevant_index.shape != (scores.shape[0],):
        raise ValueError(f"relevant_index must be (Q,) = ({scores.shape[0]},), got shape {tuple(relevant_index.shape)}")
    if not bool(((relevant_index >= 0) & (relevant_index < scores.shape[1])).all()):
        raise ValueError(f"relevant_index must lie in [0, D) = [0, {scores.shape[1]})")
    relevant_score = scores.gather(1, relevant_index.long().unsqueeze(1))
    return (scores >= relevant_score).sum(1)


def recall_at_k(query_emb: Tensor, doc_emb: Tensor, k: int) -> float:
    """Share of queries whose relevant document is among the top k by cosine similarity.

    query_emb: (Q, H); doc_emb: (D, H) with D >= Q. Query i's relevant document is doc i; documents
    Q..D-1 are distractors only."""
    if query_emb.ndim != 2 or doc_emb.ndim != 2 or query_emb.shape[1] != doc_emb.shape[1]:
        raise ValueError(f"query_emb must be (Q, H) and doc_emb (D, H), got shapes "
                         f"{tuple(query_emb.shape)} and {tuple(doc_emb.shape)}")
    if query_emb.shape[0] > doc_emb.shape[0]:
        raise ValueError(f"query i's relevant document is doc i, so D must be >= Q; got Q={query_emb.shape[0]}, "
                         f"D={doc_emb.shape[0]}")
    scores = F.normalize(query_emb, dim=-1) @ F.normalize(doc_emb, dim=-1).T
    _check_score_matrix(scores, k)
    ranks = rank_of_relevant(scores, torch.arange(scores.shape[0], device=scores.device))
    return float((ranks <= k).double().mean())


def mrr(scores_per_query: Tensor, relevant_index: Tensor) -> float:
    """Mean reciprocal rank of each query's one relevant document.

    scores_per_query: (Q, D); relevant_index: (Q,) integer column of the relevant document."""
    ranks = rank_of_relevant(scores_per_query, relevant_index)
    return float((1.0 / ranks.double()).mean())


def mrr_any_relevant(scores: Tensor, relevant: Tensor) -> float:
    """Mean reciprocal rank of the best-ranked relevant document of each query (TREC's MRR, which
    counts the first relevant document a reader meets).

    scores: (Q, D); relevant: (Q, D) bool, at least one True per query. Ties count against, as above."""
    _check_score_matrix(scores)
    if relevant.shape != scores.shape or not bool(relevant.any(1).all()):
        raise ValueError(f"relevant must be (Q, D) = {tuple(scores.shape)} bool with a relevant document per query")
    best_relevant = scores.masked_fill(~relevant, float("-inf")).amax(1, keepdim=True)
    ranks = (scores >= best_relevant).sum(1)
    return float((1.0 / ranks.double()).mean())


def ndcg_at_k(scores: Tensor, gains: Tensor, k: int) -> float:
    """Mean nDCG@k over queries (module docstring).

    scores: (Q, D) model scores; gains: (Q, D) graded relevance >= 0, used linearly (pass 2**rel - 1
    for the exponential variant). A query with no positive gain has IDCG = 0 and nothing to rank; it is
    left out of the mean, and an error is raised when no query is left."""
    _check_score_matrix(scores, k)
    if gains.shape != scores.shape:
        raise ValueError(f"gains must have the shape of scores {tuple(scores.shape)}, got {tuple(gains.shape)}")
    if bool((gains < 0).any()):
        raise ValueError("gains must be >= 0")
    gains = gains.to(torch.float64)
    # ties against the model: sort by gain ascending first, then a stable sort by score keeps that order in ties
    by_gain = torch.argsort(gains, dim=1, stable=True)
    by_score = torch.argsort(scores.gather(1, by_gain), dim=1, descending=True, stable=True)
    ranked_gains = gains.gather(1, by_gain.gather(1, by_score))[:, :k]
    ideal_gains = gains.sort(dim=1, descending=True).values[:, :k]
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=gains.device))
    dcg = (ranked_gains * discounts).sum(1)
    idcg = (ideal_gains * discounts).sum(1)
    has_relevant = idcg > 0
    if not bool(has_relevant.any()):
        raise ValueError("no query has a document with positive gain: nDCG is undefined")
    return float((dcg[has_relevant] / idcg[has_relevant]).mean())


# --- classification ------------------------------------------------------------------------------
def _check_labels(pred: Tensor, gold: Tensor) -> None:
    if pred.ndim != 1 or pred.shape != gold.shape or pred.shape[0] == 0:
        raise ValueError(f"pred and gold must both be (N,) label tensors with N >= 1, got shapes "
                         f"{tuple(pred.shape)} and {tuple(gold.shape)}")


def accuracy(pred: Tensor, gold: Tensor) -> float:
    """Share of positions where the predicted label equals the gold one; pred, gold: (N,) labels."""
    _check_labels(pred, gold)
    return float((pred == gold).double().mean())


def macro_f1(pred: Tensor, gold: Tensor, num_labels: int) -> float:
    """Unweighted mean of the per-class F1 over the classes present in pred or gold (module docstring).

    pred, gold: (N,) integer labels in [0, num_labels)."""
    _check_labels(pred, gold)
    for name, labels in (("pred", pred), ("gold", gold)):
        if bool(((labels < 0) | (labels >= num_labels)).any()):
            raise ValueError(f"{name} has labels outside [0, num_labels) = [0, {num_labels})")
    classes = torch.arange(num_labels, device=pred.device).unsqueeze(1)  # (C, 1) against (N,)
    predicted, actual = pred.unsqueeze(0) == classes, gold.unsqueeze(0) == classes
    true_pos = (predicted & actual).sum(1).double()
    false_pos = (predicted & ~actual).sum(1).double()
    false_neg = (~predicted & actual).sum(1).double()
    seen = (true_pos + false_pos + false_neg) > 0
    f1 = 2 * true_pos[seen] / (2 * true_pos[seen] + false_pos[seen] + false_neg[seen])
    return float(f1.mean())
