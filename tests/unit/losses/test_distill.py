"""Distillation divergences (soup/losses/distill.py) against values computed by hand on a 3-token vocabulary."""

import math

import pytest
import torch

from soup.losses.distill import (TopKTeacher, distill_loss, divergence, forward_kl, generalized_jsd,
                                 reverse_kl)

ln = math.log
# One position, V = 3. Logits are log-probabilities, so at T = 1 the softmax gives these probabilities back.
P_STUDENT = [0.5, 0.25, 0.25]
P_TEACHER = [0.8, 0.1, 0.1]
# KL(T || S) = 0.8 ln(0.8 / 0.5) + 0.1 ln(0.1 / 0.25) + 0.1 ln(0.1 / 0.25) = 0.8 ln 1.6 + 0.2 ln 0.4 ~ 0.19274
FORWARD = 0.8 * ln(1.6) + 0.2 * ln(0.4)
# KL(S || T) = 0.5 ln(0.5 / 0.8) + 0.25 ln(0.25 / 0.1) + 0.25 ln(0.25 / 0.1) = 0.5 ln 0.625 + 0.5 ln 2.5 ~ 0.22314
REVERSE = 0.5 * ln(0.625) + 0.5 * ln(2.5)
DIVERGENCE_NAMES = ("forward_kl", "reverse_kl", "generalized_jsd")


def logits_of(*probs, temperature=1.0):
    """(len(probs), V) logits whose softmax at `temperature` is each row of probs: T log p."""
    return temperature * torch.log(torch.tensor(probs, dtype=torch.float32))


def random_pair(n=6, v=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=generator) * 2, torch.randn(n, v, generator=generator) * 2


def topk_of(teacher_logits, k, temperature=1.0):
    logprobs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return TopKTeacher(values, indices)


# --- hand-computed values ------------------------------------------------------------------------------------
def test_forward_and_reverse_kl_by_hand():
    student, teacher = logits_of(P_STUDENT), logits_of(P_TEACHER)
    torch.testing.assert_close(forward_kl(student, teacher), torch.tensor([FORWARD]))
    torch.testing.assert_close(reverse_kl(student, teacher), torch.tensor([REVERSE]))


def test_generalized_jsd_at_one_half_by_hand():
    # M = 0.5 p_T + 0.5 p_S = [0.65, 0.175, 0.175]
    # JSD = 0.5 [0.8 ln(0.8/0.65) + 0.2 ln(0.1/0.175)] + 0.5 [0.5 ln(0.5/0.65) + 0.5 ln(0.25/0.175)]
    expected = (0.5 * (0.8 * ln(0.8 / 0.65) + 0.2 * ln(0.1 / 0.175))
                + 0.5 * (0.5 * ln(0.5 / 0.65) + 0.5 * ln(0.25 / 0.175)))
    out = generalized_jsd(logits_of(P_STUDENT), logits_of(P_TEACHER), beta=0.5)
    torch.testing.assert_close(out, torch.tensor([expected]))


def test_generalized_jsd_at_one_quarter_weights_the_teacher_term_by_beta():
    # M = 0.25 p_T + 0.75 p_S = [0.2 + 0.375, 0.025 + 0.1875, 0.025 + 0.1875] = [0.575, 0.2125, 0.2125]
    # JSD = 0.25 KL(p_T || M) + 0.75 KL(p_S || M)
    kl_teacher_mixture = 0.8 * ln(0.8 / 0.575) + 0.2 * ln(0.1 / 0.2125)
    kl_student_mixture = 0.5 * ln(0.5 / 0.575) + 0.5 * ln(0.25 / 0.2125)
    out = generalized_jsd(logits_of(P_STUDENT), logits_of(P_TEACHER), beta=0.25)
    torch.testing.assert_close(out, torch.tensor([0.25 * kl_teacher_mixture + 0.75 * kl_student_mixture]))


def test_temperature_softens_both_sides_and_t_squared_rescales():
    # logits T log p: at T = 2 the distributions are P_STUDENT and P_TEACHER again, so KL = FORWARD, times T^2 = 4
    student, teacher = logits_of(P_STUDENT, temperature=2.0), logits_of(P_TEACHER, temperature=2.0)
    unscaled = forward_kl(student, teacher, temperature=2.0, scale_by_t_squared=False)
    torch.testing.assert_close(unscaled, torch.tensor([FORWARD]))
    torch.testing.assert_close(forward_kl(student, teacher, temperature=2.0), torch.tensor([4 * FORWARD]))


def test_several_positions_give_one_loss_each():
    student = logits_of(P_STUDENT, P_STUDENT, P_TEACHER)
    teacher = logits_of(P_TEACHER, P_STUDENT, P_STUDENT)
    # row 0 as above, row 1 identical distributions, row 2 the two swapped: KL(S || T) of the first row
    torch.testing.assert_close(forward_kl(student, teacher), torch.tensor([FORWARD, 0.0, REVERSE]))


def test_a_teacher_token_masked_to_minus_infinity_counts_as_zero_probability():
    # p_T = [0.5, 0.5, 0]: KL(T || S) = 0.5 ln(0.5 / 0.5) + 0.5 ln(0.5 / 0.25) + 0 = 0.5 ln 2
    student = logits_of(P_STUDENT).requires_grad_()
    teacher = torch.tensor([[0.0, 0.0, float("-inf")]])
    loss = forward_kl(student, teacher)
    torch.testing.assert_close(loss, torch.tensor([0.5 * ln(2)]))
    (grad,) = torch.autograd.grad(loss.sum(), student)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.25, 0.25]]))  # p_S - p_T
    # reverse KL puts student mass where the teacher has none: infinite, as the mathematics says
    assert reverse_kl(student, teacher).isinf().all()


# --- top-k teachers -----------------------------------------------------------------------------------------
def test_top_one_teacher_by_hand():
    # p_T = [0.7, 0.2, 0.1], k = 1: buckets {token 0, rest}: teacher [0.7, 0.3], student [0.5, 0.5]
    student = logits_of(P_STUDENT)
    teacher = TopKTeacher(torch.log(torch.tensor([[0.7]])), torch.tensor([[0]]))
    torch.testing.assert_close(forward_kl(student, teacher), torch.tensor([0.7 * ln(1.4) + 0.3 * ln(0.6)]))
    torch.testing.assert_close(reverse_kl(student, teacher), torch.tensor([0.5 * ln(0.5 / 0.7) + 0.5 * ln(0.5 / 0.3)]))
    # the full forward KL, 0.7 ln 1.4 + 0.2 ln 0.8 + 0.1 ln 0.4 ~ 0.0993, is larger than the bucketed ~ 0.0823
    full = forward_kl(student, logits_of([0.7, 0.2, 0.1]))
    torch.testing.assert_close(full, torch.tensor([0.7 * ln(1.4) + 0.2 * ln(0.8) + 0.1 * ln(0.4)]))
    assert forward_kl(student, teacher).item() < full.item()


def test_top_two_teacher_gathers_the_student_at_the_teacher_indices():
    # teacher's top 2 are tokens 2 (0.6) and 0 (0.3), rest 0.1; student at [2, 0] is [0.25, 0.5], rest 0.25
    student = logits_of(P_STUDENT)
    teacher = TopKTeacher(torch.log(torch.tensor([[0.6, 0.3]])), torch.tensor([[2, 0]]))
    expected = 0.6 * ln(0.6 / 0.25) + 0.3 * ln(0.3 / 0.5) + 0.1 * ln(0.1 / 0.25)
    torch.testing.assert_close(forward_kl(student, teacher), torch.tensor([expected]))


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_top_k_with_k_equal_to_the_vocabulary_is_the_full_divergence(name):
    student, teacher = random_pair()
    for temperature in (1.0, 2.0):
        cached = topk_of(teacher, k=teacher.shape[1], temperature=temperature)
        torch.testing.assert_close(divergence(name, student, cached, beta=0.3, temperature=temperature),
                                   divergence(name, student, teacher, beta=0.3, temperature=temperature))


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_top_k_never_exceeds_the_full_divergence(name):
    # merging tokens into one bucket cannot increase an f-divergence (data-processing inequality)
    student, teacher = random_pair(n=8, v=9, seed=1)
    full = divergence(name, student, teacher, beta=0.7)
    for k in (1, 3, 8):
        assert (divergence(name, student, topk_of(teacher, k), beta=0.7) <= full + 1e-6).all()


def test_a_top_k_teacher_whose_mass_rounds_to_one_keeps_the_reverse_kl_finite():
    # two of three tokens carry all the teacher's mass: its rest is floored at the smallest float, not 0
    teacher = TopKTeacher(torch.log(torch.tensor([[0.5, 0.5]])), torch.tensor([[0, 1]]))
    student = logits_of(P_STUDENT)
    assert torch.isfinite(reverse_kl(student, teacher)).all()
    # the forward KL barely notices the floor: 0.5 ln(0.5 / 0.5) + 0.5 ln(0.5 / 0.25)
    torch.testing.assert_close(forward_kl(student, teacher), torch.tensor([0.5 * ln(2)]))


# --- invariants -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_every_divergence_is_zero_when_the_student_is_the_teacher(name, beta):
    logits, _ = random_pair()
    zeros = torch.zeros(logits.shape[0])
    torch.testing.assert_close(divergence(name, logits, logits.clone(), beta=beta, temperature=1.5), zeros)
    torch.testing.assert_close(divergence(name, logits, topk_of(logits, 3, 1.5), beta=beta, temperature=1.5),
                               zeros, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_every_divergence_is_non_negative(name):
    student, teacher = random_pair(n=32, v=11, seed=2)
    assert (divergence(name, student, teacher, beta=0.2) >= 0).all()


def test_jsd_at_one_half_is_symmetric_and_bounded_by_log_two():
    student, teacher = random_pair(seed=3)
    forward_direction = generalized_jsd(student, teacher, beta=0.5)
    torch.testing.assert_close(forward_direction, generalized_jsd(teacher, student, beta=0.5))
    far_apart = generalized_jsd(torch.tensor([[30.0, 0.0]]), torch.tensor([[0.0, 30.0]]), beta=0.5)
    # almost disjoint supports: JSD_0.5 reaches its bound ln 2 (up to fp32 rounding), never more
    assert far_apart.item() <= ln(2) + 1e-6 and far_apart.item() == pytest.approx(ln(2), rel=1e-4)


def test_jsd_limits_are_forward_and_reverse_kl_and_the_formula_approaches_them_scaled():
    student, teacher = random_pair(seed=4)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=0.0), forward_kl(student, teacher))
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1.0), reverse_kl(student, teacher))
    # near the ends the formula is beta x forward KL and (1 - beta) x reverse KL, plus O(eps^2): the relative
    # gap shrinks like eps (about 3% at 1e-3 on these logits, 0.4% at 1e-4, where fp32 rounding takes over)
    eps = 1e-4
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=eps) / eps, forward_kl(student, teacher),
                               rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(generalized_jsd(student, teacher, beta=1 - eps) / eps, reverse_kl(student, teacher),
                               rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_the_t_squared_flag_scales_by_exactly_t_squared(name):
    student, teacher = random_pair(seed=5)
    scaled = divergence(name, student, teacher, temperature=3.0, scale_by_t_squared=True)
    unscaled = divergence(name, student, teacher, temperature=3.0, scale_by_t_squared=False)
    torch.testing.assert_close(scaled, 9.0 * unscaled)


def test_forward_kl_gradient_is_student_minus_teacher_over_t():
    student, teacher = random_pair(seed=6)
    student.requires_grad_()
    temperature = 2.0
    loss = forward_kl(student, teacher, temperature=temperature, scale_by_t_squared=False)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    p_student = torch.softmax(student.detach() / temperature, -1)
    p_teacher = torch.softmax(teacher / temperature, -1)
    torch.testing.assert_close(grad, (p_student - p_teacher) / temperature)


def test_no_gradient_reaches_the_teacher():
    student, teacher = random_pair(seed=7)
    teacher.requires_grad_()
    for name in DIVERGENCE_NAMES:
        assert not divergence(name, student, teacher).requires_grad


def test_half_precision_logits_give_float32_losses():
    student, teacher = random_pair(seed=8)
    out = forward_kl(student.bfloat16(), teacher.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, forward_kl(student.bfloat16().float(), teacher.bfloat16().float()))


# --- distill_loss ---------------------------------------------------------------------------------------------
def test_distill_loss_mixes_the_scaled_divergence_with_cross_entropy_at_t_one():
    # at T = 2 the distributions are P_STUDENT, P_TEACHER: scaled forward KL = 4 FORWARD.
    # at T = 1 the student logits 2 ln p give p^2 / sum p^2 = [0.25, 0.0625, 0.0625] / 0.375 = [2/3, 1/6, 1/6],
    # so the cross-entropy of label 0 is -ln(2/3) = ln 1.5.
    student, teacher = logits_of(P_STUDENT, temperature=2.0), logits_of(P_TEACHER, temperature=2.0)
    out = distill_loss(student, teacher, torch.tensor([0]), alpha=0.25, temperature=2.0)
    torch.testing.assert_close(out, torch.tensor([0.25 * 4 * FORWARD + 0.75 * ln(1.5)]))


def test_distill_loss_at_alpha_one_is_the_divergence_and_needs_no_labels():
    student, teacher = random_pair(seed=9)
    torch.testing.assert_close(distill_loss(student, teacher, None, alpha=1.0, divergence_name="generalized_jsd",
                                            beta=0.4),
                               generalized_jsd(student, teacher, beta=0.4))


def test_distill_loss_at_alpha_zero_is_the_cross_entropy():
    student, teacher = random_pair(seed=10)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    expected = torch.nn.functional.cross_entropy(student, labels, reduction="none")
    torch.testing.assert_close(distill_loss(student, teacher, labels, alpha=0.0, temperature=4.0), expected)


# --- refused inputs -------------------------------------------------------------------------------------------
def test_shape_mismatches_are_refused():
    student = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must have the student's shape"):
        forward_kl(student, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"student_logits must be \(N, V\)"):
        forward_kl(torch.zeros(2, 5, 3), torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="must both be"):
        forward_kl(student, TopKTeacher(torch.zeros(2, 2), torch.zeros(2, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match="must both be"):
        forward_kl(student, TopKTeacher(torch.zeros(3, 1), torch.zeros(3, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match="k=4 > V=3"):
        forward_kl(student, TopKTeacher(torch.full((2, 4), -2.0), torch.zeros(2, 4, dtype=torch.int64)))
    with pytest.raises(ValueError, match="labels must be"):
        distill_loss(student, student, torch.zeros(3, dtype=torch.int64), alpha=0.5)


def test_a_top_k_teacher_given_raw_logits_or_int32_indices_is_refused():
    student = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="not raw logits"):
        forward_kl(student, TopKTeacher(torch.tensor([[5.0, 2.0]]), torch.tensor([[0, 1]])))
    with pytest.raises(ValueError, match="int64"):
        forward_kl(student, TopKTeacher(torch.tensor([[-1.0]]), torch.tensor([[0]], dtype=torch.int32)))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(torch.zeros(1, 3), torch.zeros(1, 3), temperature=temperature)


@pytest.mark.parametrize("beta", [-0.1, 1.1])
def test_beta_outside_the_unit_interval_is_refused(beta):
    with pytest.raises(ValueError, match=r"beta=.* must be in \[0, 1\]"):
        generalized_jsd(torch.zeros(1, 3), torch.zeros(1, 3), beta=beta)


@pytest.mark.parametrize("alpha", [-0.5, 1.5])
def test_alpha_outside_the_unit_interval_is_refused(alpha):
    with pytest.raises(ValueError, match=r"alpha=.* must be in \[0, 1\]"):
        distill_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]), alpha=alpha)


def test_missing_labels_and_unknown_divergences_are_refused():
    with pytest.raises(ValueError, match="labels are needed"):
        distill_loss(torch.zeros(1, 3), torch.zeros(1, 3), None, alpha=0.5)
    with pytest.raises(ValueError, match="expected one of"):
        distill_loss(torch.zeros(1, 3), torch.zeros(1, 3), None, alpha=1.0, divergence_name="tvd")
