"""A reward model directory as a reward: its score of prompt + completion, checks at bind time, the cache."""

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, ViTConfig

from soup.errors import ConfigError, SoupError
from soup.rewards import RewardError, get_reward, required_columns, score
from soup.rewards import reward_model as reward_model_module
from tests.conftest import require_shared

PROMPTS = ["Once upon a time", "Tom had a red ball. He", "The cat"]
COMPLETIONS = [" there was a dog.", " threw it very far into the big green park", "!"]


def tiny_config(**overrides) -> LlamaConfig:
    settings = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, num_labels=1)
    return LlamaConfig(**{**settings, **overrides})


@pytest.fixture
def tokenizer():
    # stories260k's real tokenizer: it adds BOS itself and has eos but no pad token.
    return AutoTokenizer.from_pretrained(require_shared("models/stories260k"))


@pytest.fixture
def rm(tmp_path, tokenizer):
    """(directory, model): a tiny Llama reward model saved with its tokenizer."""
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(tiny_config()).eval()
    directory = tmp_path / "rm"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model


def direct_score(model, tokenizer, text: str) -> float:
    """One unpadded forward: the score at the last token."""
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()


def test_scores_equal_a_direct_forward_of_prompt_plus_completion(rm, tokenizer):
    directory, model = rm
    reward = get_reward(str(directory))
    assert reward.name == str(directory) and reward.columns == ("prompt",)
    assert required_columns(str(directory)) == ("prompt",)
    values = reward(COMPLETIONS, prompt=PROMPTS, answer=["x"] * 3)
    expected = [direct_score(model, tokenizer, p + c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert values == pytest.approx(expected, abs=1e-5)
    assert len(set(values)) == 3  # a real score per text, not one constant


def test_batch_size_does_not_change_the_scores(rm):
    directory, _ = rm
    # Different lengths, so every batch but batch_size=1 is padded.
    by_size = {size: get_reward(str(directory), batch_size=size)(COMPLETIONS, prompt=PROMPTS) for size in (1, 2, 16)}
    assert by_size[2] == pytest.approx(by_size[1], abs=1e-5) and by_size[16] == pytest.approx(by_size[1], abs=1e-5)


def test_eos_pads_when_the_tokenizer_has_no_pad_token(rm, tokenizer):
    directory, _ = rm
    assert tokenizer.pad_token is None
    loaded = reward_model_module.load_reward_model(directory)
    assert loaded.tokenizer.pad_token_id == tokenizer.eos_token_id == loaded.model.config.pad_token_id


def test_a_literal_bos_in_the_prompt_text_is_not_doubled(rm):
    directory, _ = rm
    reward = get_reward(str(directory))
    assert reward(COMPLETIONS, prompt=["<s>" + p for p in PROMPTS]) == pytest.approx(
        reward(COMPLETIONS, prompt=PROMPTS), abs=1e-6)


def test_a_text_longer_than_the_model_keeps_its_end(rm, tokenizer):
    directory, model = rm
    long_prompt = " ".join(["the little dog ran to the park"] * 20)
    ids = tokenizer(long_prompt + " and back.", add_special_tokens=False)["input_ids"]
    assert len(ids) > 64
    kept = torch.tensor([[tokenizer.bos_token_id, *ids[-63:]]])  # BOS + the last 63 tokens: 64 positions
    with torch.no_grad():
        expected = model(input_ids=kept).logits[0, 0].item()
    assert get_reward(str(directory))([" and back."], prompt=[long_prompt]) == pytest.approx([expected], abs=1e-5)


def test_the_model_loads_once_for_two_rewards(rm, monkeypatch):
    directory, _ = rm
    calls = []
    load = reward_model_module._load
    monkeypatch.setattr(reward_model_module, "_load", lambda *args: calls.append(args) or load(*args))
    first, second = get_reward(str(directory)), get_reward(str(directory) + "/", batch_size=1)
    assert len(calls) == 1
    assert first(COMPLETIONS, prompt=PROMPTS) == pytest.approx(second(COMPLETIONS, prompt=PROMPTS), abs=1e-5)


def test_mixed_with_another_reward_and_weighted(rm, tokenizer):
    directory, model = rm
    rewards = [(get_reward(str(directory)), 0.5), (get_reward("format", pattern=r".*dog.*"), 2.0)]
    scores = score(rewards, COMPLETIONS, {"prompt": PROMPTS, "answer": ["1", "2", "3"]})
    model_scores = [direct_score(model, tokenizer, p + c) for p, c in zip(PROMPTS, COMPLETIONS)]
    # by hand: 0.5 * model score + 2.0 * (completion mentions a dog)
    assert scores.total == pytest.approx([0.5 * model_scores[0] + 2.0, 0.5 * model_scores[1],
                                          0.5 * model_scores[2]], abs=1e-5)
    assert scores.per_reward[str(directory)] == pytest.approx(model_scores, abs=1e-5)
    assert scores.per_reward["format"] == [1.0, 0.0, 0.0]


def test_a_nan_score_ends_the_run_with_a_reward_error(tmp_path, tokenizer):
    model = LlamaForSequenceClassification(tiny_config())
    with torch.no_grad():
        model.score.weight.fill_(math.nan)
    model.save_pretrained(tmp_path / "nan_rm")
    tokenizer.save_pretrained(tmp_path / "nan_rm")
    name = str(tmp_path / "nan_rm")
    reward = get_reward(name)  # binding runs no forward
    with pytest.raises(RewardError, match="(?s)scored completion 0 as nan.*fix: check the model's weights") as err:
        score([(reward, 1.0)], COMPLETIONS, {"prompt": PROMPTS})
    assert err.value.reward == name and err.value.index == 0


def refused(directory) -> str:
    with pytest.raises(ConfigError) as err:
        get_reward(str(directory))
    message = str(err.value)
    assert f"task.reward={directory}: " in message and "\n  fix: " in message
    return message


def test_bad_directories_are_refused_at_bind_time(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    assert "the directory has no config.json" in refused(tmp_path / "empty")

    LlamaForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path / "two")
    tokenizer.save_pretrained(tmp_path / "two")
    assert "a reward model has one output; this one has 2 labels" in refused(tmp_path / "two")

    ViTConfig(num_labels=1).save_pretrained(tmp_path / "vit")
    assert "model type 'vit' cannot be loaded as sequence classification" in refused(tmp_path / "vit")

    # A causal LM's directory would load with a random score head.
    LlamaForCausalLM(tiny_config()).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    assert "no weights for score.weight; they would start random" in refused(tmp_path / "lm")

    LlamaForSequenceClassification(tiny_config()).save_pretrained(tmp_path / "no_tokenizer")
    assert "its tokenizer does not load" in refused(tmp_path / "no_tokenizer")


def test_a_tokenizer_with_neither_pad_nor_eos_is_refused(tmp_path, tokenizer):
    LlamaForSequenceClassification(tiny_config()).save_pretrained(tmp_path / "rm")
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "rm")
    assert "the tokenizer has no pad token and no eos token to pad with" in refused(tmp_path / "rm")


def test_params_and_paths_that_do_not_exist(rm, tmp_path):
    directory, _ = rm
    with pytest.raises(ConfigError, match="does not take parameter\\(s\\) temperature; it accepts: batch_size"):
        get_reward(str(directory), temperature=1.0)
    with pytest.raises(ConfigError, match="batch_size must be a whole number >= 1"):
        get_reward(str(directory), batch_size=0)
    missing = str(tmp_path / "runs" / "rm" / "final")
    with pytest.raises(ConfigError, match=f"(?s)task.reward={missing}: no such directory.*fix: give the directory"):
        get_reward(missing)
    with pytest.raises(ConfigError, match="no such directory"):
        required_columns("runs/no_such_rm")
    with pytest.raises(SoupError, match="needs the column 'prompt'"):
        get_reward(str(directory))(COMPLETIONS, answer=["1", "2", "3"])
