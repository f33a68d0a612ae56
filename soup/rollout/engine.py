"""Sampling completions from the policy being trained: a batched decode loop with a KV cache.

Prompts of different lengths are left-padded into one batch; each row's position ids
count only its own tokens and the attention mask hides the padding, so a prompt's
completions do not depend on what else is in the batch (a test pins it at temperature 0).
Each step: one forward of the newest token per row over the cache, then the logits
processors in transformers' order (repetition penalty, temperature, top-k, top-p,
min-p), then one draw per row from a torch.Generator the caller seeds, so the same seed
gives the same completions (and a resumed run, seeding by step, the same as an
uninterrupted one).

Why our own loop and not `model.generate`: it returns exactly what RL needs in one pass
(the sampled tokens' log-probs under the distribution actually sampled from, the
completion mask and which completions hit the length cap) without a second forward,
and it runs on any causal LM soup trains (adapters enabled, quantised bases).
scripts/bench/ measures it against `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn. temperature 0 is greedy decoding. top_k 0 and top_p 1.0
    and min_p 0.0 and repetition_penalty 1.0 turn those processors off. `stop`: strings that
    end a completion at the token that completes one (kept in the completion, as the stop
    token is); they need the sampler's `decode`."""

    max_completion_length: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass
class Rollout:
    """B completions of one batch of prompts.

    prompt_ids (B, P) left-padded, prompt_mask (B, P); completion_ids (B, T) right-padded
    with pad_id after the stop token, T the longest completion's length; completion_mask (B, T) 1 up to and including the
    stop token; truncated (B,) True where no stop token came within max_completion_length;
    sampler_logps (B, T) the log-prob of each drawn token under the distribution it was
    drawn from (0 where masked); for greedy decoding, under the unprocessed distribution."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    truncated: torch.Tensor
    sampler_logps: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    def completion_texts(self, tokenizer) -> list[str]:
        """Each completion decoded up to its own length (stop token included, special tokens skipped).
        Not ids * mask: id 0 is an ordinary token in many vocabularies (GPT-2's "!")."""
        rows = self.completion_ids.tolist()
        return tokenizer.batch_decode([ids[:n] for ids, n in zip(rows, self.lengths.tolist())],
                                      skip_special_tokens=True)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
    """(B, V) fp32 logits -> the logits sampled from: repetition penalty (CTRL, arXiv 1909.05858:
    divide positive logits of already-seen tokens by the penalty, multiply negative ones),
    temperature, then top-k, top-p (nucleus: the smallest set whose probability reaches p)
    and min-p (drop tokens below min_p x the top probability), each keeping >= 1 token."""
    if params.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), NEG_INF)
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, NEG_INF)
    return logits


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, *, pad_id: int,
           stop_ids: set[int], generator: torch.Generator | None = None, decode=None,
           any_rank_live=None) -> Rollout:
    """Draw one completion per prompt (repeat a prompt in `prompts` for several).
    decode: token ids -> text, for params.stop. any_rank_live: this rank's "a row is still
    live" -> whether one is on any rank, for a model whose forward is a collective (FSDP2,
    ZeRO-3 gather weights in it): every rank then decodes until the last rank's rows end."""
    if params.stop and decode is None:
        raise ValueError("stop strings need a decode function")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # A compiled model (kernels=compile) would recompile for every new cache length: decode eagerly.
        with torch.compiler.set_stance("force_eager"):
            return _decode(model, prompts, params, pad_id, stop_ids, generator, device, decode,
                           any_rank_live or (lambda live: live))
    finally:
        model.train(was_training)


def ends_in_stop_string(tokens: torch.Tensor, live: torch.Tensor, t: int, stops: tuple[str, ...], decode) -> torch.Tensor:
    """(B,) True where a live row's text now contains a stop string. Only the last few tokens
    are decoded: any earlier occurrence would have stopped the row at an earlier step
    (4 tokens per character covers byte-level tokens of multi-byte characters)."""
    window = 4 * max(len(s) for s in stops) + 4
    hit = torch.zeros_like(live)
    for row in live.nonzero().flatten().tolist():
        text = decode(tokens[row, max(0, t + 1 - window):t + 1].tolist())
        hit[row] = any(s in text for s in stops)
    return hit


def _decode(model, prompts, params, pad_id, stop_ids, generator, device, decode, any_rank_live) -> Rollout:
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    rows, steps = prompt_ids.shape[0], params.max_completion_length
    tokens = torch.full((rows, steps), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((rows, steps), dtype=torch.float32, device=device)
    live = torch.ones(rows, dtype=torch.bool, device=device)
    done_at = torch.full((rows,), steps, dtype=torch.long, device=device)  # index of each row's stop token
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    seen = None
    vocab = None

    attention = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache_key = "cache" if "cache" in out else "past_key_values"  # transformers 5.24 renamed it
    next_position = positions[:, -1:] + 1
    for t in range(steps):
        logits = out.logits[:, -1, :].float()
        if vocab is None:
            vocab = logits.shape[-1]
            if params.repetition_penalty != 1.0:
                seen = torch.zeros((rows, vocab), dtype=torch.bool, device=device)
                seen.scatter_(1, prompt_ids.clamp(max=vocab - 1), prompt_mask.bool())
        processed = process_logits(logits, seen, params)
        if params.temperature > 0:
            log_probs = processed.log_softmax(-1)
            chosen = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(-1)
        else:
            log_probs = logits.log_softmax(-1)
            chosen = processed.argmax(-1)
        chosen = torch.where(live, chosen, torch.full_like(chosen, pad_id))
        tokens[:, t] = chosen
        logps[:, t] = torch.where(live, log_probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1), 0.0)
        if seen is not None:
            seen.scatter_(1, chosen.unsqueeze(-1), live.unsqueeze(-1))
        stopped = live & torch.isin(chosen, stop)
        if params.stop:
            stopped = stopped | ends_in_stop_string(tokens, live, t, params.stop, decode)
        done_at = torch.where(stopped, torch.full_like(done_at, t), done_at)
        live = live & ~stopped
        if t == steps - 1 or not any_rank_live(bool(live.any())):
            break
        attention = torch.cat([attention, torch.ones((rows, 1), dtype=attention.dtype, device=device)], dim=1)
        out = model(input_ids=chosen.unsqueeze(-1), attention_mask=attention, position_ids=next_position,
                    use_cache=True, **{cache_key: out[cache_key]})
        next_position = next_position + 1

    length = (done_at + 1).clamp(max=steps)
    # As wide as the longest completion: training then spends nothing on columns of padding.
    width = int(length.max())
    mask = (torch.arange(width, device=device).unsqueeze(0) < length.unsqueeze(-1)).long()
    tokens = torch.where(mask.bool(), tokens[:, :width], torch.full_like(mask, pad_id))
    return Rollout(prompt_ids, prompt_mask, tokens, mask, done_at >= steps, logps[:, :width] * mask)
