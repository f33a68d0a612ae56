"""Turn a conversation or a document into input_ids and labels.

Chat masking works on characters, then maps to tokens, so it is exact for any
template and any tokenizer with offset mappings:

    full   = render(messages)
    start  = len(render(messages[:i], add_generation_prompt=True))   # before assistant turn i
    end    = len(render(messages[:i + 1]))                           # after it, end-of-turn included
    label a token  <=>  its first character lies in some [start, end)

The span holds the reply and the template's end-of-turn text (`<|im_end|>\\n` for
ChatML, `<|eot_id|>` for Llama 3), so the model learns to stop. This needs every
partial render to be a prefix of the full one; a template that rewrites earlier
turns (e.g. one that drops past reasoning) is rejected with a ConfigError.
"""

from __future__ import annotations

from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from soup.data.templates import bounded_render
from soup.errors import ConfigError

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def render_chat(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    add_generation_prompt: bool = False,
    tools: Optional[list[dict[str, Any]]] = None,
) -> str:
    """The conversation as text, through the Jinja `template` (time- and size-bounded)."""
    return bounded_render(lambda: tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    ), template)


def assistant_spans(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    tools: Optional[list[dict[str, Any]]] = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The full render and the [start, end) character span of each assistant turn."""
    full = render_chat(messages, tokenizer, template, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:i], tokenizer, template, add_generation_prompt=True, tools=tools)
        through = render_chat(messages[: i + 1], tokenizer, template, tools=tools)
        for partial in (before, through):
            if not full.startswith(partial):
                raise ConfigError(
                    "data.chat_template is not prefix-stable: rendering the first turns of a conversation "
                    "gives text that the full conversation does not start with, so assistant turns cannot "
                    f"be located for loss masking.\n  partial render ends with: {partial[-80:]!r}\n"
                    "  fix: use a preset (data.chat_template=chatml or llama3) or a template that renders "
                    "each turn independently; or set data.train_on_responses_only=false."
                )
        spans.append((len(before), len(through)))
    return full, spans


def tokenize_chat(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    train_on_responses_only: bool,
    tools: Optional[list[dict[str, Any]]] = None,
) -> tuple[list[int], list[int]]:
    """Tokenize one conversation; labels are IGNORE_INDEX outside assistant turns.

    Returns (input_ids [seq], labels [seq]), unshifted: labels[t] is the target for
    position t itself, and the model or task shifts. With train_on_responses_only=False
    labels == input_ids.
    """
    if train_on_responses_only:
        full, spans = assistant_spans(messages, tokenizer, template, tools)
    else:
        full, spans = render_chat(messages, tokenizer, template, tools=tools), []
    encoding = _encode(full, tokenizer, with_offsets=train_on_responses_only)
    input_ids = list(encoding["input_ids"])
    if not train_on_responses_only:
        return input_ids, list(input_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for position, (start, end) in enumerate(encoding["offset_mapping"]):
        # end > start skips zero-width tokens the tokenizer added itself (its BOS).
        if end > start and any(lo <= start < hi for lo, hi in spans):
            labels[position] = input_ids[position]
    return input_ids, labels


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Pretraining document: BOS (if the tokenizer has one) + text + EOS; labels == input_ids.

    The EOS marks where a document ends, so the model learns document boundaries.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids, list(ids)


def tokenize_prompt_completion(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase,
                               train_on_responses_only: bool) -> tuple[list[int], list[int]]:
    """BOS + prompt, then completion + EOS, tokenized apart (as the preference tasks and the
    online tasks' sampler see them: the completion's ids follow the prompt's); labels on the
    completion only, or on everything but the BOS with train_on_responses_only=false."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    ids = prompt_ids + completion_ids
    if train_on_responses_only:
        return ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return ids, list(ids)


def _encode(text: str, tokenizer: PreTrainedTokenizerBase, with_offsets: bool) -> dict[str, Any]:
    # A template that writes the BOS itself (Llama 3's does) must not get a second
    # one from the tokenizer; otherwise let the tokenizer add its own (Llama 2 style).
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    if with_offsets and not tokenizer.is_fast:
        raise ConfigError(
            "data.train_on_responses_only=true needs character offsets, which this (slow, Python) "
            "tokenizer cannot give.\n  fix: use a fast tokenizer (a tokenizer.json in the model directory) "
            "or set data.train_on_responses_only=false."
        )
    return tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=with_offsets)
