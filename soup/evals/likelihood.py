"""Log-likelihood of continuations: multiple choice and a judge's rating both read it.

    scores = continuation_logprobs(model, tokenizer, [("2 + 2 =", " 4"), ("2 + 2 =", " 5")], batch_size=8)
    scores[0].logprob > scores[1].logprob   # the model prefers " 4"

The context is encoded as the tokenizer encodes a text (its BOS too, where it adds one: the
way the model met text in training), and the continuation's tokens are those the whole
text adds after the context's: encode(context + continuation)[len(encode(context)):].
Whitespace at the context's end moves to the continuation first, so "Answer: " + "4"
and "Answer:" + " 4" are the same question (SentencePiece and BPE both attach a space to
the word after it). lm-evaluation-harness (0.4.13) splits and encodes the same way, BOS
included, so a multiple-choice task scores the same here and there (a test compares them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ContinuationScore:
    logprob: float  # sum of the continuation tokens' log-probabilities
    tokens: int
    greedy: bool  # every continuation token is the argmax at its position


def split_tokens(tokenizer, context: str, continuation: str,
                 add_special_tokens: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the module docstring says. add_special_tokens=False for a
    context a chat template rendered (it wrote its own BOS). A context that encodes to nothing becomes
    the BOS (else EOS) token, so the continuation's first token is scored too (lm-evaluation-harness
    does the same with its end-of-text token)."""
    trailing = len(context) - len(context.rstrip())
    if trailing:
        context, continuation = context[:-trailing], context[-trailing:] + continuation
    specials = {"add_special_tokens": add_special_tokens}
    context_ids = tokenizer(context, **specials)["input_ids"] if context else []
    whole = tokenizer(context + continuation, **specials)["input_ids"]
    if not context_ids or whole[:len(context_ids)] != context_ids:
        # No context, or the continuation merged into its last token: encode the continuation alone.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return (context_ids or [start]), continuation_ids
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int,
                          max_length: int | None = None, add_special_tokens: bool = True) -> list[ContinuationScore]:
    """The score of each (context, continuation) pair, in order. A sequence longer than
    max_length (default: the model's positions) loses tokens from the context's start."""
    limit = max_length or getattr(getattr(model, "config", None), "max_position_embeddings", None)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for context, continuation in pairs:
        context_ids, continuation_ids = split_tokens(tokenizer, context, continuation, add_special_tokens)
        if not continuation_ids:
            raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
        ids = context_ids + continuation_ids
        if limit and len(ids) > limit:
            ids = ids[len(ids) - limit:]
        encoded.append((ids, min(len(continuation_ids), len(ids) - 1)))
    scores: list[ContinuationScore] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention[row, :len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        logprobs = F.log_softmax(logits, dim=-1)
        for row, (ids, n) in enumerate(chunk):
            # Positions len-1-n .. len-2 predict the continuation's n tokens.
            targets = torch.tensor(ids[len(ids) - n:], device=device)
            predicted = logprobs[row, len(ids) - 1 - n:len(ids) - 1]
            picked = predicted.gather(1, targets.unsqueeze(1)).squeeze(1)
            scores.append(ContinuationScore(float(picked.sum()), n, bool((predicted.argmax(-1) == targets).all())))
    model.train(was_training)
    return scores
