"""Reference models for preference losses, and reference log-probs precomputed on disk.

Three strategies give the same numbers (tests pin it):
- copy: a frozen deep copy of the policy taken before training;
- adapter: with LoRA, the policy itself with its adapters disabled, so the base
  weights are never held twice;
- precomputed: either of the above scores every example once before training; the
  results are cached on disk under a key of the reference weights and the exact
  token ids, so a later run on the same model and data skips the pass.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch


class FrozenCopyReference:
    """A frozen copy of the policy's initial weights."""

    kind = "copy"

    def __init__(self, policy: torch.nn.Module):
        self.model = copy.deepcopy(policy).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _sequence_logps(self.model, batch)

    def refresh_from(self, policy: torch.nn.Module) -> None:
        """Copy the policy's current weights into the reference (reference refresh)."""
        with torch.no_grad():
            for ref_param, param in zip(self.model.parameters(), policy.parameters()):
                ref_param.copy_(param)


class DisabledAdapterReference:
    """The LoRA policy with its adapters switched off: the base model, no second copy."""

    kind = "adapter"

    def __init__(self, policy: torch.nn.Module):
        if not hasattr(policy, "disable_adapter"):
            raise TypeError("the adapter reference needs a peft model")
        self.policy = policy

    @torch.no_grad()
    def logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        was_training = self.policy.training
        # Dropout off, as for the frozen copy, so the two strategies agree.
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return _sequence_logps(self.policy, batch)
        finally:
            self.policy.train(was_training)


def _sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # Imported here, not at the top: importing soup.tasks loads soup.tasks.preference,
    # which imports this module, so a top-level import fails whenever this module is
    # imported before soup.tasks.
    from soup.tasks.logps import sequence_logps

    return sequence_logps(model, batch)[0]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap key for a model's weights: names, shapes, and a strided sample of values.

    Hashing every byte of a multi-GB model would cost more than the pass it saves;
    a fine-tune changes (nearly) every tensor, so a sample of each tells them apart.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue  # the reference never sees adapter weights
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def examples_fingerprint(examples: list[dict], id_keys: tuple[str, ...]) -> str:
    """A key for exactly these token ids (so template, truncation and tokenizer are all in it)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example[k] for k in id_keys]).encode())
    return digest.hexdigest()


def attach_reference_logps(
    examples: list[dict],
    reference,
    collate: Callable[[list[dict]], dict],
    batch_size: int,
    device: torch.device,
    result_keys: tuple[str, str],
    id_keys: tuple[str, ...],
    cache_dir: Path | None,
    model_key: str,
) -> bool:
    """Store the reference's log-probs in each example under `result_keys` (first half
    of the collated rows, second half). Returns True when they came from the cache."""
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{model_key}|{examples_fingerprint(examples, id_keys)}".encode()).hexdigest()[:32]
        cache_file = Path(cache_dir).expanduser() / f"{key}.pt"
        if cache_file.exists():
            values = torch.load(cache_file, weights_only=True)
            if values.shape == (len(examples), 2):
                _store(examples, values, result_keys)
                return True
    values = torch.empty(len(examples), 2, dtype=torch.float32)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        logps = reference.logps(batch).float().cpu()
        n = len(chunk)
        values[start : start + n, 0], values[start : start + n, 1] = logps[:n], logps[n:]
    _store(examples, values, result_keys)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(values, tmp)
        tmp.replace(cache_file)
    return False


def _store(examples: list[dict], values: torch.Tensor, result_keys: tuple[str, str]) -> None:
    first, second = result_keys
    for example, (a, b) in zip(examples, values.tolist()):
        example[first], example[second] = a, b
