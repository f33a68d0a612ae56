"""RewardModelTask (soup/tasks/reward_model.py) on a tiny score-head model.

The Bradley-Terry formula is pinned in tests/unit/losses/test_reward_model.py; here: the
score is the head's logit at each sequence's last real token, the task feeds chosen and
rejected scores (and a margin) to the loss, and reports per-pair means.
"""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from soup.config.schema import DataConfig, ModelConfig, RewardModelTaskConfig
from soup.data.preference import build_preference_datasets
from soup.errors import DataError
from soup.losses.reward_model import bradley_terry_loss
from soup.models.load import apply_peft, build_model
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks.reward_model import RewardModelTask

PAIRS = [
    {"prompt_ids": [1, 50, 51], "chosen_ids": [60, 61, 62, 2], "rejected_ids": [90, 2]},
    {"prompt_ids": [1, 52], "chosen_ids": [63, 2], "rejected_ids": [91, 92, 93, 94, 2]},
]


def score_model(seed: int = 0):
    cfg = OmegaConf.structured(ModelConfig(name="tiny"))
    cfg.tiny.merge_with({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 1})
    return build_model(cfg, build_byte_tokenizer(), seed, head="sequence_score")


def make_task(**overrides) -> RewardModelTask:
    return RewardModelTask(OmegaConf.structured(RewardModelTaskConfig(name="reward_model", **overrides)))


def collate(task: RewardModelTask, examples: list[dict]) -> dict:
    from soup.data.collate import collate_pairs

    batch = collate_pairs(examples, build_byte_tokenizer().pad_token_id)
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples])
    return batch


def alone(model, ids: list[int]) -> float:
    """The score of one unpadded sequence: the head's logit at its last token."""
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def test_the_loss_is_bradley_terry_on_each_sequences_last_token_score():
    model, task = score_model(), make_task()
    out = task.forward(model, collate(task, PAIRS))
    chosen = torch.tensor([alone(model, p["prompt_ids"] + p["chosen_ids"]) for p in PAIRS])
    rejected = torch.tensor([alone(model, p["prompt_ids"] + p["rejected_ids"]) for p in PAIRS])
    # Padding does not move a score: each is the logit at its own last real token.
    expected = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(out.loss_sum.detach(), expected.losses.sum(), rtol=1e-5, atol=1e-6)
    assert out.metric_sums["accuracy"] == pytest.approx(float(expected.metrics["accuracy"]) * 2)
    assert out.metric_sums["rewards/chosen"] == pytest.approx(float(chosen.sum()), rel=1e-5)
    assert task.units(collate(task, PAIRS)) == 2


def test_a_margin_and_the_centring_term_change_the_loss_as_their_formulas_say():
    model = score_model()
    plain = make_task().forward(model, collate(make_task(), PAIRS)).loss_sum
    with_margin = [dict(p, margin=m) for p, m in zip(PAIRS, (1.0, 0.5))]
    margined = make_task().forward(model, collate(make_task(), with_margin)).loss_sum
    centred = make_task(center_rewards_coefficient=0.5).forward(model, collate(make_task(), PAIRS)).loss_sum
    chosen = torch.tensor([alone(model, p["prompt_ids"] + p["chosen_ids"]) for p in PAIRS])
    rejected = torch.tensor([alone(model, p["prompt_ids"] + p["rejected_ids"]) for p in PAIRS])
    diff = chosen - rejected
    torch.testing.assert_close(margined.detach(), -torch.nn.functional.logsigmoid(diff - torch.tensor([1.0, 0.5])).sum(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((centred - plain).detach(), 0.5 * ((chosen + rejected) ** 2).sum(), rtol=1e-4, atol=1e-6)


def test_the_score_head_trains_under_lora():
    from soup.config.schema import PeftConfig

    model = apply_peft(score_model(), OmegaConf.structured(PeftConfig(name="lora")), seed=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any(".score." in name and "lora_" not in name for name in trainable), sorted(trainable)[:5]
    assert any("lora_A" in name for name in trainable)


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data_cfg(path: str):
    return OmegaConf.structured(DataConfig(name="file", train_file=path, val_split=0.0))


def test_margins_are_read_from_the_data_and_must_be_on_every_row_or_none(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad", "margin": 2},
            {"prompt": "q", "chosen": "yes", "rejected": "no", "margin": 0.5}]
    splits = build_preference_datasets(data_cfg(write_rows(tmp_path / "m.jsonl", rows)), build_byte_tokenizer(),
                                       "paired", seed=0, margin=True)
    assert [e["margin"] for e in splits.train] == [2.0, 0.5]
    rows[1].pop("margin")
    with pytest.raises(DataError, match=r"m2\.jsonl:2: this row lacks a 'margin'"):
        build_preference_datasets(data_cfg(write_rows(tmp_path / "m2.jsonl", rows)), build_byte_tokenizer(),
                                  "paired", seed=0, margin=True)
    rows[1]["margin"] = "big"
    with pytest.raises(DataError, match=r"m3\.jsonl:2: margin is 'big', not a finite number"):
        build_preference_datasets(data_cfg(write_rows(tmp_path / "m3.jsonl", rows)), build_byte_tokenizer(),
                                  "paired", seed=0, margin=True)
