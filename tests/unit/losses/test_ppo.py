"""PPO and RLOO (soup/losses/ppo.py) against values computed by hand from each paper's formula."""

import math

import pytest
import torch

from soup.losses.ppo import (AdaptiveKLController, FixedKLController, clipped_policy_loss, clipped_value_loss,
                             explained_variance, gae, last_token_index, masked_mean, masked_var, masked_whiten,
                             per_token_kl, ppo_rewards, rloo_advantages, rloo_rewards)


# --- masked statistics ----------------------------------------------------------------------------
def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # (1 + 0 + 1) / (3 - 1)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)


def test_the_unbiased_variance_of_one_entry_is_refused():
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 0]]))


def test_whitening_matches_whitening_the_real_entries_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 5) * 4 + 2
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    real = x[mask.bool()]
    expected = (real - real.mean()) / torch.sqrt(real.var() + 1e-8)
    out = masked_whiten(x, mask)
    torch.testing.assert_close(out[mask.bool()], expected)
    assert out[~mask.bool()].tolist() == [0.0] * 5
    assert masked_mean(out, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(out, mask).item() == pytest.approx(1.0, rel=1e-5)


def test_whitening_without_shifting_the_mean_keeps_it():
    x = torch.tensor([[1.0, 3.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])  # real entries 1, 3: mean 2, unbiased var 2
    out = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(out, torch.tensor([[2 - 1 / math.sqrt(2), 2 + 1 / math.sqrt(2), 0.0]]))


# --- KL and rewards ---------------------------------------------------------------------------------
def test_kl_estimators_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-0.5, -2.5, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(per_token_kl(logps, ref, mask, "k1"), torch.tensor([[-0.5, 0.5, 0.0]]))
    # k3 = exp(ref - logps) - (ref - logps) - 1 with ref - logps = 0.5, -0.5
    k3 = [math.exp(0.5) - 0.5 - 1, math.exp(-0.5) + 0.5 - 1, 0.0]
    torch.testing.assert_close(per_token_kl(logps, ref, mask, "k3"), torch.tensor([k3]))


def test_k3_is_never_negative():
    torch.manual_seed(0)
    logps, ref = torch.randn(8, 16) * 3, torch.randn(8, 16) * 3
    assert (per_token_kl(logps, ref, torch.ones(8, 16), "k3") >= 0).all()


def test_an_unknown_kl_estimator_is_refused():
    with pytest.raises(ValueError, match="estimator"):
        per_token_kl(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "k2")


def test_the_score_lands_on_the_last_real_token_of_each_row():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    assert last_token_index(mask).tolist() == [2, 0, 1]
    logps = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -9.0, -9.0], [-1.0, -1.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, 0.0, 0.0], [-1.0, -2.0, 0.0]])
    # k1 = logps - ref on real tokens: [0.5, 0, -0.5], [-1], [0, 1]; x -0.1
    rewards, non_score = ppo_rewards(torch.tensor([1.0, 2.0, 3.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(non_score, torch.tensor([[-0.05, 0.0, 0.05], [0.1, 0.0, 0.0], [0.0, -0.1, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 0.0, 1.05], [2.1, 0.0, 0.0], [0.0, 2.9, 0.0]]))


def test_a_row_without_real_tokens_is_refused():
    with pytest.raises(ValueError, match="at least one real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


# --- GAE ---------------------------------------------------------------------------------------------
def test_gae_by_hand():
    # gamma = 0.9, lam = 0.8 (gamma lam = 0.72), r = [0.1, 0, 1], V = [0.5, 0.4, 0.3], V_3 = 0:
    # t=2: delta = 1 + 0.9 x 0 - 0.3 = 0.7                   A_2 = 0.7
    # t=1: delta = 0 + 0.9 x 0.3 - 0.4 = -0.13               A_1 = -0.13 + 0.72 x 0.7 = 0.374
    # t=0: delta = 0.1 + 0.9 x 0.4 - 0.5 = -0.04             A_0 = -0.04 + 0.72 x 0.374 = 0.22928
    # returns = A + V = [0.72928, 0.774, 1.0]
    rewards = torch.tensor([[0.1, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, torch.tensor([[0.22928, 0.374, 0.7]]))
    torch.testing.assert_close(returns, torch.tensor([[0.72928, 0.774, 1.0]]))


def test_gae_ignores_what_the_padding_holds():
    # the second row is the first row's first two tokens, padded with garbage rewards and values
    rewards = torch.tensor([[0.1, 1.0, 0.0], [0.1, 1.0, 50.0]])
    values = torch.tensor([[0.5, 0.4, 0.0], [0.5, 0.4, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    short_adv, short_ret = gae(rewards[:1, :2], values[:1, :2], torch.ones(1, 2), gamma=0.9, lam=0.8)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages[:, :2], short_adv.expand(2, 2))
    torch.testing.assert_close(returns[:, :2], short_ret.expand(2, 2))
    assert advantages[:, 2].tolist() == [0.0, 0.0] and returns[:, 2].tolist() == [0.0, 0.0]
    # t=1: A = 1 - 0.4 = 0.6; t=0: A = 0.1 + 0.9 x 0.4 - 0.5 + 0.72 x 0.6 = 0.392
    torch.testing.assert_close(short_adv, torch.tensor([[0.392, 0.6]]))


def test_with_gamma_and_lambda_one_the_advantage_is_reward_to_go_minus_value():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 5), torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    masked_rewards = rewards * mask
    reward_to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(advantages, (reward_to_go - values) * mask)
    torch.testing.assert_close(returns, reward_to_go * mask)


def test_gae_outputs_carry_no_gradient():
    values = torch.randn(2, 3, requires_grad=True)
    advantages, returns = gae(torch.randn(2, 3), values, torch.ones(2, 3))
    assert not advantages.requires_grad and not returns.requires_grad


# --- policy loss ------------------------------------------------------------------------------------------
def tokens(*ratios):
    """(logps, old_logps) of one sequence whose tokens have these ratios."""
    old = torch.full((1, len(ratios)), -1.0)
    return (old + torch.log(torch.tensor([ratios]))).requires_grad_(), old


def test_inside_the_clip_range_the_loss_is_minus_advantage_times_ratio():
    logps, old = tokens(1.1)
    out = clipped_policy_loss(logps, old, torch.tensor([[2.0]]), torch.ones(1, 1), cliprange=0.2)
    assert out.per_token.item() == pytest.approx(-2.2)
    (grad,) = torch.autograd.grad(out.per_token.sum(), logps)
    assert grad.item() == pytest.approx(-2.2)  # d(-A e^(logps - old)) / d logps = -A rho
    assert out.metrics["clip_frac"] == 0.0


def test_above_the_range_with_positive_advantage_the_token_is_clipped_and_gets_no_gradient():
    logps, old = tokens(1.5)
    out = clipped_policy_loss(logps, old, torch.tensor([[1.0]]), torch.ones(1, 1), cliprange=0.2)
    assert out.per_token.item() == pytest.approx(-1.2)  # max(-1.5, -1.2)
    out.per_token.sum().backward()
    assert logps.grad.item() == 0.0
    assert out.metrics["clip_frac"] == 1.0


def test_below_the_range_with_negative_advantage_the_token_is_clipped_and_gets_no_gradient():
    logps, old = tokens(0.5)
    out = clipped_policy_loss(logps, old, torch.tensor([[-1.0]]), torch.ones(1, 1), cliprange=0.2)
    assert out.per_token.item() == pytest.approx(0.8)  # max(0.5, 0.8)
    out.per_token.sum().backward()
    assert logps.grad.item() == 0.0
    assert out.metrics["clip_frac"] == 1.0


def test_the_clip_only_ever_takes_the_pessimistic_side():
    # ratio 1.5 with A < 0: the unclipped 1.5 is worse than the clipped 1.2, so it stays (and trains)
    logps, old = tokens(1.5)
    out = clipped_policy_loss(logps, old, torch.tensor([[-1.0]]), torch.ones(1, 1), cliprange=0.2)
    assert out.per_token.item() == pytest.approx(1.5) and out.metrics["clip_frac"] == 0.0


def test_clip_fraction_and_kl_metrics_count_real_tokens_only():
    logps, old = tokens(1.5, 1.1, 0.5, 3.0)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the padded ratio-3 token would be clipped too
    out = clipped_policy_loss(logps, old, advantages, mask, cliprange=0.2)
    torch.testing.assert_close(out.per_token, torch.tensor([[-1.2, -1.1, 0.8, 0.0]]))
    assert out.metrics["clip_frac"] == pytest.approx(2 / 3)
    logs = [math.log(1.5), math.log(1.1), math.log(0.5)]
    assert out.metrics["approx_kl"] == pytest.approx(sum(0.5 * d * d for d in logs) / 3, rel=1e-5)
    assert out.metrics["kl_k1"] == pytest.approx(-sum(logs) / 3, rel=1e-5)


def test_per_completion_advantages_broadcast_over_their_tokens():
    logps, old = tokens(1.1, 1.0)
    per_row = clipped_policy_loss(logps, old, torch.tensor([2.0]), torch.ones(1, 2))
    per_token = clipped_policy_loss(logps, old, torch.tensor([[2.0, 2.0]]), torch.ones(1, 2))
    torch.testing.assert_close(per_row.per_token, per_token.per_token)


# --- value loss and explained variance -----------------------------------------------------------------
def test_clipped_value_loss_by_hand():
    # c = 0.2, V_old = 1 for all tokens:
    # V=1.5, R=2: unclipped 0.25, clipped V=1.2 -> 0.64; max 0.64 -> 0.32 (clipped active)
    # V=1.1, R=0: inside the range, both 1.21 -> 0.605
    # V=1.5, R=0: unclipped 2.25, clipped 1.44; max 2.25 -> 1.125 (unclipped active)
    # V=9, R=-9: padding
    values = torch.tensor([[1.5, 1.1, 1.5, 9.0]], requires_grad=True)
    old_values = torch.ones(1, 4)
    returns = torch.tensor([[2.0, 0.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = clipped_value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    torch.testing.assert_close(out.per_token, torch.tensor([[0.32, 0.605, 1.125, 0.0]]))
    assert out.metrics["clip_frac"] == pytest.approx(1 / 3)
    (grad,) = torch.autograd.grad(out.per_token.sum(), values)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.1, 1.5, 0.0]]))  # V - R where unclipped is active


def test_explained_variance_is_one_for_perfect_values_and_zero_for_the_mean():
    returns = torch.tensor([[1.0, 2.0, 6.0], [3.0, 100.0, -100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])  # real returns 1, 2, 6, 3: mean 3
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full((2, 3), 3.0), returns, mask) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(explained_variance(torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3)))  # nothing to explain


# --- KL controllers -----------------------------------------------------------------------------------------
def test_adaptive_kl_controller_by_hand():
    above = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    above.update(current_kl=12.0, n_steps=512)  # e = clip(12 / 6 - 1, -0.2, 0.2) = 0.2
    assert above.value == pytest.approx(0.1 * (1 + 0.2 * 512 / 10000))
    below = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    below.update(current_kl=5.4, n_steps=512)  # e = 5.4 / 6 - 1 = -0.1, inside the clip
    assert below.value == pytest.approx(0.1 * (1 - 0.1 * 512 / 10000))
    far_below = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    far_below.update(current_kl=0.0, n_steps=512)  # e = -1, clipped to -0.2
    assert far_below.value == pytest.approx(0.1 * (1 - 0.2 * 512 / 10000))


def test_adaptive_kl_controller_resumes_bit_exactly():
    controller = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    for kl in (3.0, 7.5, 6.3):
        controller.update(kl, n_steps=64)
    state = controller.state_dict()
    assert all(type(v) is float for v in state.values())
    resumed = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    resumed.load_state_dict(state)
    assert resumed.value == controller.value
    controller.update(9.0, 64)
    resumed.update(9.0, 64)
    assert resumed.value == controller.value


def test_fixed_kl_controller_never_moves():
    controller = FixedKLController(0.05)
    for kl in (0.0, 6.0, 1e6):
        controller.update(kl, n_steps=512)
    assert controller.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(controller.state_dict())
    assert other.value == 0.05


# --- RLOO ---------------------------------------------------------------------------------------------------
def test_rloo_advantages_by_hand():
    # group 1: [1, 2, 6]: 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5
    # group 2: all equal: 0
    rewards = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0])
    torch.testing.assert_close(rloo_advantages(rewards, 3), torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))


def test_rloo_is_the_centred_reward_scaled_by_k_over_k_minus_one():
    torch.manual_seed(0)
    rewards = torch.randn(12)
    for k in (2, 3, 4, 6):
        grouped = rewards.view(-1, k)
        expected = k / (k - 1) * (grouped - grouped.mean(dim=1, keepdim=True))
        torch.testing.assert_close(rloo_advantages(rewards, k), expected.reshape(-1))


def test_rloo_refuses_fewer_than_two_samples_or_partial_groups():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="rewards must be"):
        rloo_advantages(torch.ones(5), 2)


def test_rloo_rewards_subtract_the_sequence_kl():
    logps = torch.tensor([[-1.0, -2.0, -5.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # sum of k1 over real tokens: 0.5 - 1 = -0.5; 1 + 1 + 1 = 3
    out = rloo_rewards(torch.tensor([1.0, 2.0]), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(out, torch.tensor([1.0 + 0.05, 2.0 - 0.3]))
