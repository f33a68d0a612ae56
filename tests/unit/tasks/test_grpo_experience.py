"""The GRPO task's experience phase (soup/tasks/grpo.py): what each setting does to the
batches an optimizer step trains on. A random tiny Llama and the byte tokenizer: the
completions are noise, the bookkeeping is what is checked (model_and_tokenizer: conftest.py)."""

import torch
from transformers import LlamaForCausalLM

from soup.loop import total_optimizer_steps
from soup.rewards.registry import RewardSpec
from soup.rollout.engine import SamplingParams
from soup.tasks.grpo import GRPOSettings, GRPOTask, pull_toward

GROUP = 4
PROMPTS = ["Once upon", "A cat", "The sun was", "Tom"]


def lengths(completions, **_):
    return [float(len(text)) for text in completions]


def make_task(tokenizer, reward=lengths, columns=(), **settings):
    options = {"num_generations": GROUP, "micro_batch_size": 2 * GROUP, **settings}
    sampling = options.pop("sampling", SamplingParams(max_completion_length=8))
    return GRPOTask(GRPOSettings(sampling, **options), [(RewardSpec("r", reward, columns, ""), 1.0)],
                    tokenizer, {tokenizer.eos_token_id})


def rows_of(tokenizer):
    return [{"prompt_ids": tokenizer(p)["input_ids"], "prompt": p} for p in PROMPTS]


def rows_in(batches) -> int:
    return sum(b["completion_ids"].shape[0] for b in batches)


def test_num_iterations_trains_one_generation_batch_for_mu_steps_with_its_old_logps(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = make_task(tokenizer, num_iterations=2)
    assert [task.draws_rows(step) for step in range(4)] == [True, False, True, False]
    first = task.prepare_step([rows_of(tokenizer)], None, model, 0)
    for batch in first:  # old log-probs are the generating policy's: the first pass has ratio 1
        mask = batch["completion_mask"].bool()
        torch.testing.assert_close(task.completion_logps(model, batch)[mask], batch["old_logps"][mask])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    again = task.prepare_step([], None, model, 1)
    assert again is first  # the same experience, not a new draw
    out = task.forward(model, again[0])
    assert out.metric_sums["clip_ratio/region_mean"] > 0  # after an update the ratio left 1 and the clip acts


def test_one_iteration_needs_no_stored_old_logps(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    batches = make_task(tokenizer).prepare_step([rows_of(tokenizer)], None, model, 0)
    assert "old_logps" not in batches[0] and "replayed" not in batches[0]


def test_epoch_mode_counts_num_iterations_steps_per_drawn_batch():
    from omegaconf import OmegaConf

    train = OmegaConf.create({"max_steps": None, "epochs": 1, "grad_accum_steps": 2})
    assert total_optimizer_steps(train, 10) == 5 and total_optimizer_steps(train, 10, steps_per_draw=3) == 15


def test_mask_truncated_completions_leaves_their_tokens_out(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain = make_task(tokenizer).make_experience(model, rows_of(tokenizer), 0)
    masked = make_task(tokenizer, mask_truncated_completions=True).make_experience(model, rows_of(tokenizer), 0)
    truncated = plain.metrics["completions/clipped_ratio"]
    assert 0 < truncated  # a random model rarely says EOS within 8 tokens
    kept = [bool(row.any()) for b in masked.batches for row in b["completion_mask"]]
    assert kept.count(False) == round(truncated * len(PROMPTS) * GROUP)
    assert masked.completions == plain.completions  # same draws; only the mask differs


def test_skip_zero_advantage_drops_groups_whose_rewards_are_all_equal(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer

    def flat_on_tom(completions, prompt):
        return [0.0 if p == "Tom" else float(len(c)) for c, p in zip(completions, prompt)]

    rows = rows_of(tokenizer)
    kept = make_task(tokenizer, reward=flat_on_tom, columns=("prompt",), skip_zero_advantage=True)
    experience = kept.make_experience(model, rows, 0)
    assert experience.metrics["skipped_groups"] == 1.0 and rows_in(experience.batches) == 3 * GROUP
    assert rows_in(make_task(tokenizer, reward=flat_on_tom, columns=("prompt",)).make_experience(
        model, rows, 0).batches) == 4 * GROUP
    constant = make_task(tokenizer, reward=lambda completions, **_: [1.0] * len(completions), skip_zero_advantage=True)
    assert constant.prepare_step([rows], None, model, 0) == []  # the loop then updates nothing


def test_the_replay_buffer_stands_in_for_uniform_groups_with_their_own_old_logps(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    informative = [True]

    def sometimes_flat(completions, **_):
        return [float(len(c)) if informative[0] else 0.0 for c in completions]

    task = make_task(tokenizer, reward=sometimes_flat, replay_buffer_size=3)
    first = task.make_experience(model, rows_of(tokenizer), 0)
    assert len(task.replay) == 3 and first.metrics["replay/groups_replayed"] == 0.0
    stored = list(task.replay.groups)
    informative[0] = False
    second = task.make_experience(model, rows_of(tokenizer), 1)
    assert second.metrics["replay/groups_replayed"] == 4.0
    batch = second.batches[0]
    for row in range(0, batch["completion_ids"].shape[0], GROUP):  # each group is one of the stored ones
        match = [g for g in stored if torch.equal(g["advantages"], batch["advantages"][row:row + GROUP])]
        assert match, "a replayed group's advantages are those it was scored with"
        width = match[0]["old_logps"].shape[1]
        torch.testing.assert_close(batch["old_logps"][row:row + GROUP, :width], match[0]["old_logps"])

    restored = make_task(tokenizer, reward=sometimes_flat, replay_buffer_size=3)
    restored.load_rank_state_dict(task.rank_state_dict())  # each rank's own buffer
    assert [g["priority"] for g in restored.replay.groups] == [g["priority"] for g in task.replay.groups]


def test_the_replay_buffer_keeps_the_most_informative_groups(model_and_tokenizer):
    from soup.tasks.grpo_batches import ReplayBuffer

    buffer = ReplayBuffer(2)
    for priority in (0.5, 2.0, 1.0, 0.1):
        buffer.add({"advantages": torch.zeros(2), "priority": priority})
    assert sorted(g["priority"] for g in buffer.groups) == [1.0, 2.0]
    draws = [buffer.draw(torch.Generator().manual_seed(s), torch.device("cpu"))["priority"] for s in range(300)]
    assert 0.25 < draws.count(1.0) / 300 < 0.42  # drawn in proportion to the std: 1/3


def test_rft_trains_only_each_groups_best_completions(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    experience = make_task(tokenizer, loss_type="rft").make_experience(model, rows_of(tokenizer), 0)
    for batch in experience.batches:
        assert set(batch["advantages"].tolist()) <= {0.0, 1.0}
        trained = batch["completion_mask"].any(-1)
        assert torch.equal(trained, batch["advantages"].bool())
        for start in range(0, len(trained), GROUP):
            assert trained[start:start + GROUP].any() or batch["advantages"][start:start + GROUP].sum() == 0


def test_a_moving_reference_is_pulled_toward_the_policy(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    task = make_task(tokenizer, beta=0.1, ref_sync_steps=2, ref_model_ema_alpha=0.25)
    task.setup(model)
    before = [p.detach().clone() for p in task.reference.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    task.begin_step(1, 10, 0.0, model)  # not a sync step
    assert all(torch.equal(a, b) for a, b in zip(before, task.reference.parameters()))
    task.begin_step(2, 10, 0.0, model)
    for old, ref in zip(before, task.reference.parameters()):
        torch.testing.assert_close(ref, old + 0.25)
    saved = task.state_dict()["reference"]
    assert all(torch.equal(saved[k], v) for k, v in task.reference.state_dict().items())


def test_pull_toward_with_alpha_one_copies_the_policy(model_and_tokenizer):
    model, _ = model_and_tokenizer
    other = LlamaForCausalLM(model.config)
    pull_toward(other, model, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
