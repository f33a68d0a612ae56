"""Preference-task rules of soup/config/validate.py, on the real config composed with Hydra."""

import pytest

from soup.config import validate
from soup.config.validate import DPO_LOSS_TYPES
from soup.errors import ConfigError
from soup.losses.registry import LOSSES
from tests.unit.config.test_compose import check, make

PREFERENCE_TASKS = ("dpo", "ipo", "kto", "orpo", "simpo", "cpo", "bco")


def rejected(*overrides) -> str:
    """The ConfigError message validate() raises for the composed overrides."""
    with pytest.raises(ConfigError) as info:
        check(*overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- good configs


@pytest.mark.parametrize("task", PREFERENCE_TASKS)
def test_each_preference_task_yaml_validates_with_its_defaults(task):
    check(f"task={task}")


@pytest.mark.parametrize("overrides", [
    ["task=preference", "task.preference_loss=sigmoid"],
    ["task=preference", "task.preference_loss=dpo"],
    ["task=preference", "task.preference_loss_weights={dpo:0.7,bco:0.3}"],
    ["task=preference", "task.preference_loss_weights={sigmoid:0.5,hinge:0.2,ipo:0.1,robust:0.1,nca_pair:0.1}"],
    ["task=dpo", "task.label_smoothing=0.1", "task.rpo_alpha=1.0"],
    ["task=dpo", "task.beta_schedule=linear", "task.beta_end=0.01"],
    ["task=dpo", "task.ref_refresh_epochs=1"],
    ["task=dpo", "task.reference=precomputed"],
    ["task=dpo", "peft=lora", "task.reference=adapter"],
    ["task=dpo", "peft=lora", "task.reference=precomputed", "task.precompute_with=adapter"],
    ["task=dpo", "data.max_prompt_length=128", "data.max_completion_length=256"],
    ["task=simpo", "task.simpo_gamma=1.0"],
    ["task=kto", "task.desirable_weight=1.33"],
])
def test_sound_preference_configs_validate(overrides):
    check(*overrides)


def test_every_dpo_loss_type_is_a_registered_paired_loss_and_validates():
    cfg = make("task=dpo")  # one compose; task.loss_type is a plain string field
    for loss_type in DPO_LOSS_TYPES:
        assert LOSSES[loss_type].kind == "paired", loss_type
        cfg.task.loss_type = loss_type
        validate(cfg)


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("overrides,flags", [
    # which loss
    (["task=dpo", "task.loss_type=sigmod"], ["task.loss_type='sigmod'", "sigmoid"]),
    (["task=preference"], ["task.preference_loss"]),
    (["task=preference", "task.preference_loss=nope"], ["task.preference_loss", "'nope'"]),
    (["task=preference", "task.preference_loss=kto"], ["task.preference_loss", "'kto'", "not a paired"]),
    (["task=simpo", "task.loss_type=hinge"], ["task.loss_type", "task=dpo"]),
    (["task=dpo", "task.preference_loss=hinge"], ["task.preference_loss", "task=preference"]),
    # weighted mixes
    (["task=preference", "task.preference_loss_weights={dpo:0.7,bco:0.2}"],
     ["task.preference_loss_weights", "sum to 1"]),
    (["task=preference", "task.preference_loss_weights={dpo:1.0}"], ["task.preference_loss_weights", "2 to 5"]),
    (["task=preference",
      "task.preference_loss_weights={sigmoid:0.5,hinge:0.1,ipo:0.1,robust:0.1,nca_pair:0.1,sppo_hard:0.1}"],
     ["task.preference_loss_weights", "2 to 5", "got 6"]),
    (["task=preference", "task.preference_loss=sigmoid", "task.preference_loss_weights={dpo:0.7,bco:0.3}"],
     ["task.preference_loss", "task.preference_loss_weights", "not both"]),
    (["task=preference", "task.preference_loss_weights={dpo:0.7,kto:0.3}"], ["'kto'", "not a paired"]),
    (["task=preference", "task.preference_loss_weights={dpo:1.2,bco:-0.2}"], ["task.preference_loss_weights",
                                                                              "positive"]),
    # loss parameters nobody reads
    (["task=dpo", "task.simpo_gamma=1.0"], ["task.simpo_gamma", "simpo"]),
    (["task=orpo", "task.beta=0.5"], ["task.beta", "orpo"]),
    (["task=ipo", "task.label_smoothing=0.1"], ["task.label_smoothing"]),
    (["task=bco", "task.desirable_weight=2.0"], ["task.desirable_weight", "kto"]),
    (["task=simpo", "task.orpo_lambda=0.5"], ["task.orpo_lambda"]),
    # beta schedule
    (["task=dpo", "task.beta_schedule=linear"], ["task.beta_end"]),
    (["task=dpo", "task.beta_end=0.01"], ["task.beta_end", "constant"]),
    (["task=dpo", "task.beta_schedule=step", "task.beta_end=0.01"], ["task.beta_schedule='step'"]),
    (["task=orpo", "task.beta_schedule=linear", "task.beta_end=0.01"], ["task.beta_schedule", "task=orpo trains orpo", "a loss that takes beta"]),
    (["task=dpo", "task.beta=0"], ["task.beta"]),
    # reference
    (["task=dpo", "task.reference=adapter"], ["task.reference=adapter", "peft=lora"]),
    (["task=dpo", "task.reference=precomputed", "task.precompute_with=adapter"], ["peft=lora"]),
    (["task=dpo", "task.precompute_with=copy"], ["task.precompute_with", "task.reference=precomputed"]),
    (["task=simpo", "task.reference=copy"], ["task.reference=copy", "reference-free"]),
    (["task=dpo", "task.reference=none"], ["task.reference=none"]),
    (["task=dpo", "task.reference=precomputed", "task.ref_refresh_epochs=1"], ["task.ref_refresh_epochs"]),
    (["task=dpo", "peft=lora", "task.ref_refresh_epochs=1"], ["task.ref_refresh_epochs", "task.reference=copy"]),
    (["task=dpo", "task.reference=mirror"], ["task.reference='mirror'"]),
    # rpo, data
    (["task=simpo", "task.rpo_alpha=1.0"], ["task.rpo_alpha"]),
    (["task=dpo", "data.format=alpaca"], ["data.format"]),
    (["task=sft", "data.max_prompt_length=128"], ["data.max_prompt_length", "task=sft"]),
    (["task=pretrain", "data.format=plaintext", "data.max_completion_length=64"], ["data.max_completion_length"]),
])
def test_preference_rule_names_the_flag(overrides, flags):
    message = rejected(*overrides)
    for flag in flags:
        assert flag in message, message


def test_reference_adapter_with_lora_is_accepted_but_without_it_names_both_flags():
    check("task=dpo", "peft=lora", "task.reference=adapter")
    message = rejected("task=dpo", "task.reference=adapter")
    assert "task.reference=adapter" in message and "peft=lora" in message


def test_several_preference_problems_are_reported_together():
    message = rejected("task=dpo", "task.simpo_gamma=1.0", "task.reference=none", "task.beta_schedule=cosine")
    assert all(flag in message for flag in ("task.simpo_gamma", "task.reference=none", "task.beta_end"))


# ----------------------------------------------------------------------------- sequence layout


@pytest.mark.parametrize("layout", ["auto", "shared_prompt", "stacked"])
def test_each_sequence_layout_validates(layout):
    check("task=dpo", f"task.sequence_layout={layout}")


def test_an_unknown_sequence_layout_lists_the_valid_ones():
    assert "valid: auto, shared_prompt, stacked" in rejected("task=dpo", "task.sequence_layout=shared")


def test_shared_prompt_with_flash_attention_is_rejected_with_the_fix():
    message = rejected("task=dpo", "task.sequence_layout=shared_prompt", "model.attn_implementation=eager",
                       "kernels=flash_attn")
    assert "task.sequence_layout=stacked" in message


def test_multipack_layout_needs_multipack_and_a_known_value():
    check("data.multipack=true", "data.multipack_layout=padded")
    assert "data.multipack=true" in rejected("data.multipack_layout=padded")
    assert "valid: packed, padded" in rejected("data.multipack=true", "data.multipack_layout=rows")
