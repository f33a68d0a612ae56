"""An offline distillation teacher: its top-k log-probs per trained position, computed once, cached on disk.

task.teacher.top_k=k scores every train (and val) item once before training: the teacher runs on the
item as the batches hold it (a padded example, or a packed row), and at each position that predicts a
trained token keeps log_softmax(logits / T) of its k most likely tokens and their ids (soup/losses/
distill.py's TopKTeacher; the divergence then compares the two models over those k tokens plus one
"rest" bucket). The values are stored in each item, and the batches carry them (teacher_logprobs,
teacher_ids: one row per trained position, in the order labelled_hidden_states selects them).

The cache file is keyed by the teacher's weights (a sampled fingerprint, as the preference reference
cache), k, the temperature and the exact items (token ids, labels, packing), so another model, data,
template, truncation or temperature computes afresh; a later run on the same ones skips the pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

LOGPROBS, IDS = "teacher_logprobs", "teacher_ids"


def items_fingerprint(items: list[dict]) -> str:
    """A key for exactly these items (every field but the cached teacher values)."""
    digest = hashlib.sha256()
    for item in items:
        fields = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in sorted(item.items())
                  if k not in (LOGPROBS, IDS)}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@torch.no_grad()
def score_top_k(teacher: torch.nn.Module, items: list[dict], collate: Callable, k: int, temperature: float,
                batch_size: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(log-probs (n, k) float32, ids (n, k) int64) of each item's n trained positions."""
    from soup.tasks.logps import head_logits, labelled_hidden_states

    per_item = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = {key: value.to(device) for key, value in collate(chunk).items()}
        hidden, _, rows = labelled_hidden_states(teacher, batch)
        logprobs = torch.log_softmax(head_logits(teacher, hidden) / temperature, dim=-1)
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
        counts = torch.bincount(rows, minlength=len(chunk)).tolist()
        per_item += list(zip(values.float().cpu().split(counts), ids.cpu().split(counts)))
    return per_item


def attach_top_k(items: list[dict], collate: Callable, teacher: torch.nn.Module, k: int, temperature: float,
                 batch_size: int, device: torch.device, cache_dir: str, teacher_key: str) -> tuple[Path, bool]:
    """Store each item's top-k teacher values in it (from the cache when present). Returns the cache
    file and whether it was read from the cache."""
    key = hashlib.sha256(f"{teacher_key}|k={k}|T={temperature}|{items_fingerprint(items)}".encode()).hexdigest()[:32]
    path = Path(cache_dir).expanduser() / f"{key}.pt"
    if path.exists():
        saved = torch.load(path, weights_only=True)
        if saved["counts"].shape[0] == len(items):
            counts = saved["counts"].tolist()
            for item, values, ids in zip(items, saved["logprobs"].split(counts), saved["ids"].split(counts)):
                item[LOGPROBS], item[IDS] = values, ids.long()
            return path, True
    scored = score_top_k(teacher, items, collate, k, temperature, batch_size, device)
    for item, (values, ids) in zip(items, scored):
        item[LOGPROBS], item[IDS] = values, ids
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # ranks of one run may write the same file at once
    torch.save({"logprobs": torch.cat([v for v, _ in scored]), "ids": torch.cat([i for _, i in scored]).int(),
                "counts": torch.tensor([v.shape[0] for v, _ in scored])}, tmp)
    tmp.replace(path)
    return path, False


def with_cached_teacher(collate: Callable) -> Callable:
    """`collate`, with the items' cached teacher values concatenated into the batch in row order."""
    def collate_with_teacher(items: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate([{k: v for k, v in item.items() if k not in (LOGPROBS, IDS)} for item in items])
        batch[LOGPROBS] = torch.cat([item[LOGPROBS] for item in items])
        batch[IDS] = torch.cat([item[IDS] for item in items])
        return batch

    return collate_with_teacher
