"""Embedding losses (soup/losses/embedding.py) against values computed by hand from each paper's formula."""

import math

import pytest
import torch

from soup.losses.embedding import cosent, cosine_regression, info_nce, matryoshka, normalise, pool


def log1p_sum_exp(*exponents):
    """log(1 + sum exp(e)) in plain Python, for the hand computations."""
    return math.log(1 + sum(math.exp(e) for e in exponents))


# --- pooling -------------------------------------------------------------------------------------
def test_mean_pooling_averages_real_tokens_only():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]],
                           [[5.0, 6.0], [-9.0, 9.0], [-9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(pool(hidden, mask, "mean"), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


def test_cls_and_last_find_the_real_tokens_under_right_and_left_padding():
    hidden = torch.arange(12.0).view(2, 3, 2)  # token t of row b holds [6b + 2t, 6b + 2t + 1]
    right = torch.tensor([[1, 1, 0], [1, 0, 0]])
    left = torch.tensor([[0, 1, 1], [0, 0, 1]])
    torch.testing.assert_close(pool(hidden, right, "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))  # t = 0, 0
    torch.testing.assert_close(pool(hidden, right, "last"), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))  # t = 1, 0
    torch.testing.assert_close(pool(hidden, left, "cls"), torch.tensor([[2.0, 3.0], [10.0, 11.0]]))  # t = 1, 2
    torch.testing.assert_close(pool(hidden, left, "last"), torch.tensor([[4.0, 5.0], [10.0, 11.0]]))  # t = 2, 2


def test_pooling_is_the_same_whichever_side_holds_the_padding():
    torch.manual_seed(0)
    text = torch.randn(1, 2, 4)
    pad = torch.randn(1, 1, 4) * 50
    right = pool(torch.cat([text, pad], 1), torch.tensor([[1, 1, 0]]), "mean")
    left = pool(torch.cat([pad, text], 1), torch.tensor([[0, 1, 1]]), "mean")
    torch.testing.assert_close(right, left)
    torch.testing.assert_close(right, text.mean(1))


def test_mean_pooling_keeps_the_input_dtype():
    hidden = torch.ones(2, 3, 4, dtype=torch.bfloat16)
    assert pool(hidden, torch.ones(2, 3), "mean").dtype == torch.bfloat16


def test_pooling_refuses_bad_input():
    with pytest.raises(ValueError, match="mode="):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "max")
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least one real token"):
        pool(torch.zeros(2, 2, 3), torch.tensor([[1, 0], [0, 0]]), "last")


def test_normalise_gives_unit_vectors_and_leaves_zero_at_zero():
    out = normalise(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


# --- info_nce --------------------------------------------------------------------------------------
# anchors a1 = [2, 0], a2 = [4, 3]; positives p1 = [1, 0], p2 = [0, 1]:
#   cos(a1, p1) = 1, cos(a1, p2) = 0, cos(a2, p1) = 0.8, cos(a2, p2) = 0.6
ANCHORS = torch.tensor([[2.0, 0.0], [4.0, 3.0]])
POSITIVES = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_info_nce_by_hand():
    # scale 5: row 1 logits [5, 0], target 0 -> -5 + log(e^5 + e^0) = log(1 + e^-5)
    #          row 2 logits [4, 3], target 1 -> -3 + log(e^4 + e^3) = log(1 + e^1)
    out = info_nce(ANCHORS, POSITIVES, scale=5.0)
    torch.testing.assert_close(out.losses, torch.tensor([log1p_sum_exp(-5), log1p_sum_exp(1)]))
    assert out.metrics["accuracy"].item() == pytest.approx(0.5)  # row 2 prefers p1 (0.8 > 0.6)
    assert out.metrics["positive_cos"].item() == pytest.approx((1 + 0.6) / 2)
    assert out.metrics["negative_cos"].item() == pytest.approx((0 + 0.8) / 2)


def test_info_nce_with_hard_negatives_by_hand():
    # n1 = [1, 1], n2 = [0, -1]; every anchor sees [p1, p2, n1, n2]:
    #   a1: cos [1, 0, 1/sqrt 2, 0]        -> logits [5, 0, 5/sqrt 2, 0], target 0
    #   a2: cos [0.8, 0.6, 7/(5 sqrt 2), -0.6] -> logits [4, 3, 3.5 sqrt 2, -3], target 1
    hard = torch.tensor([[[1.0, 1.0]], [[0.0, -1.0]]])
    out = info_nce(ANCHORS, POSITIVES, hard, scale=5.0)
    row1 = log1p_sum_exp(-5, 5 / math.sqrt(2) - 5, -5)
    row2 = log1p_sum_exp(4 - 3, 3.5 * math.sqrt(2) - 3, -3 - 3)
    torch.testing.assert_close(out.losses, torch.tensor([row1, row2]))
    assert out.metrics["accuracy"].item() == pytest.approx(0.5)  # a2's top candidate is n1


def test_symmetric_info_nce_by_hand():
    # positive -> anchor, scale 5: p1 vs [a1, a2]: cos [1, 0.8], target 0 -> log(1 + e^-1)
    #                               p2 vs [a1, a2]: cos [0, 0.6], target 1 -> log(1 + e^-3)
    out = info_nce(ANCHORS, POSITIVES, scale=5.0, symmetric=True)
    expected = [(log1p_sum_exp(-5) + log1p_sum_exp(-1)) / 2, (log1p_sum_exp(1) + log1p_sum_exp(-3)) / 2]
    torch.testing.assert_close(out.losses, torch.tensor(expected))


def test_symmetric_is_the_mean_of_both_directions_and_hard_negatives_serve_the_forward_one():
    torch.manual_seed(0)
    anchors, positives, hard = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8)
    forward = info_nce(anchors, positives, hard).losses
    backward = info_nce(positives, anchors).losses
    torch.testing.assert_close(info_nce(anchors, positives, hard, symmetric=True).losses, (forward + backward) / 2)


def test_identical_orthogonal_pairs_with_a_large_scale_give_zero_loss():
    # each anchor's positive has cos 1, every negative cos 0: loss = log(1 + 3 e^-100) ~ 3e-44
    embeddings = torch.eye(4) * torch.tensor([[1.0], [2.0], [0.5], [7.0]])
    out = info_nce(embeddings, embeddings.clone(), scale=100.0, symmetric=True)
    assert out.losses.max().item() < 1e-6
    assert out.metrics["accuracy"].item() == 1.0


def test_info_nce_is_permutation_equivariant_and_ignores_norms():
    torch.manual_seed(0)
    anchors, positives, hard = torch.randn(5, 6), torch.randn(5, 6), torch.randn(5, 3, 6)
    losses = info_nce(anchors, positives, hard).losses
    order = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(info_nce(anchors[order], positives[order], hard[order]).losses, losses[order])
    norms = torch.rand(5, 1) + 0.1
    torch.testing.assert_close(info_nce(anchors * norms, positives * 3, hard).losses, losses)


def test_bf16_embeddings_are_compared_in_float32():
    torch.manual_seed(0)
    anchors, positives = torch.randn(4, 16).bfloat16(), torch.randn(4, 16).bfloat16()
    losses = info_nce(anchors, positives).losses
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses, info_nce(anchors.float(), positives.float()).losses)


def test_info_nce_refuses_mismatched_shapes_and_batches_without_negatives():
    with pytest.raises(ValueError, match="anchors and positives"):
        info_nce(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="hard_negatives must be"):
        info_nce(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="at least one negative"):
        info_nce(torch.ones(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match="B >= 1"):
        info_nce(torch.zeros(0, 3), torch.zeros(0, 3))


# --- cosent ----------------------------------------------------------------------------------------
# emb1 all [1, 0], emb2 = [1, 0], [0, 1], [3, 4]  ->  cos = [1, 0, 0.6]
EMB1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
EMB2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])


def test_cosent_by_hand():
    # scores [0.9, 0.1, 0.5]: ordered pairs (i > j): (0, 1), (0, 2), (2, 1)
    # exponents scale (c_j - c_i), scale 5: 5 (0 - 1) = -5, 5 (0.6 - 1) = -2, 5 (0 - 0.6) = -3
    out = cosent(EMB1, EMB2, torch.tensor([0.9, 0.1, 0.5]), scale=5.0)
    assert out.losses.ndim == 0
    assert out.losses.item() == pytest.approx(log1p_sum_exp(-5, -2, -3), rel=1e-6)
    assert out.metrics["pair_accuracy"].item() == 1.0


def test_cosent_tied_scores_form_no_pair():
    # scores [0.5, 0.5, 0.1]: pairs (0, 2): 5 (0.6 - 1) = -2 and (1, 2): 5 (0.6 - 0) = 3, the one violated
    out = cosent(EMB1, EMB2, torch.tensor([0.5, 0.5, 0.1]), scale=5.0)
    assert out.losses.item() == pytest.approx(log1p_sum_exp(-2, 3), rel=1e-6)
    assert out.metrics["pair_accuracy"].item() == pytest.approx(0.5)
    all_tied = cosent(EMB1, EMB2, torch.full((3,), 0.3))
    assert all_tied.losses.item() == 0.0  # log(1 + empty sum)


def test_cosent_sees_only_the_order_of_the_scores():
    torch.manual_seed(0)
    emb1, emb2, scores = torch.randn(6, 4), torch.randn(6, 4), torch.rand(6)
    loss = cosent(emb1, emb2, scores).losses
    torch.testing.assert_close(cosent(emb1, emb2, torch.exp(10 * scores) - 3).losses, loss)


def test_cosent_stays_finite_at_a_large_scale():
    # one violated pair: cos [1, 0], scores [0.1, 0.9] -> log(1 + e^(1e4 (1 - 0))) = 1e4 + log(1 + e^-1e4)
    emb1, emb2 = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb1.requires_grad_()
    out = cosent(emb1, emb2, torch.tensor([0.1, 0.9]), scale=1e4)
    assert out.losses.item() == pytest.approx(1e4)
    out.losses.backward()
    assert torch.isfinite(emb1.grad).all()


def test_cosent_refuses_scores_of_the_wrong_shape():
    with pytest.raises(ValueError, match="scores must be"):
        cosent(EMB1, EMB2, torch.zeros(2))


# --- cosine_regression -----------------------------------------------------------------------------
def test_cosine_regression_by_hand():
    # cos [1, 0, 0.6] against [0.5, 0.2, 0.6]: (0.5)^2, (0.2)^2, 0
    out = cosine_regression(EMB1, EMB2, torch.tensor([0.5, 0.2, 0.6]))
    torch.testing.assert_close(out.losses, torch.tensor([0.25, 0.04, 0.0]))
    assert out.metrics["mean_cos"].item() == pytest.approx(1.6 / 3)


def test_cosine_regression_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="emb1 and emb2"):
        cosine_regression(EMB1, EMB2[:2], torch.zeros(3))


# --- matryoshka ------------------------------------------------------------------------------------
def test_matryoshka_by_hand():
    # emb1 = [1, 1, 0], emb2 = [1, -1, 1], score 0.2
    #   d = 1: cos([1], [1]) = 1                       -> (1 - 0.2)^2 = 0.64, weight 1
    #   d = 3: cos = (1 - 1 + 0) / (sqrt 2 sqrt 3) = 0  -> (0 - 0.2)^2 = 0.04, weight 0.5
    loss = matryoshka(cosine_regression, dims=[1, 3], weights=[1.0, 0.5])
    out = loss(torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, -1.0, 1.0]]), torch.tensor([0.2]))
    torch.testing.assert_close(out.losses, torch.tensor([0.64 + 0.5 * 0.04]))
    assert out.metrics["dim1/loss"].item() == pytest.approx(0.64)
    assert out.metrics["dim3/mean_cos"].item() == pytest.approx(0.0, abs=1e-7)


def test_matryoshka_equals_the_sum_over_truncated_inputs_including_hard_negatives():
    torch.manual_seed(0)
    anchors, positives, hard = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 2, 8)
    out = matryoshka(info_nce, dims=[8, 4, 2])(anchors, positives, hard_negatives=hard, scale=10.0)
    expected = sum(info_nce(anchors[:, :d], positives[:, :d], hard[..., :d], scale=10.0).losses for d in (8, 4, 2))
    torch.testing.assert_close(out.losses, expected)


def test_matryoshka_leaves_the_scores_alone():
    torch.manual_seed(0)
    emb1, emb2, scores = torch.randn(4, 6), torch.randn(4, 6), torch.rand(4)
    out = matryoshka(cosent, dims=[3])(emb1, emb2, scores)
    torch.testing.assert_close(out.losses, cosent(emb1[:, :3], emb2[:, :3], scores).losses)


def test_matryoshka_refuses_bad_dims_and_weights():
    with pytest.raises(ValueError, match="distinct positive"):
        matryoshka(cosine_regression, dims=[])
    with pytest.raises(ValueError, match="distinct positive"):
        matryoshka(cosine_regression, dims=[4, 4])
    with pytest.raises(ValueError, match="one entry per dim"):
        matryoshka(cosine_regression, dims=[2, 4], weights=[1.0])
    with pytest.raises(ValueError, match="exceeds the embedding size 3"):
        matryoshka(cosine_regression, dims=[4])(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2))
