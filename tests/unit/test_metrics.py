"""Evaluation metrics (soup/metrics.py) against values computed by hand."""

import math

import pytest
import torch

from soup.metrics import accuracy, average_ranks, macro_f1, mrr, mrr_any_relevant, ndcg_at_k, recall_at_k, spearman


# --- spearman --------------------------------------------------------------------------------------
def test_spearman_by_hand():
    # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1)); ranks differ by d = [0, 1, 1, 0] -> 1 - 12 / 60
    assert spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])) == pytest.approx(0.8)


def test_spearman_gives_ties_their_average_rank():
    # x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4], both centred on 2.5:
    # sum dx dy = 2.25 + 0 + 0 + 2.25 = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    x = torch.tensor([1.0, 2.0, 2.0, 3.0])
    assert average_ranks(x).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks(torch.tensor([5.0, 1.0, 5.0, 5.0])).tolist() == [3.0, 1.0, 3.0, 3.0]
    assert spearman(x, torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(math.sqrt(0.9))


def test_spearman_of_a_monotone_transform_is_one_and_of_a_reversal_minus_one():
    torch.manual_seed(0)
    x = torch.randn(50)
    assert spearman(x, torch.exp(3 * x) + 7) == pytest.approx(1.0)
    assert spearman(x, -x**3) == pytest.approx(-1.0)


def test_spearman_is_symmetric():
    torch.manual_seed(0)
    x, y = torch.randn(20), torch.randn(20)
    assert spearman(x, y) == pytest.approx(spearman(y, x))


def test_spearman_of_a_constant_is_nan():
    assert math.isnan(spearman(torch.ones(3), torch.tensor([1.0, 2.0, 3.0])))


def test_spearman_refuses_bad_input():
    with pytest.raises(ValueError, match="N >= 2"):
        spearman(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="N >= 2"):
        spearman(torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError, match="finite"):
        spearman(torch.tensor([1.0, float("nan")]), torch.ones(2))


# --- retrieval -------------------------------------------------------------------------------------
# queries q1 = [1, 0], q2 = [0, 1], q3 = [1, 1]; docs d1 = [1, 0], d2 = [1, 1], d3 = [0, 1], d4 = [-1, 0]
#   q1 (relevant d1): cos [1, 0.71, 0, -1]        -> rank 1
#   q2 (relevant d2): cos [0, 0.71, 1, 0]         -> rank 2 (d3 above)
#   q3 (relevant d3): cos [0.71, 1, 0.71, -0.71]  -> rank 3 (d2 above, d1 tied: ties count against)
QUERIES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
DOCS = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])


def test_recall_at_k_by_hand():
    assert recall_at_k(QUERIES, DOCS, 1) == pytest.approx(1 / 3)
    assert recall_at_k(QUERIES, DOCS, 2) == pytest.approx(2 / 3)
    assert recall_at_k(QUERIES, DOCS, 3) == pytest.approx(1.0)
    assert recall_at_k(QUERIES, DOCS, 4) == pytest.approx(1.0)


def test_recall_gives_a_collapsed_encoder_no_credit():
    same = torch.ones(3, 2)
    assert recall_at_k(same, same, 1) == 0.0
    assert recall_at_k(same, same, 3) == 1.0


def test_recall_refuses_bad_k_and_shapes():
    with pytest.raises(ValueError, match="k=5 must be between 1 and the number of documents D=4"):
        recall_at_k(QUERIES, DOCS, 5)
    with pytest.raises(ValueError, match="k=0"):
        recall_at_k(QUERIES, DOCS, 0)
    with pytest.raises(ValueError, match="D must be >= Q"):
        recall_at_k(DOCS, QUERIES, 1)
    with pytest.raises(ValueError, match=r"\(Q, H\)"):
        recall_at_k(QUERIES, torch.ones(4, 3), 1)
    with pytest.raises(ValueError, match="Q, D >= 1"):
        recall_at_k(torch.ones(0, 2), torch.ones(0, 2), 1)


def test_mrr_by_hand():
    # row 1: relevant doc 2 scores 0.5, only 0.9 above -> rank 2; row 2: doc 0 is the top -> rank 1
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    assert mrr(scores, torch.tensor([2, 0])) == pytest.approx((1 / 2 + 1) / 2)
    assert mrr(torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([0])) == pytest.approx(1 / 3)  # tied: last


def test_mrr_of_the_retrieval_example_matches_its_ranks():
    scores = torch.nn.functional.normalize(QUERIES, dim=-1) @ torch.nn.functional.normalize(DOCS, dim=-1).T
    assert mrr(scores, torch.arange(3)) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_mrr_refuses_bad_relevant_index():
    with pytest.raises(ValueError, match=r"\[0, D\) = \[0, 3\)"):
        mrr(torch.zeros(1, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match="relevant_index must be"):
        mrr(torch.zeros(2, 3), torch.tensor([0]))


def test_ndcg_at_k_by_hand():
    # scores [0.9, 0.8, 0.1, 0.5] rank the docs 0, 1, 3, 2 -> gains in order [0, 3, 2, 1]
    # DCG@3 = 0 / log2 2 + 3 / log2 3 + 2 / log2 4;  IDCG@3 (gains [3, 2, 1]) = 3 / 1 + 2 / log2 3 + 1 / 2
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.5]])
    gains = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    dcg = 3 / math.log2(3) + 2 / 2
    idcg = 3 + 2 / math.log2(3) + 1 / 2
    assert ndcg_at_k(scores, gains, 3) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(scores, gains, 1) == 0.0  # the top doc has gain 0


def test_ndcg_is_one_for_the_ideal_order_and_skips_queries_with_nothing_relevant():
    gains = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert ndcg_at_k(gains.clone(), gains, 2) == pytest.approx(1.0)  # row 2 has IDCG 0: left out
    with pytest.raises(ValueError, match="no query has a document with positive gain"):
        ndcg_at_k(torch.rand(1, 3), torch.zeros(1, 3), 2)


def test_ndcg_orders_tied_scores_worst_gain_first():
    # all tied: the order is gains ascending [0, 1] -> DCG@1 = 0
    assert ndcg_at_k(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 1) == 0.0


def test_ndcg_refuses_bad_input():
    with pytest.raises(ValueError, match="k=4"):
        ndcg_at_k(torch.zeros(1, 3), torch.ones(1, 3), 4)
    with pytest.raises(ValueError, match="gains must have the shape"):
        ndcg_at_k(torch.zeros(1, 3), torch.ones(1, 2), 1)
    with pytest.raises(ValueError, match=">= 0"):
        ndcg_at_k(torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), 1)


# --- classification ---------------------------------------------------------------------------------
def test_accuracy_by_hand():
    assert accuracy(torch.tensor([0, 1, 2, 1]), torch.tensor([0, 2, 2, 1])) == pytest.approx(0.75)


def test_accuracy_refuses_empty_or_mismatched_input():
    with pytest.raises(ValueError, match="N >= 1"):
        accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="N >= 1"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0]))


def test_macro_f1_by_hand():
    # pred [0, 0, 1, 1, 2], gold [0, 1, 1, 1, 0], 4 labels; F1 = 2 TP / (2 TP + FP + FN):
    #   class 0: TP 1, FP 1 (position 1), FN 1 (position 4) -> 2 / 4 = 0.5
    #   class 1: TP 2, FP 0, FN 1 (position 1)              -> 4 / 5 = 0.8
    #   class 2: TP 0, FP 1                                 -> 0
    #   class 3: in neither -> left out of the mean
    pred, gold = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])
    assert macro_f1(pred, gold, num_labels=4) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_macro_f1_is_one_when_every_label_is_right_whatever_classes_are_absent():
    labels = torch.tensor([0, 2, 2, 5])
    assert macro_f1(labels, labels.clone(), num_labels=8) == 1.0


def test_macro_f1_refuses_labels_out_of_range():
    with pytest.raises(ValueError, match=r"gold has labels outside \[0, num_labels\) = \[0, 2\)"):
        macro_f1(torch.tensor([0, 1]), torch.tensor([0, 2]), num_labels=2)


def test_mrr_any_relevant_counts_the_best_ranked_relevant_document():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.1], [0.2, 0.8, 0.8, 0.3]])
    relevant = torch.tensor([[False, True, True, False], [True, False, False, True]])
    # query 0: the relevant docs rank 3rd and 2nd -> 1/2; query 1: the relevant 0.2 and 0.3 rank 4th and 3rd -> 1/3
    assert mrr_any_relevant(scores, relevant) == pytest.approx((1 / 2 + 1 / 3) / 2)
    tied = torch.tensor([[0.5, 0.5, 0.1]])
    assert mrr_any_relevant(tied, torch.tensor([[False, True, False]])) == pytest.approx(1 / 2)  # a tie counts against
    with pytest.raises(ValueError, match="a relevant document per query"):
        mrr_any_relevant(scores, torch.zeros_like(relevant))
