"""Sample packing: concatenate examples into rows of at most max_length tokens.

Padding a batch of uneven examples to its longest wastes the pad cells; packing puts
several examples (documents) end to end in one row instead. Two things must then
hold for a packed row to train like its documents run one by one:

- Positions restart at 0 at every document (rotary embeddings see each document
  where it would stand alone).
- No target crosses a boundary. Labels are unshifted (position t-1 predicts
  labels[t]), so the first token of a document, which would be predicted from the
  previous document's last token, gets IGNORE_INDEX. We do it for every document
  of a row, the first included (whose first label is never a target anyway), so
  rows can also be flattened end to end, as the flash-attention path does.

Attention is the third: with `cross_doc_mask=False` a token attends to the earlier
documents of its row (standard packing: cheap, slightly leaky); with
`cross_doc_mask=True` attention stays inside each document, and a packed row gives
the same logits as its documents run alone (pinned in tests/unit/data/test_packing.py).

The custom mask formats transformers 5.23 accepts (masking_utils returns any 4D
tensor as-is, then hands it to the attention function):
- sdpa: a bool [batch, 1, seq, seq] mask, True = may attend (a float additive mask
  works too; bool is 4x smaller and independent of the compute dtype).
- eager: only a float additive mask, 0 = attend, finfo.min = blocked. Eager ADDS
  the mask to the scores, so a bool mask is silently wrong there (adds 0/1).
- flash_attention_*: no mask; the varlen kwargs cu_seq_lens_q/k (int32 [docs + 1],
  cumulative lengths over the flattened tokens) and max_length_q/k (ints or 0-dim tensors),
  read by transformers.modeling_flash_attention_utils._flash_attention_forward.
Relying instead on transformers' own detection of packed position_ids is fragile:
it is skipped whenever a 2D mask or a KV cache is present (use_cache=True builds one).
"""

from __future__ import annotations

from typing import Sequence

import torch

from soup.data.tokenize import IGNORE_INDEX

# A [batch, 1, seq, seq] mask beyond this many cells (2 GiB as bool, 8 GiB as fp32) is
# almost certainly a configuration mistake; flash attention needs no mask at all.
MAX_MASK_CELLS = 2**31
MASK_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin packing: each item, longest first, goes into the first bin with room.

    sizes: item sizes, each in [1, capacity]. Returns bins as lists of item indices,
    in the order the bins were opened; ties in size keep the order of `sizes`.
    Uses at most 11/9 OPT + 6/9 bins (Dosa 2007). O(n log n): a segment tree over
    the bins' free space finds the first bin with room without scanning them all.
    """
    n = len(sizes)
    order = sorted(range(n), key=lambda i: -sizes[i])
    leaves = 1
    while leaves < max(n, 1):
        leaves *= 2
    # free[leaves + b] is bin b's free space (unopened bins are empty: full capacity);
    # free[node] is the max over the node's subtree.
    free = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    for item in order:
        size = sizes[item]
        node = 1
        while node < leaves:
            node = 2 * node if free[2 * node] >= size else 2 * node + 1
        b = node - leaves
        if b == len(bins):
            bins.append([])
        bins[b].append(item)
        free[node] -= size
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_examples(examples: list[dict], max_length: int, seed: int | None = None) -> list[dict]:
    """Pack examples into rows of at most max_length tokens with First-Fit-Decreasing.

    FFD rather than greedy-in-order: on SFT-like lengths it fills rows to ~99%
    where in-order concatenation leaves a partial row at every boundary. The cost
    is that a row's documents are grouped by length (a long one plus short fillers);
    the training sampler shuffles the rows.

    examples: dicts with input_ids and labels (lists of ints, unshifted, equal
    length, 1..max_length tokens; truncate longer ones first). No example is dropped.
    seed: None keeps a deterministic order (ties in length by example index, rows in
    the order FFD opened them); an int shuffles first (random tie-breaking) and
    returns the rows in a seeded random order.
    Returns rows with input_ids, labels (IGNORE_INDEX at each document's first
    token), position_ids (restarting at 0 per document), doc_lengths and
    example_indices (which examples, in row order).
    """
    if max_length < 1:
        raise ValueError(f"pack_examples: max_length must be >= 1, got {max_length}")
    for i, example in enumerate(examples):
        n = len(example["input_ids"])
        if len(example["labels"]) != n:
            raise ValueError(f"example {i}: {n} input_ids but {len(example['labels'])} labels")
        if n == 0:
            raise ValueError(f"example {i} is empty: packing needs at least one token per example")
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length={max_length}: truncate it first "
                             "(data.overlong=truncate) or raise data.max_length")
    order = list(range(len(examples)))
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(examples), generator=generator).tolist()
    bins = first_fit_decreasing([len(examples[i]["input_ids"]) for i in order], max_length)
    rows = [_concatenate([order[j] for j in b], examples) for b in bins]
    if generator is not None:
        rows = [rows[k] for k in torch.randperm(len(rows), generator=generator).tolist()]
    return rows


def _concatenate(indices: list[int], examples: list[dict]) -> dict:
    input_ids, labels, position_ids, doc_lengths = [], [], [], []
    for i in indices:
        ids = list(examples[i]["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(examples[i]["labels"][1:])
        position_ids += range(len(ids))
        doc_lengths.append(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "doc_lengths": doc_lengths, "example_indices": indices}


def packing_efficiency(rows: Sequence[dict], max_length: int) -> float:
    """Real tokens / (rows x max_length): the fraction of row cells holding a token."""
    if not rows:
        return 0.0
    return sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_length)


def collate_packed(rows: Sequence[dict], pad_token_id: int, cross_doc_mask: bool,
                   attn_implementation: str) -> dict[str, torch.Tensor]:
    """Batch packed rows for the model.

    rows: outputs of pack_examples. Returns input_ids [batch, seq], labels
    [batch, seq] (IGNORE_INDEX on pads) and position_ids [batch, seq] (pads count
    0, 1, ... as a document of their own), right-padded to the longest row, plus:
    - cross_doc_mask=False: attention_mask [batch, seq] long, 1 = real token;
      documents of a row attend to the earlier ones.
    - cross_doc_mask=True, sdpa: attention_mask [batch, 1, seq, seq] bool, True
      where query and key are in the same document and key <= query.
    - cross_doc_mask=True, eager: the same as float32 additive (0 / finfo.min).
      Pad queries attend to themselves only, so no softmax row is fully masked.
    - cross_doc_mask=True, flash_attention_*: padding-free; the rows are
      flattened into ONE row of all real tokens, input_ids/labels/position_ids
      [1, tokens], plus cu_seq_lens_q/k int32 [documents + 1] and max_length_q/k
      (0-dim int32 tensors: the loop moves every batch value with .to(device)).
    """
    if not rows:
        raise ValueError("collate_packed got an empty batch")
    if cross_doc_mask and attn_implementation.startswith("flash_attention"):
        return _collate_flattened(rows)
    if cross_doc_mask and attn_implementation not in MASK_ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"data.packing_cross_doc_attn_mask=true needs model.attn_implementation in "
            f"{MASK_ATTN_IMPLEMENTATIONS + ('flash_attention_2',)}, got {attn_implementation!r}\n"
            "  fix: pick one of those, or set data.packing_cross_doc_attn_mask=false."
        )
    batch, seq = len(rows), max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.arange(seq).repeat(batch, 1)
    # Document id of every cell; -1 on pads.
    doc_ids = torch.full((batch, seq), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(row["labels"], dtype=torch.long)
        position_ids[b, :n] = torch.tensor(row["position_ids"], dtype=torch.long)
        position_ids[b, n:] = torch.arange(seq - n)
        doc_ids[b, :n] = torch.repeat_interleave(torch.arange(len(row["doc_lengths"])),
                                                 torch.tensor(row["doc_lengths"]))
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not cross_doc_mask:
        out["attention_mask"] = (doc_ids >= 0).long()
        return out
    if batch * seq * seq > MAX_MASK_CELLS:
        raise ValueError(
            f"the cross-document mask of this batch would hold {batch} x {seq}^2 = {batch * seq * seq:,} cells "
            f"(limit {MAX_MASK_CELLS:,})\n  fix: use model.attn_implementation=flash_attention_2 (no mask), "
            "or lower train.micro_batch_size or data.max_length."
        )
    allowed = block_causal_mask(doc_ids)
    if attn_implementation == "eager":
        additive = torch.zeros(allowed.shape, dtype=torch.float32)
        out["attention_mask"] = additive.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    else:
        out["attention_mask"] = allowed
    return out


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids [batch, seq] (document of each token, -1 on pads) -> bool [batch, 1, seq, seq].

    True where the key is in the query's document and not after it; a pad attends
    to itself only (a fully masked softmax row would give NaN under sdpa).
    """
    seq = doc_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    same_doc = (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, :, None] >= 0)
    allowed = (same_doc & causal) | torch.eye(seq, dtype=torch.bool)
    return allowed[:, None]


def _collate_flattened(rows: Sequence[dict]) -> dict:
    lengths = [n for row in rows for n in row["doc_lengths"]]
    input_ids = torch.tensor([t for row in rows for t in row["input_ids"]], dtype=torch.long)[None]
    labels = torch.tensor([t for row in rows for t in row["labels"]], dtype=torch.long)[None]
    position_ids = torch.tensor([p for row in rows for p in row["position_ids"]], dtype=torch.long)[None]
    cu_seq_lens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seq_lens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    # A 0-dim tensor rather than an int so the batch moves with {k: v.to(device)};
    # transformers passes max lengths as tensors itself when it derives them from position_ids.
    max_length = torch.tensor(max(lengths), dtype=torch.int32)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length, "max_length_k": max_length}
