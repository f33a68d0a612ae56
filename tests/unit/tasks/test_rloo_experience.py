"""task=rloo's experience (soup/tasks/grpo.py with advantage="rloo"): the leave-one-out
baseline over each prompt's completions, and the KL to the reference in the reward or in the
loss. The formulas themselves are pinned in tests/unit/losses/test_ppo.py."""

import copy

import pytest
import torch

from soup.losses.ppo import rloo_advantages
from tests.unit.tasks.test_grpo_experience import GROUP, make_task, rows_of


def test_rloo_advantages_are_leave_one_out_of_the_scores_minus_beta_times_the_summed_kl(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = make_task(tokenizer, micro_batch_size=4 * GROUP, advantage="rloo", kl_in_reward=True, beta=0.5, loss_type="rloo")
    task.reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # a reference away from the policy, so the KL is not zero
        for p in task.reference.parameters():
            p.add_(0.2 * torch.randn_like(p))
    (batch,) = task.prepare_step([rows_of(tokenizer)], None, model, 0)
    assert "ref_logps" not in batch  # the KL is in the reward, not in the loss
    texts = tokenizer.batch_decode(batch["completion_ids"] * batch["completion_mask"], skip_special_tokens=True)
    scores = torch.tensor([float(len(t)) for t in texts])
    mask = batch["completion_mask"].float()
    kl = ((batch["sampler_logps"] - task.completion_logps(task.reference, batch)) * mask).sum(-1)
    assert kl.abs().sum() > 0
    expected = rloo_advantages(scores - 0.5 * kl, GROUP)
    torch.testing.assert_close(batch["advantages"], expected, rtol=1e-4, atol=1e-4)
    assert task.step_log()["kl"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-5)


def test_with_the_kl_in_the_loss_the_advantages_are_leave_one_out_of_the_scores(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = make_task(tokenizer, micro_batch_size=4 * GROUP, advantage="rloo", kl_in_reward=False, beta=0.5, loss_type="rloo")
    task.reference = copy.deepcopy(model).eval().requires_grad_(False)
    (batch,) = task.prepare_step([rows_of(tokenizer)], None, model, 0)
    assert "ref_logps" in batch
    texts = tokenizer.batch_decode(batch["completion_ids"] * batch["completion_mask"], skip_special_tokens=True)
    scores = torch.tensor([float(len(t)) for t in texts])
    torch.testing.assert_close(batch["advantages"], rloo_advantages(scores, GROUP))


def test_the_rloo_loss_is_reinforce_on_each_completions_summed_log_prob(model_and_tokenizer):
    """loss_type=rloo at ratio 1: the gradient of -A x sum_t log pi(y_t), summed over completions
    (the loop divides by their count: one unit each)."""
    model, tokenizer = model_and_tokenizer
    task = make_task(tokenizer, micro_batch_size=4 * GROUP, advantage="rloo", loss_type="rloo")
    (batch,) = task.prepare_step([rows_of(tokenizer)], None, model, 0)
    assert task.units(batch) == batch["completion_ids"].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(task.forward(model, batch).loss_sum, params)
    mask = batch["completion_mask"].float()
    reinforce = -(batch["advantages"].unsqueeze(-1) * task.completion_logps(model, batch) * mask).sum()
    expected = torch.autograd.grad(reinforce, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
