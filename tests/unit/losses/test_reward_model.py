"""The Bradley-Terry reward-model loss (soup/losses/reward_model.py) against values computed by hand.

Two fixed pairs: rc = [1.0, 0.2], rr = [0.0, 0.7]  ->  rc - rr = [1.0, -0.5], rc + rr = [1.0, 0.9].
-log sigmoid(x) = log(1 + exp(-x)), written out with math below, never taken from the code under test.
"""

import math

import pytest
import torch

from soup.losses.reward_model import bradley_terry_loss

CHOSEN = [1.0, 0.2]
REJECTED = [0.0, 0.7]


def rewards(dtype=torch.float64, requires_grad=False):
    chosen = torch.tensor(CHOSEN, dtype=dtype, requires_grad=requires_grad)
    rejected = torch.tensor(REJECTED, dtype=dtype, requires_grad=requires_grad)
    return chosen, rejected


def nll(x: float) -> float:
    """-log sigmoid(x)."""
    return math.log1p(math.exp(-x))


def test_plain_loss_is_the_negative_log_likelihood_of_each_pair():
    out = bradley_terry_loss(*rewards())
    torch.testing.assert_close(out.losses, torch.tensor([nll(1.0), nll(-0.5)], dtype=torch.float64))
    assert out.losses.tolist() == pytest.approx([0.3132616875, 0.9740769842])


def test_a_per_row_margin_is_subtracted_inside_the_sigmoid():
    out = bradley_terry_loss(*rewards(), margin=torch.tensor([0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(out.losses, torch.tensor([nll(0.5), nll(-0.75)], dtype=torch.float64))


def test_a_float_margin_applies_to_every_row():
    out = bradley_terry_loss(*rewards(), margin=1.0)
    torch.testing.assert_close(out.losses, torch.tensor([nll(0.0), nll(-1.5)], dtype=torch.float64))


def test_the_centring_term_adds_coef_times_the_squared_reward_sum():
    out = bradley_terry_loss(*rewards(), center_rewards_coefficient=0.01)
    expected = [nll(1.0) + 0.01 * 1.0**2, nll(-0.5) + 0.01 * 0.9**2]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))


def test_margin_and_centring_combine():
    out = bradley_terry_loss(*rewards(), margin=torch.tensor([0.5, 0.25], dtype=torch.float64),
                             center_rewards_coefficient=0.1)
    expected = [nll(0.5) + 0.1 * 1.0, nll(-0.75) + 0.1 * 0.81]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))


def test_metrics_are_accuracy_and_the_mean_margin_and_rewards():
    out = bradley_terry_loss(*rewards(), margin=torch.tensor([5.0, 5.0], dtype=torch.float64))
    metrics = {name: value.item() for name, value in out.metrics.items()}
    # The target margin changes the loss, not the reported margin rc - rr.
    assert metrics == pytest.approx({"accuracy": 0.5, "margin": 0.25, "chosen_reward": 0.6, "rejected_reward": 0.35})
    assert all(not value.requires_grad for value in out.metrics.values())


def test_a_tie_counts_as_half_a_correct_pair():
    out = bradley_terry_loss(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([1.0, 1.0, 4.0, 5.0]))
    assert out.metrics["accuracy"].item() == pytest.approx((0.5 + 1.0 + 0.0 + 0.5) / 4)


def test_equal_rewards_cost_log_2_per_row():
    same = torch.tensor([-3.0, 0.0, 2.5])
    out = bradley_terry_loss(same, same.clone())
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2.0)))
    assert out.metrics["accuracy"].item() == 0.5


def test_raising_the_chosen_reward_lowers_the_loss_and_raising_the_rejected_raises_it():
    chosen, rejected = rewards(requires_grad=True)
    grad_chosen, grad_rejected = torch.autograd.grad(bradley_terry_loss(chosen, rejected).losses.sum(),
                                                     (chosen, rejected))
    assert (grad_chosen < 0).all() and (grad_rejected > 0).all()
    # d/d rc of -log sigmoid(rc - rr) = -sigmoid(-(rc - rr)) = -1 / (1 + exp(rc - rr))
    torch.testing.assert_close(grad_chosen, torch.tensor([-1 / (1 + math.exp(1.0)), -1 / (1 + math.exp(-0.5))],
                                                         dtype=torch.float64))
    torch.testing.assert_close(grad_rejected, -grad_chosen)


def test_the_centring_gradient_pulls_both_rewards_towards_zero():
    chosen, rejected = rewards(requires_grad=True)
    out = bradley_terry_loss(chosen, rejected, center_rewards_coefficient=0.5)
    grad_chosen, grad_rejected = torch.autograd.grad(out.losses.sum(), (chosen, rejected))
    # + 2 * eta * (rc + rr) on both rewards, on top of the Bradley-Terry gradient
    bt = torch.tensor([-1 / (1 + math.exp(1.0)), -1 / (1 + math.exp(-0.5))], dtype=torch.float64)
    centring = torch.tensor([2 * 0.5 * 1.0, 2 * 0.5 * 0.9], dtype=torch.float64)
    torch.testing.assert_close(grad_chosen, bt + centring)
    torch.testing.assert_close(grad_rejected, -bt + centring)


def test_the_margin_gets_no_gradient():
    margin = torch.tensor([0.5, 0.25], requires_grad=True)
    out = bradley_terry_loss(torch.tensor(CHOSEN), torch.tensor(REJECTED), margin=margin)
    assert not out.losses.requires_grad


def test_large_reward_differences_stay_finite_in_float32():
    chosen = torch.tensor([1000.0, -1000.0, 60.0], requires_grad=True)
    rejected = torch.tensor([-1000.0, 1000.0, -60.0], requires_grad=True)
    out = bradley_terry_loss(chosen, rejected)
    assert torch.isfinite(out.losses).all()
    # -log sigmoid(2000) ~ 0 and -log sigmoid(-2000) ~ 2000 (a naive log(sigmoid(x)) gives inf)
    assert out.losses[0].item() == pytest.approx(0.0, abs=1e-6) and out.losses[1].item() == pytest.approx(2000.0)
    grads = torch.autograd.grad(out.losses.sum(), (chosen, rejected))
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(grads[0], torch.tensor([0.0, -1.0, 0.0]), atol=1e-6, rtol=0)


def test_bfloat16_rewards_keep_their_dtype():
    out = bradley_terry_loss(torch.tensor(CHOSEN, dtype=torch.bfloat16), torch.tensor(REJECTED, dtype=torch.bfloat16))
    assert out.losses.dtype == torch.bfloat16
    assert out.losses.float().tolist() == pytest.approx([nll(1.0), nll(-0.5)], rel=1e-2)


@pytest.mark.parametrize("chosen, rejected, margin, match", [
    (torch.zeros(2, 1), torch.zeros(2, 1), None, "must both be"),
    (torch.zeros(2), torch.zeros(3), None, "must both be"),
    (torch.zeros(2), torch.zeros(2), torch.zeros(3), "margin must be"),
])
def test_mismatched_shapes_are_refused(chosen, rejected, margin, match):
    with pytest.raises(ValueError, match=match):
        bradley_terry_loss(chosen, rejected, margin=margin)


def test_a_negative_centring_coefficient_is_refused():
    with pytest.raises(ValueError, match="center_rewards_coefficient"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), center_rewards_coefficient=-0.01)
