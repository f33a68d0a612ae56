"""Classification, regression and reranking losses (soup/losses/classification.py) against values computed by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from soup.losses.classification import (listwise_softmax_ce, pointwise_bce, regression_mse,
                                        sequence_classification_loss, weighted_cross_entropy)

ln = math.log


def log_probs(*rows):
    """Logits whose softmax is each row: log p."""
    return torch.log(torch.tensor(rows, dtype=torch.float32))


# --- classification ----------------------------------------------------------------------------------------
def test_weighted_cross_entropy_by_hand():
    # row 0: p = [0.5, 0.25, 0.25], label 1: -ln 0.25 = ln 4; row 1: p = [0.2, 0.3, 0.5], label 2: ln 2
    logits = log_probs([0.5, 0.25, 0.25], [0.2, 0.3, 0.5])
    labels = torch.tensor([1, 2])
    torch.testing.assert_close(weighted_cross_entropy(logits, labels), torch.tensor([ln(4), ln(2)]))
    # weights [1, 2, 0.5]: each row's loss times the weight of its own class
    weights = torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(weighted_cross_entropy(logits, labels, weights), torch.tensor([2 * ln(4), 0.5 * ln(2)]))


def test_the_weighted_mean_is_the_sum_over_the_labels_weights():
    # what F.cross_entropy(weight=w, reduction="mean") computes, from our per-row losses
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 3, 3, 1, 0])
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    losses = weighted_cross_entropy(logits, labels, weights)
    torch.testing.assert_close(losses.sum() / weights[labels].sum(), F.cross_entropy(logits, labels, weight=weights))


def test_regression_mse_by_hand_accepts_a_one_label_head():
    predictions = torch.tensor([[1.5], [0.0], [-1.0]])  # (B, 1), as a one-label head outputs
    targets = torch.tensor([1.0, -2.0, -1.0])
    torch.testing.assert_close(regression_mse(predictions, targets), torch.tensor([0.25, 4.0, 0.0]))


def test_sequence_classification_loss_picks_regression_for_one_label():
    one_label = torch.tensor([[3.0], [1.0]])
    torch.testing.assert_close(sequence_classification_loss(one_label, torch.tensor([1.0, 1.0])),
                               torch.tensor([4.0, 0.0]))
    two_labels = log_probs([0.75, 0.25])
    torch.testing.assert_close(sequence_classification_loss(two_labels, torch.tensor([0])), torch.tensor([ln(4 / 3)]))


def test_classification_refuses_bad_shapes_dtypes_and_weights():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"logits must be \(B, C\) and labels \(B,\)"):
        weighted_cross_entropy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="int64 class ids"):
        weighted_cross_entropy(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class_weights must be \(C,\) = \(3,\)"):
        weighted_cross_entropy(logits, torch.tensor([0, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="class_weights must be >= 0"):
        weighted_cross_entropy(logits, torch.tensor([0, 1]), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="drop class_weights"):
        sequence_classification_loss(torch.zeros(2, 1), torch.zeros(2), torch.ones(1))
    with pytest.raises(ValueError, match=r"num_labels"):
        sequence_classification_loss(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="predictions must be"):
        regression_mse(torch.zeros(2, 2), torch.zeros(2))


# --- listwise reranking ----------------------------------------------------------------------------------------
def test_listwise_with_one_relevant_candidate_is_cross_entropy_on_it():
    # softmax(scores) = [0.5, 0.25, 0.25]; target [1, 0, 0]: loss = -ln 0.5 = ln 2. Group 2's positive is
    # candidate 2: -ln 0.25 = ln 4
    scores = log_probs([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])
    labels = torch.tensor([[1, 0, 0], [0, 0, 1]])
    out = listwise_softmax_ce(scores, labels)
    torch.testing.assert_close(out, torch.tensor([ln(2), ln(4)]))
    torch.testing.assert_close(out, F.cross_entropy(scores, torch.tensor([0, 2]), reduction="none"))


def test_listwise_normalized_graded_labels_by_hand():
    # labels [2, 1, 1] -> target [0.5, 0.25, 0.25]; scores give the same distribution, so the loss is its entropy
    # -(0.5 ln 0.5 + 0.25 ln 0.25 + 0.25 ln 0.25) = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2
    scores = log_probs([0.5, 0.25, 0.25])
    out = listwise_softmax_ce(scores, torch.tensor([[2.0, 1.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([1.5 * ln(2)]))


def test_listwise_softmax_target_by_hand():
    # labels [1, 0, 0] -> target [e, 1, 1] / (e + 2); log softmax(scores) = [ln 0.5, ln 0.25, ln 0.25]
    # loss = (e ln 2 + 2 ln 4) / (e + 2) = (e + 4) ln 2 / (e + 2)
    scores = log_probs([0.5, 0.25, 0.25])
    out = listwise_softmax_ce(scores, torch.tensor([[1, 0, 0]]), target="softmax")
    torch.testing.assert_close(out, torch.tensor([(math.e + 4) * ln(2) / (math.e + 2)]))


@pytest.mark.parametrize("target", ["normalized", "softmax"])
def test_listwise_gradient_is_softmax_minus_target_and_shifts_do_not_matter(target):
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 5, generator=generator).requires_grad_()
    labels = torch.randint(0, 4, (4, 5), generator=generator).float()
    labels[:, 0] = 3.0  # every group has a relevant candidate
    loss = listwise_softmax_ce(scores, labels, target)
    (grad,) = torch.autograd.grad(loss.sum(), scores)
    target_probs = labels / labels.sum(-1, keepdim=True) if target == "normalized" else labels.softmax(-1)
    torch.testing.assert_close(grad, scores.detach().softmax(-1) - target_probs)
    shift = torch.tensor([[10.0], [-3.0], [0.0], [7.0]])  # one constant per group
    torch.testing.assert_close(listwise_softmax_ce(scores.detach() + shift, labels, target), loss.detach())


def test_listwise_refuses_what_has_no_target():
    scores = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"groups \[1\] have no relevant candidate"):
        listwise_softmax_ce(scores, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="labels >= 0"):
        listwise_softmax_ce(scores, torch.tensor([[1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="expected one of"):
        listwise_softmax_ce(scores, torch.ones(2, 3), target="sigmoid")
    with pytest.raises(ValueError, match=r"both be \(G, C\)"):
        listwise_softmax_ce(scores, torch.ones(2, 4))


# --- pointwise reranking ---------------------------------------------------------------------------------------
def test_pointwise_bce_by_hand():
    # sigmoid(0) = 0.5; sigmoid(ln 3) = 0.75, sigmoid(-ln 3) = 0.25
    scores = torch.tensor([0.0, ln(3), ln(3), ln(3)])
    labels = torch.tensor([1.0, 1.0, 0.0, 0.5])
    expected = [ln(2), ln(4 / 3), ln(4), 0.5 * ln(4 / 3) + 0.5 * ln(4)]
    torch.testing.assert_close(pointwise_bce(scores, labels), torch.tensor(expected))


def test_pointwise_bce_stays_finite_for_confidently_wrong_scores():
    # -log sigmoid(-200) = 200 + log(1 + e^-200) ~ 200, where log(sigmoid(-200)) in fp32 would be log 0
    out = pointwise_bce(torch.tensor([[-200.0]]), torch.tensor([1.0]))
    torch.testing.assert_close(out, torch.tensor([200.0]))


def test_pointwise_bce_refuses_labels_outside_the_unit_interval_and_bad_shapes():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pointwise_bce(torch.zeros(2), torch.tensor([0.0, 2.0]))
    with pytest.raises(ValueError, match="scores must be"):
        pointwise_bce(torch.zeros(2, 2), torch.zeros(2))
