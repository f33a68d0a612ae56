"""task=ppo's experience and training step (soup/tasks/ppo.py): the pieces of soup/losses/ppo.py
(pinned against hand-worked values in tests/unit/losses/test_ppo.py) put together in the order
the paper gives, the value model read per token, and a rollout batch cut into mini-batches."""

import copy

import pytest
import torch
from transformers import LlamaForSequenceClassification

from soup.losses.ppo import (AdaptiveKLController, clipped_policy_loss, clipped_value_loss, gae, masked_whiten,
                             per_token_kl, ppo_rewards)
from soup.rewards.registry import RewardSpec
from soup.rollout.engine import SamplingParams
from soup.tasks.grpo_batches import micro_batches
from soup.tasks.logps import completion_logps
from soup.tasks.ppo import PPOSettings, PPOTask, copy_backbone, token_values, trimmed

PROMPTS = ["Hello there", "Tell me a story", "Why is the sky blue?", "Count: 1 2 3"]


def lengths(completions, **_):
    return [float(len(c)) for c in completions]


def value_model_of(policy):
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    torch.manual_seed(1)
    value = LlamaForSequenceClassification(config)
    copy_backbone(value, policy)
    return value


def make_task(model, tokenizer, **settings):
    options = {"micro_batch_size": 2, **settings}
    sampling = options.pop("sampling", SamplingParams(max_completion_length=8))
    task = PPOTask(PPOSettings(sampling, **options), [(RewardSpec("r", lengths, (), ""), 1.0)], tokenizer,
                   {tokenizer.eos_token_id})
    task.value_model = value_model_of(model)
    if task.settings.needs_reference:
        task.reference = copy.deepcopy(model).eval().requires_grad_(False)
    return task


def rows_of(tokenizer):
    return [{"prompt_ids": tokenizer(p)["input_ids"], "prompt": p} for p in PROMPTS]


def perturbed(model, scale=0.2):
    other = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn_like(p))
    return other


def test_the_value_model_starts_from_the_policys_decoder(model_and_tokenizer):
    model, _ = model_and_tokenizer
    value = value_model_of(model)
    for name, tensor in value.model.state_dict().items():
        torch.testing.assert_close(tensor, model.model.state_dict()[name])


def test_token_values_read_the_score_head_at_the_state_before_each_completion_token(model_and_tokenizer):
    """V(s_t) for completion token t is the head on the hidden state that predicts it; the
    value of the state after the prompt equals the sequence classifier's score of the prompt alone."""
    model, tokenizer = model_and_tokenizer
    value = value_model_of(model).eval()
    prompt, completion = tokenizer("Hello there")["input_ids"], [72, 105, 33, 2]
    batch = micro_batches({"prompt_ids": torch.tensor([prompt]), "prompt_mask": torch.ones(1, len(prompt)).long(),
                           "completion_ids": torch.tensor([completion]), "completion_mask": torch.ones(1, 4).long()}, 1)[0]
    with torch.no_grad():
        values = token_values(value, batch)
        pooled = value(input_ids=torch.tensor([prompt])).logits[0, 0]
        longer = value(input_ids=torch.tensor([prompt + completion[:2]])).logits[0, 0]
    assert values.shape == (1, 4)
    torch.testing.assert_close(values[0, 0], pooled)
    torch.testing.assert_close(values[0, 2], longer)


def test_experience_is_the_papers_pipeline_of_the_pure_functions(model_and_tokenizer):
    """scores (minus the missing-EOS penalty) on the last real token, -kl_coef x KL per token,
    GAE over the value model's estimates, advantages whitened; the adaptive controller moves
    by Ziegler et al.'s rule with the batch's summed KL per completion."""
    model, tokenizer = model_and_tokenizer
    task = make_task(model, tokenizer, kl_coef=0.1, target_kl=0.5, kl_horizon=100.0, missing_eos_penalty=1.0,
                     gamma=0.9, lam=0.8, sampling=SamplingParams(max_completion_length=6))
    torch.manual_seed(3)
    task.reference = perturbed(model)
    experience = task.make_experience(model, rows_of(tokenizer), step=0)
    rows = experience.rows
    mask = rows["completion_mask"].float()
    truncated = torch.tensor([bool(m.all()) and int(c[-1]) != tokenizer.eos_token_id
                              for c, m in zip(rows["completion_ids"], rows["completion_mask"])])
    assert truncated.any()  # the penalty acts
    texts = tokenizer.batch_decode(rows["completion_ids"] * rows["completion_mask"], skip_special_tokens=True)
    scores = torch.tensor(lengths(texts)) - 1.0 * truncated.float()

    with torch.no_grad():
        batch = micro_batches(rows, 4)[0]
        old = completion_logps(model, batch, 1.0)
        ref = completion_logps(task.reference, batch, 1.0)
        values = token_values(task.value_model, batch) * mask
    torch.testing.assert_close(rows["old_logps"], old, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows["old_values"], values, rtol=1e-5, atol=1e-5)
    rewards, non_score = ppo_rewards(scores, old, ref, mask, 0.1, "k1")
    last = mask.sum(-1).long() - 1
    torch.testing.assert_close(rewards[torch.arange(4), last] - non_score[torch.arange(4), last], scores)
    advantages, returns = gae(rewards, values, mask, 0.9, 0.8)
    torch.testing.assert_close(rows["returns"], returns, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rows["advantages"], masked_whiten(advantages, mask), rtol=1e-4, atol=1e-5)

    kl = per_token_kl(old, ref, mask, "k1").sum(-1)
    expected = AdaptiveKLController(0.1, 0.5, 100.0)
    expected.update(float(kl.mean()), 4)
    assert task.kl_controller.value == pytest.approx(expected.value) and expected.value != 0.1
    metrics = experience.metrics
    assert metrics["kl_coef"] == 0.1  # the coefficient these rewards used
    assert metrics["kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert metrics["score"] == pytest.approx(float(torch.tensor(lengths(texts)).mean()))
    assert metrics["completions/eos_fraction"] == pytest.approx(float(1 - truncated.float().mean()))


def test_whiten_rewards_scales_the_token_rewards_before_gae(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain = make_task(model, tokenizer, kl_coef=0.0).make_experience(model, rows_of(tokenizer), step=0).rows
    whitened = make_task(model, tokenizer, kl_coef=0.0, whiten_rewards=True).make_experience(
        model, rows_of(tokenizer), step=0).rows
    mask = plain["completion_mask"].float()
    texts = tokenizer.batch_decode(plain["completion_ids"] * plain["completion_mask"], skip_special_tokens=True)
    rewards, _ = ppo_rewards(torch.tensor(lengths(texts)), plain["old_logps"], plain["old_logps"], mask, 0.0)
    _, returns = gae(masked_whiten(rewards, mask, shift_mean=False), plain["old_values"], mask, 1.0, 0.95)
    torch.testing.assert_close(whitened["returns"], returns, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(whitened["returns"], plain["returns"])


def test_each_pass_trains_every_rollout_once_in_mini_batches(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = make_task(model, tokenizer, ppo_epochs=2, num_mini_batches=2, micro_batch_size=1)
    assert task.steps_per_draw == 4
    assert [task.draws_rows(step) for step in range(6)] == [True, False, False, False, True, False]
    seen = []
    for step in range(4):
        rows = [rows_of(tokenizer)[:2], rows_of(tokenizer)[2:]] if step == 0 else []
        batches = task.prepare_step(rows, None, model, step)
        assert len(batches) == 2 and all(b["input_ids"].shape[0] == 1 for b in batches)  # 2 rows, micro-batches of 1
        seen.append([tuple(b["completion_ids"][0][b["completion_mask"][0].bool()].tolist()) for b in batches])
    every = set(seen[0] + seen[1])
    assert len(every) == 4 and set(seen[2] + seen[3]) == every  # each pass covers the batch once


def test_the_loss_is_the_clipped_policy_loss_plus_vf_coef_times_the_clipped_value_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = make_task(model, tokenizer, vf_coef=0.3, cliprange=0.1, cliprange_value=0.05)
    (batch, *_) = task.prepare_step([rows_of(tokenizer)], None, model, 0)
    with torch.no_grad():  # the models moved since the rollout: both clips can act
        for p in [*model.parameters(), *task.value_model.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    out = task.forward(model, batch)
    with torch.no_grad():
        mask = batch["completion_mask"].float()
        logps = completion_logps(model, batch, 1.0)
        values = token_values(task.value_model, batch)
        policy = clipped_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, 0.1)
        value = clipped_value_loss(values, batch["old_values"], batch["returns"], mask, 0.05)
    torch.testing.assert_close(out.loss_sum.detach(), (policy.per_token + 0.3 * value.per_token).sum(),
                               rtol=1e-5, atol=1e-6)
    out.loss_sum.backward()
    assert task.value_model.score.weight.grad.abs().sum() > 0 and model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert task.units(batch) == int(mask.sum())


def test_trimmed_drops_padding_columns_every_row_shares(model_and_tokenizer):
    rows = {"prompt_ids": torch.tensor([[0, 0, 5, 6], [0, 0, 0, 7]]), "prompt_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]),
            "completion_ids": torch.tensor([[1, 2, 0, 0], [3, 0, 0, 0]]),
            "completion_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]), "old_logps": torch.zeros(2, 4)}
    out = trimmed(rows)
    assert out["prompt_ids"].tolist() == [[5, 6], [0, 7]] and out["completion_ids"].tolist() == [[1, 2], [3, 0]]
    assert out["old_logps"].shape == (2, 2)


def test_one_optimizer_holds_both_models_and_lr_groups_can_tell_them_apart(model_and_tokenizer):
    from soup.optim import parameter_groups

    model, tokenizer = model_and_tokenizer
    task = make_task(model, tokenizer)
    groups = parameter_groups(task.optimized_module(model), 0.0, 1e-3, [{"pattern": r"^value\.", "lr": 1e-5}])
    by_lr = {group["lr"]: {id(p) for p in group["params"]} for group in groups}
    assert by_lr[1e-5] == {id(p) for p in task.value_model.parameters()}
    assert by_lr[1e-3] == {id(p) for p in model.parameters()}
