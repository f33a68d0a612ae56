"""The rollout engine (soup/rollout/engine.py): the cache and the padding are right, the
draws are reproducible, and the logits processors do what their papers say."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from soup.rollout.engine import SamplingParams, left_pad, process_logits, sample

PAD, STOP = 0, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=STOP)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]


def draw(model, prompts, seed=0, **params):
    params = {"max_completion_length": 12, **params}
    generator = torch.Generator().manual_seed(seed)
    return sample(model, prompts, SamplingParams(**params), pad_id=PAD, stop_ids={STOP}, generator=generator)


def test_greedy_decoding_matches_transformers_generate(model):
    for prompt in PROMPTS:
        out = draw(model, [prompt], temperature=0.0)
        ref = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=STOP,
                             pad_token_id=PAD)[0, len(prompt):]
        n = int(out.lengths[0])
        assert out.completion_ids[0, :n].tolist() == ref[:n].tolist()


def test_a_prompts_completion_does_not_depend_on_the_rest_of_the_batch(model):
    alone = [draw(model, [p], temperature=0.0) for p in PROMPTS]
    together = draw(model, PROMPTS, temperature=0.0)
    for row, single in enumerate(alone):
        n = int(single.lengths[0])
        assert int(together.lengths[row]) == n
        assert torch.equal(together.completion_ids[row, :n], single.completion_ids[0, :n]), row


class SaysStopSecond(torch.nn.Module):
    """Says 7, then STOP, whatever the prompt; counts its forwards."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.forwards = 0

    def forward(self, input_ids, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        self.forwards += 1
        previous = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.24 renamed it
        step = 0 if previous is None else previous + 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], 40), -10.0)
        logits[:, -1, STOP if step >= 1 else 7] = 10.0
        return CausalLMOutputWithPast(logits=logits, cache=step)


def test_completions_are_as_wide_as_the_longest():
    """A batch whose completions all stop early trains on no column of padding."""
    model = SaysStopSecond()
    out = draw(model, PROMPTS, temperature=0.0)
    assert out.completion_ids.shape == (3, 2) and out.lengths.tolist() == [2, 2, 2]
    assert not out.truncated.any()
    assert model.forwards == 2  # the prefill and one decoding step: it stops when its rows do


def test_a_rank_whose_rows_ended_decodes_on_until_every_ranks_have():
    """A sharded model's forward is a collective (FSDP2, ZeRO-3 gather weights in it): a rank
    whose rows have all stopped keeps calling the model, on padding, while another rank's rows
    are live, and its completions do not change."""
    model = SaysStopSecond()
    other_rank_live_for = 6  # forwards

    def any_rank_live(live_here: bool) -> bool:
        return live_here or model.forwards < other_rank_live_for

    params = SamplingParams(max_completion_length=12, temperature=0.0)
    out = sample(model, PROMPTS, params, pad_id=PAD, stop_ids={STOP}, any_rank_live=any_rank_live)
    assert model.forwards == other_rank_live_for
    alone = draw(SaysStopSecond(), PROMPTS, temperature=0.0)
    assert torch.equal(out.completion_ids, alone.completion_ids) and torch.equal(out.sampler_logps, alone.sampler_logps)
    assert out.lengths.tolist() == [2, 2, 2] and not out.truncated.any()


def test_sampler_logps_equal_a_full_forward_over_prompt_and_completion(model):
    """Teacher-forced log-probs of the drawn tokens equal what the cached decode reported."""
    out = draw(model, PROMPTS, seed=3, temperature=1.0)
    ids = torch.cat([out.prompt_ids, out.completion_ids], dim=1)
    mask = torch.cat([out.prompt_mask, out.completion_mask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    width = out.prompt_ids.shape[1]
    predicted = logits[:, width - 1:-1].log_softmax(-1).gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.sampler_logps, predicted * out.completion_mask, atol=1e-5, rtol=1e-5)


def test_the_same_seed_draws_the_same_completions(model):
    a, b = draw(model, PROMPTS * 2, seed=7), draw(model, PROMPTS * 2, seed=7)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampler_logps, b.sampler_logps)
    assert not torch.equal(a.completion_ids, draw(model, PROMPTS * 2, seed=8).completion_ids)


def test_completions_end_at_the_stop_token_and_the_rest_is_padding(model):
    out = draw(model, PROMPTS * 8, seed=1, max_completion_length=6)
    for ids, mask, truncated in zip(out.completion_ids, out.completion_mask, out.truncated):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()
        assert (ids[n:] == PAD).all()
        assert bool(truncated) == (STOP not in ids[:n].tolist())
        if not truncated:
            assert ids[n - 1] == STOP and STOP not in ids[: n - 1].tolist()


def test_left_pad():
    ids, mask = left_pad([[1, 2], [3]], PAD, "cpu")
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]


# --- logits processors, by hand ------------------------------------------------------------------
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0]])


def kept(logits):
    return torch.isfinite(logits)[0].tolist()


def test_top_k_keeps_the_k_largest():
    assert kept(process_logits(LOGITS, None, SamplingParams(8, top_k=2))) == [True, True, False, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)[0].tolist()  # ~[0.644, 0.237, 0.087, 0.032]
    assert kept(process_logits(LOGITS, None, SamplingParams(8, top_p=0.5))) == [True, False, False, False]
    assert kept(process_logits(LOGITS, None, SamplingParams(8, top_p=probs[0] + 0.01))) == [True, True, False, False]
    assert kept(process_logits(LOGITS, None, SamplingParams(8, top_p=0.95))) == [True, True, True, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_top_probability():
    # probabilities relative to the top: 1, e^-1 = 0.37, e^-2 = 0.14, e^-3 = 0.05
    assert kept(process_logits(LOGITS, None, SamplingParams(8, min_p=0.1))) == [True, True, True, False]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    seen = torch.tensor([[True, False, False, True]])
    out = process_logits(LOGITS, seen, SamplingParams(8, repetition_penalty=2.0))
    assert out.tolist() == [[1.0, 1.0, 0.0, -2.0]]


def test_temperature_scales_the_logits():
    out = process_logits(LOGITS, None, SamplingParams(8, temperature=0.5))
    assert out.tolist() == [[4.0, 2.0, 0.0, -2.0]]
    assert math.isclose(float(out.log_softmax(-1)[0, 0]), float((LOGITS / 0.5).log_softmax(-1)[0, 0]))


def letters(ids):
    """A decode for the toy vocabulary: token i is the letter i mod 26."""
    return "".join(chr(ord("a") + i % 26) for i in ids)


def test_a_stop_string_ends_the_completion_at_the_token_that_completes_it(model):
    free = draw(model, PROMPTS, temperature=0.0)
    text = letters(free.completion_ids[0, :int(free.lengths[0])].tolist())
    stop = text[4:6]
    end = next(t for t in range(len(text)) if stop in text[:t + 1])  # its first occurrence ends here
    generator = torch.Generator().manual_seed(0)
    stopped = sample(model, PROMPTS, SamplingParams(max_completion_length=12, temperature=0.0, stop=(stop,)),
                     pad_id=PAD, stop_ids={STOP}, generator=generator, decode=letters)
    assert int(stopped.lengths[0]) == end + 1 and not stopped.truncated[0]
    assert letters(stopped.completion_ids[0, :end + 1].tolist()).endswith(stop)
    assert torch.equal(stopped.completion_ids[0, :end + 1], free.completion_ids[0, :end + 1])


def test_stop_strings_need_a_decode():
    with pytest.raises(ValueError, match="decode"):
        sample(torch.nn.Linear(1, 1), [[1]], SamplingParams(max_completion_length=2, stop=("x",)), pad_id=0,
               stop_ids=set())


def test_completion_texts_decode_each_row_to_its_own_length_not_ids_times_mask():
    """Padding after a short completion must not decode as token 0, an ordinary token in many vocabularies."""
    from soup.rollout.engine import Rollout

    class Vocabulary:  # id 0 is "!" (as in GPT-2's), no special tokens
        def batch_decode(self, rows, skip_special_tokens=True):
            return [" ".join({0: "!", 5: "hi", 6: "there"}[i] for i in row) for row in rows]

    rollout = Rollout(prompt_ids=torch.zeros(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1, dtype=torch.long),
                      completion_ids=torch.tensor([[5, 9, 9], [5, 6, 6]]),
                      completion_mask=torch.tensor([[1, 0, 0], [1, 1, 1]]), truncated=torch.tensor([False, True]),
                      sampler_logps=torch.zeros(2, 3))
    assert rollout.completion_texts(Vocabulary()) == ["hi", "hi there there"]
