import json

import pytest

from soup.data.templates import CHATML, LLAMA3
from soup.data.tokenize import IGNORE_INDEX, tokenize_chat, tokenize_prompt_completion, tokenize_text
from soup.errors import ConfigError
from tests.conftest import require_shared

MULTI_TURN = [
    {"role": "system", "content": "You count."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "2 + 3 = 5"},
    {"role": "user", "content": "Now add 4."},
    {"role": "assistant", "content": "5 + 4 = 9"},
]


def labelled_runs(tokenizer, input_ids, labels):
    """Decode each maximal run of labelled positions separately."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_multi_turn_chatml_labels_exactly_each_assistant_reply_and_its_end_of_turn(byte_tokenizer):
    input_ids, labels = tokenize_chat(MULTI_TURN, byte_tokenizer, CHATML, train_on_responses_only=True)
    assert len(input_ids) == len(labels)
    assert byte_tokenizer.decode(input_ids) == (
        "<|im_start|>system\nYou count.<|im_end|>\n<|im_start|>user\nAdd 2 and 3.<|im_end|>\n"
        "<|im_start|>assistant\n2 + 3 = 5<|im_end|>\n<|im_start|>user\nNow add 4.<|im_end|>\n"
        "<|im_start|>assistant\n5 + 4 = 9<|im_end|>\n"
    )
    assert labelled_runs(byte_tokenizer, input_ids, labels) == ["2 + 3 = 5<|im_end|>\n", "5 + 4 = 9<|im_end|>\n"]


def test_train_on_responses_only_false_labels_every_token(byte_tokenizer):
    input_ids, labels = tokenize_chat(MULTI_TURN, byte_tokenizer, CHATML, train_on_responses_only=False)
    assert labels == input_ids


def test_llama3_template_writes_its_bos_once_and_labels_reply_plus_eot(byte_tokenizer):
    messages = MULTI_TURN[1:3]
    input_ids, labels = tokenize_chat(messages, byte_tokenizer, LLAMA3, train_on_responses_only=True)
    assert input_ids.count(byte_tokenizer.bos_token_id) == 1 and input_ids[0] == byte_tokenizer.bos_token_id
    # The byte tokenizer spells <|eot_id|> as bytes; masking works on characters anyway.
    assert labelled_runs(byte_tokenizer, input_ids, labels) == ["2 + 3 = 5<|eot_id|>"]


def test_tool_call_json_is_labelled_and_tool_results_are_masked(byte_tokenizer):
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "RESULT -3 C"},
        {"role": "assistant", "content": "Cold: -3 C."},
    ]
    input_ids, labels = tokenize_chat(messages, byte_tokenizer, CHATML, train_on_responses_only=True)
    call = json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})
    runs = labelled_runs(byte_tokenizer, input_ids, labels)
    assert runs == [f"\n<tool_call>\n{call}\n</tool_call><|im_end|>\n", "Cold: -3 C.<|im_end|>\n"]
    assert not any("RESULT" in run or "Oslo?" in run for run in runs)


def test_a_template_that_is_not_prefix_stable_is_a_config_error(byte_tokenizer):
    # Marks the last message, so earlier renders differ from the start of the full one.
    unstable = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ConfigError, match="not prefix-stable"):
        tokenize_chat(MULTI_TURN, byte_tokenizer, unstable, train_on_responses_only=True)


def test_tokenize_text_wraps_the_document_in_bos_and_eos(byte_tokenizer):
    input_ids, labels = tokenize_text("Hi.", byte_tokenizer)
    assert input_ids[0] == byte_tokenizer.bos_token_id and input_ids[-1] == byte_tokenizer.eos_token_id
    assert byte_tokenizer.decode(input_ids[1:-1]) == "Hi."
    assert len(input_ids) == 5 and labels == input_ids


def test_real_sentencepiece_tokenizer_masks_exactly_with_the_chatml_preset():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(require_shared("models/stories260k")))
    assert tokenizer.chat_template is None  # so the preset is what renders
    messages = [
        {"role": "user", "content": "Tell me about the cat."},
        {"role": "assistant", "content": "The cat sat on the mat."},
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Once upon a time it slept."},
    ]
    input_ids, labels = tokenize_chat(messages, tokenizer, CHATML, train_on_responses_only=True)
    # The tokenizer adds its own BOS (the preset writes none), and only one.
    assert input_ids[0] == tokenizer.bos_token_id and input_ids.count(tokenizer.bos_token_id) == 1
    # Read the labelled characters back through the offsets: exactly the replies + end-of-turn.
    text = tokenizer.apply_chat_template(messages, chat_template=CHATML, tokenize=False)
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    runs, current = [], ""
    for (start, end), label in zip(offsets, labels):
        if label != IGNORE_INDEX:
            current += text[start:end]
        elif current:
            runs.append(current)
            current = ""
    runs.append(current)
    assert runs == ["The cat sat on the mat.<|im_end|>\n", "Once upon a time it slept.<|im_end|>\n"]
    trained = tokenizer.decode([t for t, l in zip(input_ids, labels) if l != IGNORE_INDEX])
    assert "cat sat" in trained and "Tell me" not in trained and "And then" not in trained


def test_prompt_completion_is_bos_prompt_then_reply_eos_with_labels_on_the_reply(byte_tokenizer):
    tok = byte_tokenizer
    ids, labels = tokenize_prompt_completion("Q:", " A", tok, train_on_responses_only=True)
    prompt = [tok.bos_token_id, *tok("Q:", add_special_tokens=False)["input_ids"]]
    reply = [*tok(" A", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert ids == prompt + reply
    assert labels == [IGNORE_INDEX] * len(prompt) + reply
    assert tokenize_prompt_completion("Q:", " A", tok, train_on_responses_only=False)[1] == ids
