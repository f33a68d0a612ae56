"""The GRPO family (soup/losses/grpo.py) against values computed by hand from each paper's formula."""

import math
import statistics

import pytest
import torch

from soup.losses.grpo import (group_advantages, loss_units, off_policy_mask, policy_loss, reduce_loss, rft_keep,
                              zero_std_groups)

EPS = 1e-4


# --- step 1: advantages ------------------------------------------------------------------------
def test_group_advantages_normalise_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt((4 * 0.5**2) / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / (std + EPS), -0.5 / (std + EPS), -0.5 / (std + EPS), 0.5 / (std + EPS), 0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(expected))


def test_batch_scale_uses_the_group_mean_and_the_batch_std():
    values = [1.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.0, 1.0]
    std = statistics.stdev(values)
    expected = [0.5, -0.5, -0.5, 0.5, 1.0, 0.0, 0.0, -1.0]
    torch.testing.assert_close(group_advantages(torch.tensor(values), 4, "batch"),
                               torch.tensor([e / (std + EPS) for e in expected]))


def test_scale_none_only_centres_the_rewards():
    torch.testing.assert_close(group_advantages(torch.tensor([3.0, 1.0, 5.0, 5.0]), 2, "none"),
                               torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_groups_with_equal_rewards_are_found_and_get_zero_advantage():
    rewards = torch.tensor([1.0, 0.0, 7.0, 7.0])
    assert zero_std_groups(rewards, 2).tolist() == [False, True]
    assert group_advantages(rewards, 2)[2:].tolist() == [0.0, 0.0]


def test_rewards_that_do_not_fill_whole_groups_are_refused():
    with pytest.raises(ValueError, match="rewards must be"):
        group_advantages(torch.ones(5), 2)


# --- step 2: per-token objectives ---------------------------------------------------------------
def tokens(*ratios):
    """(logps, old_logps) of one sequence whose tokens have these ratios."""
    old = torch.full((1, len(ratios)), -1.0)
    return (old + torch.log(torch.tensor([ratios]))).requires_grad_(), old


def test_clip_takes_the_pessimistic_side_of_each_token():
    # ratios 1.5 (A > 0: clipped to 1.2), 0.5 (A < 0: clipped to 0.8), 1.1 (inside the clip range)
    for ratio, advantage, expected in [(1.5, 1.0, -1.2), (0.5, -1.0, 0.8), (1.1, 1.0, -1.1), (1.5, -1.0, 1.5)]:
        logps, old = tokens(ratio)
        out = policy_loss(logps, old, torch.tensor([advantage]), torch.ones(1, 1), epsilon=0.2)
        assert out.per_token.item() == pytest.approx(expected, rel=1e-6), (ratio, advantage)


def test_clip_higher_raises_only_the_upper_bound():
    logps, old = tokens(1.5, 0.5)
    out = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 2), epsilon=0.2, epsilon_high=0.28)
    # token 1: min(1.5, 1.28) = 1.28; token 2: min(0.5, 0.8) = 0.5 (A > 0 keeps the lower ratio)
    torch.testing.assert_close(out.per_token, torch.tensor([[-1.28, -0.5]]))
    assert out.metrics["clip_ratio/high_mean"] == pytest.approx(0.5) and out.metrics["clip_ratio/low_mean"] == 0.0


def test_two_sided_clipping_caps_the_ratio_of_negative_advantages():
    logps, old = tokens(5.0)
    plain = policy_loss(logps, old, torch.tensor([-1.0]), torch.ones(1, 1))
    capped = policy_loss(logps, old, torch.tensor([-1.0]), torch.ones(1, 1), delta=3.0)
    assert plain.per_token.item() == pytest.approx(5.0) and capped.per_token.item() == pytest.approx(3.0)


def test_sequence_level_ratio_is_the_geometric_mean_of_the_token_ratios():
    logps, old = tokens(1.21, 1.0)  # sequence ratio sqrt(1.21 x 1.0) = 1.1, inside the clip range
    out = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 2), importance_sampling_level="sequence")
    torch.testing.assert_close(out.per_token, torch.tensor([[-1.1, -1.1]]))


def test_the_padding_of_a_sequence_does_not_change_its_sequence_ratio():
    logps, old = tokens(1.21, 1.0, 50.0)
    out = policy_loss(logps, old, torch.tensor([1.0]), torch.tensor([[1.0, 1.0, 0.0]]),
                      importance_sampling_level="sequence")
    torch.testing.assert_close(out.per_token, torch.tensor([[-1.1, -1.1, 0.0]]))


def test_cispo_keeps_the_gradient_of_clipped_tokens_with_a_capped_weight():
    logps, old = tokens(1.5)
    clip = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 1))
    (grad_clip,) = torch.autograd.grad(clip.per_token.sum(), logps)
    cispo = policy_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 1), objective="cispo", epsilon_high=0.2)
    (grad_cispo,) = torch.autograd.grad(cispo.per_token.sum(), logps)
    assert grad_clip.item() == 0.0  # PPO-style clipping drops the token
    assert grad_cispo.item() == pytest.approx(-1.2)  # -sg(min(1.5, 1.2)) x A
    assert cispo.per_token.item() == pytest.approx(-1.2 * logps.item())


def test_k3_kl_is_added_with_beta():
    logps = torch.tensor([[-1.0]])
    out = policy_loss(logps, logps.clone(), torch.tensor([0.0]), torch.ones(1, 1), beta=0.1,
                      ref_logps=torch.tensor([[-0.5]]))
    kl = math.exp(0.5) - 0.5 - 1
    assert out.per_token.item() == pytest.approx(0.1 * kl) and out.metrics["kl"] == pytest.approx(kl)


def test_truncated_importance_sampling_caps_the_sampler_correction():
    logps = torch.tensor([[-1.0, -1.0]])
    sampler = torch.tensor([[-1.0 - math.log(3.0), -1.0 - math.log(1.5)]])  # weights 3 (capped at 2) and 1.5
    out = policy_loss(logps, logps.clone(), torch.tensor([1.0]), torch.ones(1, 2), sampler_logps=sampler,
                      tis_threshold=2.0)
    torch.testing.assert_close(out.per_token, torch.tensor([[-2.0, -1.5]]))


def test_off_policy_masking_drops_only_negative_advantages_far_from_the_sampler():
    """DeepSeek-V3.2 eq. 9: keep unless A < 0 and mean_t(sampler - policy) > threshold."""
    logps = torch.full((4, 2), -1.0)
    sampler = torch.tensor([[-0.2, -0.6], [-0.2, -0.6], [-0.9, -1.0], [-1.0, -3.0]])
    # mean KLs: 0.6, 0.6, 0.05, -1.0 (the last: the policy is more confident than the sampler was)
    advantages = torch.tensor([1.0, -1.0, -1.0, -1.0])
    keep = off_policy_mask(advantages, logps, sampler, torch.ones(4, 2), threshold=0.5)
    assert keep.squeeze(-1).tolist() == [1.0, 0.0, 1.0, 1.0]
    out = policy_loss(logps, logps.clone(), advantages, torch.ones(4, 2), sampler_logps=sampler,
                      off_policy_mask_threshold=0.5)
    assert out.per_token[1].tolist() == [0.0, 0.0] and out.per_token[2].tolist() == [1.0, 1.0]
    assert out.metrics["off_policy_masked"] == pytest.approx(0.25)


def test_the_off_policy_kl_is_a_mean_over_the_completion_tokens_only():
    logps = torch.tensor([[-1.0, -1.0, -1.0]])
    sampler = torch.tensor([[-0.4, -0.4, 5.0]])  # the padded third token would push the mean over 0.5
    keep = off_policy_mask(torch.tensor([-1.0]), logps, sampler, torch.tensor([[1, 1, 0]]), threshold=0.5)
    assert keep.item() == 0.0  # mean over the two real tokens: 0.6
    keep = off_policy_mask(torch.tensor([-1.0]), logps, sampler, torch.tensor([[1, 1, 0]]), threshold=0.7)
    assert keep.item() == 1.0


def test_rft_keeps_each_informative_groups_best_completions_and_trains_them_as_sft():
    rewards = torch.tensor([0.0, 1.0, 1.0, 0.5, 2.0, 2.0, 2.0, 2.0, -3.0, -1.0, -2.0, -1.0])
    assert rft_keep(rewards, 4).tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 1]
    logps = torch.tensor([[-0.5, -1.5], [-2.0, -1.0]], requires_grad=True)
    out = policy_loss(logps, logps.detach(), torch.tensor([1.0, 0.0]), torch.ones(2, 2), objective="rft")
    torch.testing.assert_close(out.per_token, torch.tensor([[0.5, 1.5], [0.0, 0.0]]))  # the NLL of the kept row


# --- invariants ---------------------------------------------------------------------------------
def test_on_the_first_pass_the_clipped_loss_is_the_policy_gradient():
    """ratio = 1, so the gradient of each token is -A (REINFORCE with the group baseline)."""
    logps = torch.tensor([[-0.3, -2.0], [-1.0, -0.1]], requires_grad=True)
    advantages = torch.tensor([0.7, -1.3])
    out = policy_loss(logps, logps.detach(), advantages, torch.ones(2, 2), epsilon=0.2, epsilon_high=0.28)
    (grad,) = torch.autograd.grad(out.per_token.sum(), logps)
    torch.testing.assert_close(grad, -advantages.unsqueeze(-1).expand(2, 2))
    assert out.metrics["clip_ratio/region_mean"] == 0.0


def test_equal_rewards_in_a_group_give_zero_gradient():
    logps = torch.randn(4, 3, requires_grad=True)
    advantages = group_advantages(torch.tensor([2.0, 2.0, 2.0, 2.0]), 4)
    out = policy_loss(logps, logps.detach() + 0.1, advantages, torch.ones(4, 3))
    (grad,) = torch.autograd.grad(out.per_token.sum(), logps)
    assert torch.count_nonzero(grad) == 0


def test_beta_zero_needs_no_reference():
    logps = torch.zeros(1, 1)
    assert "kl" not in policy_loss(logps, logps, torch.ones(1), torch.ones(1, 1), beta=0.0).metrics


# --- step 3: reductions ---------------------------------------------------------------------------
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("loss_type, loss_sum, units", [
    ("grpo", 2.0 + 4.0, 2.0),  # sequence means 2 and 4
    ("bnpo", 10.0 / 4, 1.0),  # token mean of the micro-batch
    ("dr_grpo", 10.0 / 5, 2.0),  # token sum / max_completion_length, per sequence
    ("dapo", 10.0, 4.0),  # token sum over the tokens
])
def test_each_loss_type_reduces_as_its_paper_defines(loss_type, loss_sum, units):
    out = reduce_loss(PER_TOKEN, MASK, loss_type, max_completion_length=5)
    assert out.loss_sum.item() == pytest.approx(loss_sum) and out.units == units
    assert loss_units(MASK, loss_type) == units


def test_over_micro_batches_dapo_is_the_token_mean_and_bnpo_the_mean_of_micro_batch_means():
    """The loop sums loss_sum over a step's micro-batches and divides by the step's units."""
    second = (torch.tensor([[6.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    parts = [(PER_TOKEN, MASK), second]

    def step_loss(loss_type):
        outs = [reduce_loss(p, m, loss_type, max_completion_length=5) for p, m in parts]
        return sum(o.loss_sum for o in outs).item() / sum(o.units for o in outs)

    assert step_loss("dapo") == pytest.approx((10.0 + 6.0) / 5)
    assert step_loss("bnpo") == pytest.approx((10.0 / 4 + 6.0) / 2)
    assert step_loss("grpo") == pytest.approx((2.0 + 4.0 + 6.0) / 3)
    assert step_loss("dr_grpo") == pytest.approx((10.0 + 6.0) / (5 * 3))
