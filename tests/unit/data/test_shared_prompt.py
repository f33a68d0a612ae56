"""The shared-prompt preference layout (soup/data/shared_prompt.py): each prompt forwarded
once, completions masked from each other, units packed into rows. It must give the same
log-probs, losses and gradients as the stacked layout, on fewer token positions."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import ModelConfig, PreferenceTaskConfig
from soup.data.collate import collate_pairs, collate_unpaired
from soup.data.shared_prompt import collate_shared_prompt, shared_prompt_mask, units_in
from soup.models.load import build_model
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks.logps import sequence_logps
from soup.tasks.preference import PreferenceTask, preference_collate, resolve_sequence_layout

PAIR_KEYS = ("chosen_ids", "rejected_ids")
# Uneven prompts and completions; the first two units are short enough to share a row.
PAIRS = [
    {"prompt_ids": [1, 50, 51], "chosen_ids": [60, 61, 2], "rejected_ids": [90, 2]},
    {"prompt_ids": [1, 52], "chosen_ids": [63, 2], "rejected_ids": [91, 92, 2]},
    {"prompt_ids": [1, 53, 54, 55, 56, 57, 58, 59], "chosen_ids": [64, 65, 66, 67, 2],
     "rejected_ids": [95, 96, 97, 2]},
]


def tiny_model(attn_implementation: str = "sdpa", seed: int = 0):
    cfg = OmegaConf.structured(ModelConfig(name="tiny", attn_implementation=attn_implementation))
    cfg.tiny.merge_with({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1})
    return build_model(cfg, build_byte_tokenizer(), seed)


def test_a_unit_is_prompt_then_both_completions_with_positions_restarting_after_the_prompt():
    batch = collate_shared_prompt(PAIRS[:1], 0, PAIR_KEYS, "sdpa")
    assert batch["input_ids"].tolist() == [[1, 50, 51, 60, 61, 2, 90, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]
    # Chosen tokens are predicted from positions 2, 3, 4; the first rejected token from
    # the last prompt token (2), the second from the first rejected token (6).
    assert batch["target_positions"].tolist() == [2, 3, 4, 2, 6]
    assert batch["target_ids"].tolist() == [60, 61, 2, 90, 2]
    assert batch["target_sequences"].tolist() == [0, 0, 0, 1, 1]
    assert int(batch["n_sequences"]) == 2 and units_in(batch) == 1


def test_a_completion_sees_the_prompt_and_itself_but_never_the_other_completion():
    mask = collate_shared_prompt(PAIRS[:1], 0, PAIR_KEYS, "sdpa")["attention_mask"][0, 0]
    prompt, chosen, rejected = [0, 1, 2], [3, 4, 5], [6, 7]
    for q in rejected:
        assert mask[q, prompt].all()
        assert not mask[q, chosen].any()
    for q in chosen:
        assert mask[q, prompt].all()
        assert not mask[q, rejected].any()
    assert not mask.triu(1).any(), "a token attends to a later one"
    assert mask[7, 6] and mask[4, 3]


def test_units_are_packed_into_rows_no_longer_than_the_longest_unit_and_pads_see_only_themselves():
    batch = collate_shared_prompt(PAIRS, 0, PAIR_KEYS, "sdpa")
    lengths = [sum(len(p[k]) for k in ("prompt_ids", *PAIR_KEYS)) for p in PAIRS]  # 8, 7, 17
    assert batch["input_ids"].shape == (2, 17)  # units 0 and 1 share the second row
    mask = batch["attention_mask"]
    # Row 0 holds unit 2; row 1 units 0 and 1 (15 tokens) and 2 pads: no cross-unit attention.
    assert not mask[1, 0, lengths[0]:lengths[0] + lengths[1], :lengths[0]].any()
    assert mask[1, 0, lengths[0]:lengths[0] + lengths[1], lengths[0]].all()  # the second unit's BOS
    for pad in (15, 16):
        assert mask[1, 0, pad].tolist() == [i == pad for i in range(17)]
    assert int(batch["n_sequences"]) == 6


def test_the_mask_blocks_keys_of_another_unit_even_in_the_prompt():
    unit_of = torch.tensor([[0, 0, 0, 1, 1, 1]])
    branch = torch.tensor([[0, 1, 2, 0, 1, 2]])
    allowed = shared_prompt_mask(unit_of, branch)[0, 0]
    assert allowed[5].tolist() == [False, False, False, True, False, True]
    assert allowed[2].tolist() == [True, False, True, False, False, False]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logps_and_gradients_equal_the_stacked_layout(attn):
    model = tiny_model(attn)
    weights = torch.tensor([0.3, -1.0, 0.7, 1.1, -0.4, 0.9])
    results = []
    for batch in (collate_pairs(PAIRS, 0), collate_shared_prompt(PAIRS, 0, PAIR_KEYS, attn)):
        model.zero_grad()
        logps, tokens = sequence_logps(model, batch)
        (logps * weights).sum().backward()
        results.append((logps.detach(), tokens, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (stacked, stacked_tokens, stacked_grads), (shared, shared_tokens, shared_grads) = results
    torch.testing.assert_close(shared, stacked, atol=1e-5, rtol=0)
    assert shared_tokens.tolist() == stacked_tokens.tolist() == [3, 2, 5, 2, 3, 4]
    for name, grad in stacked_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_unpaired_rows_share_the_prompt_between_matched_and_kl_completions():
    model = tiny_model()
    rows = [{"prompt_ids": p["prompt_ids"], "completion_ids": p["chosen_ids"],
             "kl_completion_ids": PAIRS[(i + 1) % 3]["rejected_ids"], "desirable": i != 1}
            for i, p in enumerate(PAIRS)]
    stacked = sequence_logps(model, collate_unpaired(rows, 0))[0]
    batch = preference_collate(True, "shared_prompt", "sdpa")(rows, 0)
    torch.testing.assert_close(sequence_logps(model, batch)[0], stacked, atol=1e-5, rtol=0)
    assert batch["desirable"].tolist() == [True, False, True]


def test_the_dpo_loss_and_reference_logps_are_the_same_in_both_layouts():
    model = tiny_model()
    pairs = [dict(p, ref_chosen=-20.0 - i, ref_rejected=-15.0 + i) for i, p in enumerate(PAIRS)]
    cfg = OmegaConf.structured(PreferenceTaskConfig(name="dpo", beta=0.5))
    losses = []
    for layout in ("stacked", "shared_prompt"):
        task = PreferenceTask(cfg)
        batch = preference_collate(False, layout, "sdpa")(pairs, 0)
        assert task.units(batch) == 3
        assert batch["ref_logps"].tolist() == [-20.0, -21.0, -22.0, -15.0, -14.0, -13.0]
        out = task.forward(model, batch)
        losses.append((float(out.loss_sum.detach()), out.metric_sums))
    assert losses[1][0] == pytest.approx(losses[0][0], abs=1e-5)
    for name, value in losses[0][1].items():
        assert losses[1][1][name] == pytest.approx(value, abs=1e-4), name


def test_the_shared_layout_forwards_fewer_positions_on_long_prompts():
    pairs = [{"prompt_ids": [1] + list(range(10, 60)), "chosen_ids": [70 + i, 2], "rejected_ids": [80, 81 + i, 2]}
             for i in range(4)]
    stacked = collate_pairs(pairs, 0)["input_ids"].numel()
    shared = collate_shared_prompt(pairs, 0, PAIR_KEYS, "sdpa")["input_ids"].numel()
    assert stacked == 8 * 54 and shared == 4 * 56


@pytest.mark.parametrize("attn, kernels, expected", [
    ("sdpa", "none", "shared_prompt"), ("eager", "auto", "shared_prompt"),
    ("flash_attention_2", "none", "stacked"), ("sdpa", "flash_attn", "stacked"),
])
def test_auto_layout_is_shared_prompt_wherever_the_attention_takes_a_4d_mask(attn, kernels, expected):
    cfg = OmegaConf.structured(PreferenceTaskConfig(name="dpo"))
    assert resolve_sequence_layout(cfg, attn, kernels) == expected
    cfg.sequence_layout = "stacked"
    assert resolve_sequence_layout(cfg, attn, kernels) == "stacked"


def test_flash_attention_is_refused_by_the_collate_with_the_fix():
    with pytest.raises(ValueError, match="task.sequence_layout=stacked"):
        collate_shared_prompt(PAIRS, 0, PAIR_KEYS, "flash_attention_2")
