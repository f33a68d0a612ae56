"""PreferenceTask (soup/tasks/preference.py) and sequence_logps (soup/tasks/logps.py) on a tiny model.

The loss formulas are pinned in tests/unit/losses/; here: which losses a config picks,
what the task feeds them (log-probs, reference, beta, delta), how it reduces and reports.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from soup.config.schema import ModelConfig, PeftConfig, PreferenceTaskConfig
from soup.data.collate import collate_pairs, collate_unpaired
from soup.losses.preference import PairedLogps, dpo_bco_pair, dpo_sigmoid
from soup.losses.sft import IGNORE_INDEX
from soup.models.load import apply_peft, build_model
from soup.models.reference import FrozenCopyReference
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks.logps import sequence_logps
from soup.tasks.preference import PreferenceTask, beta_at, reference_strategy, selected_losses

CPU = torch.device("cpu")
X = IGNORE_INDEX
# Chosen and rejected use different bytes, so their gradients are far from parallel.
PAIRS = [
    {"prompt_ids": [1, 50, 51], "chosen_ids": [60, 61, 62, 2], "rejected_ids": [90, 2]},
    {"prompt_ids": [1, 52], "chosen_ids": [63, 2], "rejected_ids": [91, 92, 93, 94, 2]},
    {"prompt_ids": [1, 53, 54, 55], "chosen_ids": [64, 65, 2], "rejected_ids": [95, 96, 2]},
]
# Reference log-probs far from the policy's, so losses and rewards are not at their
# policy == reference values.
REF_CHOSEN, REF_REJECTED = [-30.0, -12.0, -20.0], [-10.0, -35.0, -14.0]


def tiny_model(seed: int = 0):
    cfg = OmegaConf.structured(ModelConfig(name="tiny"))
    cfg.tiny.merge_with({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1})
    return build_model(cfg, build_byte_tokenizer(), seed)


def task_cfg(name: str = "dpo", **overrides):
    return OmegaConf.structured(PreferenceTaskConfig(name=name, **overrides))


def pairs_with_reference():
    return [dict(p, ref_chosen=c, ref_rejected=r) for p, c, r in zip(PAIRS, REF_CHOSEN, REF_REJECTED)]


def unpaired_rows(with_reference: bool = True):
    rows = [{"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"], "desirable": d}
            for p, d in zip(PAIRS + PAIRS[:1], [True, False, True, False])]
    for i, row in enumerate(rows):
        row["kl_completion_ids"] = rows[(i + 1) % len(rows)]["completion_ids"]
        if with_reference:
            row["ref_logp"], row["ref_kl_logp"] = -20.0 + 3 * i, -100.0
    return rows


def build_reference(task, model, rows, peft_name="none") -> str:
    """Build the task's reference as the run does (no precompute, so no collate needed)."""
    return task.build_reference(model, peft_name, SimpleNamespace(train=rows, val=None), None, 2, CPU, "fp32", contextlib.nullcontext)


def policy_logps(model, batch):
    with torch.no_grad():
        return sequence_logps(model, batch)[0]


# ----------------------------------------------------------------------------- sequence_logps


def test_sequence_logps_equals_a_hand_loop_over_full_logits_on_right_padded_rows():
    model = tiny_model()
    batch = {
        "input_ids": torch.tensor([[1, 50, 60, 61, 62, 2], [1, 52, 63, 0, 0, 0], [1, 90, 91, 92, 0, 0]]),
        "labels": torch.tensor([[X, X, 60, 61, 62, 2], [X, X, 63, X, X, X], [X, 90, 91, 92, X, X]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]),
    }
    with torch.no_grad():
        logps, tokens = sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    expected = []
    for row in range(3):
        total = 0.0
        for t in range(1, 6):  # logits at t - 1 predict the token at t
            target = int(batch["labels"][row, t])
            if target != X:
                total += float(logits[row, t - 1].log_softmax(-1)[target])
        expected.append(total)
    assert tokens.tolist() == [4, 1, 3]
    assert logps.dtype == torch.float32
    assert logps.tolist() == pytest.approx(expected, abs=1e-5)


def test_sequence_logps_is_differentiable_and_zero_for_a_row_without_labels():
    model = tiny_model()
    batch = {"input_ids": torch.tensor([[1, 50, 60], [1, 51, 61]]), "labels": torch.tensor([[X, X, 60], [X, X, X]]),
             "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    logps, tokens = sequence_logps(model, batch)
    assert tokens.tolist() == [1, 0] and float(logps[1].detach()) == 0.0
    logps.sum().backward()
    assert model.get_output_embeddings().weight.grad is not None


# ----------------------------------------------------------------------------- config -> losses


@pytest.mark.parametrize("cfg,expected", [
    (task_cfg("dpo"), [("sigmoid", 1.0)]),
    (task_cfg("dpo", loss_type="hinge"), [("hinge", 1.0)]),
    (task_cfg("ipo"), [("ipo", 1.0)]),
    (task_cfg("simpo"), [("simpo", 1.0)]),
    (task_cfg("orpo"), [("orpo", 1.0)]),
    (task_cfg("kto"), [("kto", 1.0)]),
    (task_cfg("bco"), [("bco", 1.0)]),
    (task_cfg("preference", preference_loss="dpo"), [("sigmoid", 1.0)]),
    (task_cfg("preference", preference_loss="nca_pair"), [("nca_pair", 1.0)]),
    (task_cfg("preference", preference_loss_weights={"dpo": 0.7, "bco": 0.3}), [("sigmoid", 0.7), ("bco_pair", 0.3)]),
])
def test_selected_losses_follow_the_task_and_resolve_aliases(cfg, expected):
    assert [(spec.name, weight) for spec, weight in selected_losses(cfg)] == expected


@pytest.mark.parametrize("reference,peft,needs,expected", [
    ("auto", "none", True, "copy"),
    ("auto", "lora", True, "adapter"),
    ("auto", "lora", False, "none"),
    ("precomputed", "none", True, "precomputed"),
    ("copy", "lora", True, "copy"),
])
def test_reference_strategy_resolves_auto_and_reference_free_losses(reference, peft, needs, expected):
    assert reference_strategy(task_cfg(reference=reference), peft, needs) == expected


def test_reference_free_loss_sets_up_no_reference():
    task = PreferenceTask(task_cfg("simpo", beta=2.0))
    line = build_reference(task, tiny_model(), PAIRS)
    assert (task.strategy, task.reference, task.needs_reference) == ("none", None, False)
    assert "reference-free" in line


# ----------------------------------------------------------------------------- beta schedules


@pytest.mark.parametrize("schedule,expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0]),
    ("linear", [1.0, 0.775, 0.55, 0.1]),
    # end + (start - end)(1 + cos(pi p)) / 2
    ("cosine", [1.0, 0.1 + 0.45 * (1 + math.sqrt(0.5)), 0.55, 0.1]),
    # start (end / start)^p
    ("exponential", [1.0, 0.1 ** 0.25, 0.1 ** 0.5, 0.1]),
])
def test_beta_schedules_move_from_beta_to_beta_end(schedule, expected):
    cfg = task_cfg(beta=1.0, beta_schedule=schedule, beta_end=None if schedule == "constant" else 0.1)
    assert [beta_at(cfg, p) for p in (0.0, 0.25, 0.5, 1.0)] == pytest.approx(expected, abs=1e-12)


def test_begin_step_sets_beta_at_step_over_total_steps_and_the_loss_uses_it():
    task = PreferenceTask(task_cfg(beta=1.0, beta_schedule="linear", beta_end=0.1))
    model = tiny_model()
    task.begin_step(5, 10, 0.0, model)
    assert task.beta == pytest.approx(0.55)
    batch = collate_pairs(pairs_with_reference(), 0)
    out = task.forward(model, batch)
    chosen = policy_logps(model, batch)[:3]
    assert out.metric_sums["rewards/chosen"] == pytest.approx(0.55 * float((chosen - torch.tensor(REF_CHOSEN)).sum()),
                                                              rel=1e-5)


# ----------------------------------------------------------------------------- forward


def test_dpo_with_policy_equal_to_reference_costs_log2_per_pair():
    model = tiny_model()
    task = PreferenceTask(task_cfg("dpo", beta=0.3))
    build_reference(task, model, PAIRS)
    batch = collate_pairs(PAIRS, 0)
    out = task.forward(model, batch)
    assert task.units(batch) == 3
    assert float(out.loss_sum) / task.units(batch) == pytest.approx(math.log(2), abs=1e-6)
    assert out.metric_sums["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_one_sgd_step_on_dpo_raises_chosen_and_lowers_rejected_logps():
    model = tiny_model()
    task = PreferenceTask(task_cfg("dpo", beta=0.5))
    build_reference(task, model, PAIRS)
    batch = collate_pairs(PAIRS, 0)
    before = policy_logps(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    out = task.forward(model, batch)
    (out.loss_sum / task.units(batch)).backward()
    optimizer.step()
    after = policy_logps(model, batch)
    assert (after[:3] > before[:3]).all(), (before, after)  # chosen
    assert (after[3:] < before[3:]).all(), (before, after)  # rejected
    # The reference is a frozen copy: it did not move with the policy.
    torch.testing.assert_close(task.reference.logps(batch), before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("weights", [{"sigmoid": 0.7, "bco_pair": 0.3}, {"dpo": 0.7, "bco": 0.3}])
def test_weighted_mix_equals_the_weighted_sum_of_each_loss(weights):
    model = tiny_model()
    task = PreferenceTask(task_cfg("preference", preference_loss_weights=weights, beta=0.2))
    batch = collate_pairs(pairs_with_reference(), 0)
    model.train()
    out = task.forward(model, batch)

    logps = policy_logps(model, batch)
    ref_chosen, ref_rejected = torch.tensor(REF_CHOSEN), torch.tensor(REF_REJECTED)
    inputs = PairedLogps(chosen=logps[:3], rejected=logps[3:], chosen_tokens=torch.tensor([4.0, 2.0, 3.0]),
                         rejected_tokens=torch.tensor([2.0, 5.0, 3.0]),
                         ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    # BCO's delta: the mean of every reward seen, this batch's included (training mode).
    delta = float((0.2 * torch.cat([logps[:3] - ref_chosen, logps[3:] - ref_rejected])).mean())
    expected = (0.7 * dpo_sigmoid(inputs, beta=0.2).losses + 0.3 * dpo_bco_pair(inputs, beta=0.2, delta=delta).losses)
    assert task.reward_mean.value == pytest.approx(delta, abs=1e-6)
    assert float(out.loss_sum) == pytest.approx(float(expected.sum()), abs=1e-5)


def test_rpo_alpha_adds_alpha_times_the_per_token_chosen_nll():
    model = tiny_model()
    batch = collate_pairs(pairs_with_reference(), 0)
    plain = PreferenceTask(task_cfg("dpo")).forward(model, batch).loss_sum
    with_rpo = PreferenceTask(task_cfg("dpo", rpo_alpha=0.5)).forward(model, batch).loss_sum
    chosen = policy_logps(model, batch)[:3]
    chosen_tokens = torch.tensor([len(p["chosen_ids"]) for p in PAIRS], dtype=torch.float32)  # 4, 2, 3
    nll = (-chosen / chosen_tokens).sum()
    assert float(with_rpo - plain) == pytest.approx(0.5 * float(nll), rel=1e-5)


def test_paired_metrics_are_sums_over_pairs_with_the_usual_names():
    model = tiny_model()
    task = PreferenceTask(task_cfg("dpo", beta=0.1))
    batch = collate_pairs(pairs_with_reference(), 0)
    out = task.forward(model, batch)
    logps = policy_logps(model, batch)
    chosen_r = 0.1 * (logps[:3] - torch.tensor(REF_CHOSEN))
    rejected_r = 0.1 * (logps[3:] - torch.tensor(REF_REJECTED))
    assert set(out.metric_sums) == {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                                    "logps/chosen", "logps/rejected"}
    assert out.metric_counts == {}
    expected = {
        "rewards/chosen": float(chosen_r.sum()), "rewards/rejected": float(rejected_r.sum()),
        "rewards/accuracies": float((chosen_r > rejected_r).sum()),
        "rewards/margins": float((chosen_r - rejected_r).sum()),
        "logps/chosen": float(logps[:3].sum()), "logps/rejected": float(logps[3:].sum()),
    }
    for name, value in expected.items():
        assert out.metric_sums[name] == pytest.approx(value, abs=1e-4), name


def test_kto_metrics_add_kl_and_count_desirable_and_undesirable_rows():
    model = tiny_model()
    rows = unpaired_rows()
    batch = collate_unpaired(rows, 0)
    out = PreferenceTask(task_cfg("kto", beta=0.1)).forward(model, batch)
    logps = policy_logps(model, batch)
    # z0 = max(0, mean(kl_logps - kl_ref_logps)) with kl_ref_logps = -100: positive here.
    z0 = float((logps[4:] + 100.0).mean())
    assert z0 > 0
    assert set(out.metric_sums) == {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl"}
    assert out.metric_counts == {"rewards/chosen": 2.0, "logps/chosen": 2.0, "rewards/rejected": 2.0,
                                 "logps/rejected": 2.0}
    assert out.metric_sums["kl"] == pytest.approx(4 * z0, rel=1e-5)  # the loop divides by 4 rows
    ref = torch.tensor([r["ref_logp"] for r in rows])
    desirable = torch.tensor([True, False, True, False])
    rewards = 0.1 * (logps[:4] - ref)
    assert out.metric_sums["rewards/chosen"] == pytest.approx(float(rewards[desirable].sum()), abs=1e-5)
    assert out.metric_sums["logps/rejected"] == pytest.approx(float(logps[:4][~desirable].sum()), abs=1e-4)


def test_bco_metrics_have_no_kl():
    out = PreferenceTask(task_cfg("bco")).forward(tiny_model(), collate_unpaired(unpaired_rows(), 0))
    assert "kl" not in out.metric_sums and "rewards/chosen" in out.metric_sums


def test_kto_with_a_frozen_copy_reference_costs_half_per_row_at_step_zero():
    # policy == reference: r = 0 and z0 = 0, so every row costs 1 - sigmoid(0) = 1/2.
    model = tiny_model()
    rows = unpaired_rows(with_reference=False)
    task = PreferenceTask(task_cfg("kto"))
    build_reference(task, model, rows)
    batch = collate_unpaired(rows, 0)
    out = task.forward(model, batch)
    assert task.units(batch) == 4
    assert float(out.loss_sum) / 4 == pytest.approx(0.5, abs=1e-6)


# ----------------------------------------------------------------------------- task state


def test_bco_running_mean_is_updated_in_training_only_and_survives_state_dict_exactly():
    model = tiny_model()
    batch = collate_unpaired(unpaired_rows(), 0)
    task = PreferenceTask(task_cfg("bco", beta=0.1))
    model.eval()
    task.forward(model, batch)
    assert task.reward_mean.count == 0  # eval batches do not move delta
    model.train()
    task.forward(model, batch)
    logps = policy_logps(model, batch)
    ref = torch.tensor([r["ref_logp"] for r in unpaired_rows()])
    assert task.reward_mean.count == 4
    assert task.reward_mean.value == pytest.approx(float((0.1 * (logps[:4] - ref)).mean()), abs=1e-6)

    buffer = io.BytesIO()
    torch.save(task.state_dict(), buffer)  # as the checkpoint stores it
    buffer.seek(0)
    restored = PreferenceTask(task_cfg("bco", beta=0.1))
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert (restored.reward_mean.mean, restored.reward_mean.count) == (task.reward_mean.mean, task.reward_mean.count)
    assert torch.equal(restored.forward(model, batch).loss_sum, task.forward(model, batch).loss_sum)
    assert (restored.reward_mean.mean, restored.reward_mean.count) == (task.reward_mean.mean, task.reward_mean.count)


def perturb(model, amount):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_reference_is_refreshed_every_ref_refresh_epochs():
    model = tiny_model()
    task = PreferenceTask(task_cfg("dpo", reference="copy", ref_refresh_epochs=2))
    build_reference(task, model, PAIRS)
    reference = task.reference.model
    perturb(model, 0.01)  # training moved the policy
    for epoch in (0.0, 0.5, 1.0, 1.99):
        task.begin_step(0, 10, epoch, model)
        assert not same_weights(reference, model), epoch
    task.begin_step(3, 10, 2.0, model)
    assert same_weights(reference, model) and task.refreshed_at_epoch == 2
    perturb(model, 0.01)
    for epoch in (2.5, 3.0, 3.99):
        task.begin_step(5, 10, epoch, model)
        assert not same_weights(reference, model), epoch
    task.begin_step(8, 10, 4.0, model)
    assert same_weights(reference, model) and task.refreshed_at_epoch == 4


def test_refreshed_reference_and_its_epoch_are_restored_from_state_dict():
    model = tiny_model()
    task = PreferenceTask(task_cfg("dpo", reference="copy", ref_refresh_epochs=1))
    build_reference(task, model, PAIRS)
    perturb(model, 0.01)
    task.begin_step(4, 10, 1.0, model)
    state = task.state_dict()
    assert state["refreshed_at_epoch"] == 1 and "reference" in state

    fresh_policy = tiny_model()  # a resumed run rebuilds the reference from the initial weights
    restored = PreferenceTask(task_cfg("dpo", reference="copy", ref_refresh_epochs=1))
    build_reference(restored, fresh_policy, PAIRS)
    restored.load_state_dict(copy.deepcopy(state))
    assert restored.refreshed_at_epoch == 1
    assert same_weights(restored.reference.model, model)
    restored.begin_step(5, 10, 1.5, model)  # the same epoch: no second refresh
    assert restored.refreshed_at_epoch == 1


def test_without_ref_refresh_epochs_the_reference_stays_the_initial_model():
    model = tiny_model()
    initial = copy.deepcopy(model)
    task = PreferenceTask(task_cfg("dpo", reference="copy"))
    build_reference(task, model, PAIRS)
    perturb(model, 0.01)
    task.begin_step(9, 10, 5.0, model)
    assert same_weights(task.reference.model, initial) and "reference" not in task.state_dict()


def test_dpo_loss_matches_the_paper_formula_through_the_task():
    # One end-to-end check that the task wires policy and reference into the right slots.
    model = tiny_model()
    batch = collate_pairs(pairs_with_reference(), 0)
    out = PreferenceTask(task_cfg("dpo", beta=0.1)).forward(model, batch)
    logps = policy_logps(model, batch)
    h = (logps[:3] - torch.tensor(REF_CHOSEN)) - (logps[3:] - torch.tensor(REF_REJECTED))
    assert float(out.loss_sum) == pytest.approx(float(-F.logsigmoid(0.1 * h).sum()), abs=1e-5)


def test_adapter_reference_is_not_refreshed():
    policy = apply_peft(tiny_model(), OmegaConf.structured(PeftConfig(name="lora", r=4)), seed=0)
    task = PreferenceTask(task_cfg("dpo", reference="adapter", ref_refresh_epochs=1))
    build_reference(task, policy, PAIRS, "lora")
    task.begin_step(1, 10, 3.0, policy)
    assert task.refreshed_at_epoch == 0 and not isinstance(task.reference, FrozenCopyReference)
