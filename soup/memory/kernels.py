"""Fused kernels and compilation for the model: none | liger | flash_attn | compile | auto.

    none        the model's stock PyTorch modules.
    liger       Liger Kernel's Triton RMSNorm, SwiGLU MLP and RoPE patched into the
                model instance (Hsu et al. 2024, https://arxiv.org/abs/2410.10989).
                Liger's cross-entropy and fused linear cross-entropy are left off:
                the loss side is `kernels.cut_ce` (chunked, our own; or cce), which
                works with any of these options. CUDA + triton + liger-kernel.
    flash_attn  attention through FlashAttention 2 (Dao 2023,
                https://arxiv.org/abs/2307.08691) via transformers'
                attn_implementation="flash_attention_2". CUDA (compute capability
                >= 8.0) + flash-attn; runs in fp16/bf16, so train with bf16/fp16
                precision (transformers casts fp32 q/k/v to the autocast dtype).
    compile     torch.compile of the whole model, in place (nn.Module.compile), so
                state_dict keys, hooks and saving are unchanged.
    auto        time every supported combination of the three, forward-only on the
                real model, and adopt the fastest (rules at `choose_kernels`).

Every candidate's patches are undone after it is timed (`_PatchJournal`), and only
the winner is applied to the model for training.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from soup.distributed import broadcast_from_main
from soup.errors import ConfigError, require

KERNELS = ("none", "liger", "flash_attn", "compile", "auto")
# Within a combination, module patches go first so that compile traces the patched modules.
PARTS = ("liger", "flash_attn", "compile")
# FlashAttention 2 needs Ampere or newer.
FLASH_ATTN_MIN_CAPABILITY = (8, 0)

# auto's benchmark bounds: a truncated copy of the sample batch, a few warmup calls
# (compilation happens there) and the median of a few timed calls.
AUTO_MAX_ROWS = 2
AUTO_MAX_TOKENS = 256
AUTO_WARMUP_CALLS = 2
AUTO_TIMED_CALLS = 5
# A candidate with more parts must beat a simpler one by more than this fraction of
# the best time to be adopted: smaller gaps are timing noise, and the simpler
# configuration is easier to debug.
AUTO_TIE_TOLERANCE = 0.03
# The batch keys the forward takes; labels and side information are the loss's.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def kernels_support(name: str, device: torch.device) -> tuple[bool, str]:
    """Whether kernels=`name` can run on `device`; the reason when not, or a note when it can."""
    device = torch.device(device)
    if name == "none":
        return True, ""
    if name == "auto":
        parts = [p for p in PARTS if kernels_support(p, device)[0]]
        return True, f"candidates on {device.type}: none{''.join(', ' + p for p in parts)} and their combinations"
    if name == "compile":
        if device.type == "cuda" and not _installed("triton"):
            return False, "torch.compile on CUDA generates Triton kernels, and triton is not installed (pip install triton)."
        if device.type == "cpu" and not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
                                         or shutil.which("clang++")):
            return False, "torch.compile on CPU builds C++ kernels, and no C++ compiler was found (install g++ or set CXX)."
        return True, ""
    if name == "liger":
        if device.type != "cuda":
            return False, f"Liger's kernels are Triton GPU kernels: they need a CUDA device, not {device.type}."
        if not _installed("triton"):
            return False, "Liger's kernels need triton, which is not installed (pip install triton)."
        if not _installed("liger_kernel"):
            return False, "needs the liger-kernel package: pip install 'soup-harness[gpu]' (or: pip install liger-kernel)."
        return True, ""
    if name == "flash_attn":
        if device.type != "cuda":
            return False, f"FlashAttention 2 runs on CUDA GPUs only, not {device.type}."
        major, minor = _cuda_capability(device)
        if (major, minor) < FLASH_ATTN_MIN_CAPABILITY:
            return False, (f"FlashAttention 2 needs compute capability >= 8.0 (Ampere or newer); "
                           f"{torch.cuda.get_device_name(device)} has {major}.{minor}.")
        if not _installed("flash_attn"):
            return False, ("needs the flash-attn package: pip install flash-attn --no-build-isolation "
                           "(or use kernels=none: SDPA already uses a flash kernel where it can).")
        return True, ""
    return False, f"unknown kernels {name!r}; valid: {', '.join(KERNELS)}."


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _require_support(name: str, device: torch.device) -> None:
    ok, reason = kernels_support(name, device)
    if not ok:
        raise ConfigError(f"kernels={name}: {reason}")


def _apply_liger(model: nn.Module, device: torch.device) -> str:
    _require_support("liger", device)
    monkey_patch = require("liger_kernel.transformers.monkey_patch", package="liger-kernel", extra="gpu",
                           wanted_by="kernels=liger")
    target = _unwrapped(model)
    model_type = getattr(getattr(target, "config", None), "model_type", None)
    # Liger only logs and returns for an architecture it has no patch for: refuse instead.
    if model_type not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError(f"kernels=liger: Liger has no kernels for model_type={model_type!r}.\n"
                          "  fix: use kernels=compile or kernels=none for this model.")
    # Loss kernels off: the model keeps returning hidden states and the loss owns the head.
    monkey_patch._apply_liger_kernel_to_instance(model=target, rope=True, rms_norm=True, swiglu=True,
                                                 cross_entropy=False, fused_linear_cross_entropy=False)
    return f"liger (fused RMSNorm, SwiGLU, RoPE for {model_type})"


def _apply_flash_attn(model: nn.Module, device: torch.device) -> str:
    _require_support("flash_attn", device)
    target = _unwrapped(model)
    if not hasattr(target, "set_attn_implementation"):
        raise ConfigError(f"kernels=flash_attn: {type(target).__name__} is not a transformers model.")
    target.set_attn_implementation("flash_attention_2")
    return "flash_attn (attn_implementation=flash_attention_2)"


def _apply_compile(model: nn.Module, device: torch.device) -> str:
    _require_support("compile", device)
    # In place rather than torch.compile(model): the returned wrapper would prefix every
    # state_dict key with "_orig_mod." and break checkpoints.
    model.compile()
    return "compile (torch.compile, in place)"


# Looked up at call time, so tests can swap a part for one that fails.
_APPLY = {"liger": _apply_liger, "flash_attn": _apply_flash_attn, "compile": _apply_compile}


def _apply_parts(model: nn.Module, parts: tuple[str, ...], device: torch.device) -> list[str]:
    return [_APPLY[part](model, device) for part in sorted(parts, key=PARTS.index)]


def apply_kernels(model: nn.Module, name: str, device: torch.device, sample_batch: dict | None = None,
                  autocast_dtype: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """Apply kernels=`name` to `model`; return the model to train and a log line.

    The model is changed in place (and returned for uniformity). sample_batch (auto
    only): a training micro-batch with input_ids [rows, seq] and optionally
    attention_mask / position_ids; None times a synthetic one. autocast_dtype (auto
    only): the training loop's autocast dtype, so candidates are timed as they will run.
    """
    device = torch.device(device)
    if name not in KERNELS:
        raise ConfigError(f"kernels={name!r}; valid: {', '.join(KERNELS)}.")
    if name == "none":
        return model, "kernels: none (stock modules)"
    if name != "auto":
        return model, "kernels: " + "; ".join(_apply_parts(model, (name,), device))
    # Every rank times the candidates (as busy as in training), and all take rank 0's pick:
    # ranks that compiled differently would run different programs on one model.
    choice = broadcast_from_main(choose_kernels(model, device, sample_batch, autocast_dtype=autocast_dtype))
    applied = _apply_parts(model, choice.parts, device)
    picked = "; ".join(applied) if applied else "none (stock modules)"
    return model, f"kernels: auto picked {picked}; {choice.describe()}"


def auto_candidates(device: torch.device) -> list[tuple[str, ...]]:
    """Every combination of the parts supported on `device`, simplest first (none first).

    CPU: none, compile. CUDA with everything installed: none, liger, flash_attn,
    compile, liger+flash_attn, liger+compile, flash_attn+compile, all three.
    """
    parts = [p for p in PARTS if kernels_support(p, device)[0]]
    return [combo for size in range(len(parts) + 1) for combo in itertools.combinations(parts, size)]


def candidate_name(parts: tuple[str, ...]) -> str:
    return "+".join(parts) if parts else "none"


@dataclass
class AutoChoice:
    """What kernels=auto measured and picked."""

    parts: tuple[str, ...]
    # candidate name -> median forward ms, or why it was skipped; simplest first.
    results: dict[str, float | str]
    rows: int
    tokens: int

    def describe(self) -> str:
        listed = ", ".join(f"{n}={r:.2f}" if isinstance(r, float) else f"{n}={r}" for n, r in self.results.items())
        return f"forward ms (median of {AUTO_TIMED_CALLS}, {self.rows}x{self.tokens} tokens, no grad): {listed}"


def choose_kernels(model: nn.Module, device: torch.device, sample_batch: dict | None = None,
                   candidates: list[tuple[str, ...]] | None = None,
                   autocast_dtype: torch.dtype | None = None) -> AutoChoice:
    """Time each candidate's forward on `model`, undo it, and pick the fastest.

    Rules: forward only, under torch.no_grad and eval mode (no .grad is created or
    changed; each module's training flag is restored afterwards); a candidate that
    raises, returns non-finite hidden states or gets a non-finite time is skipped,
    with the reason kept; among finite times, the simplest candidate within
    AUTO_TIE_TOLERANCE of the best wins (so on CPU the baseline stays unless compile
    is clearly faster). Raises RuntimeError if no candidate, baseline included, has
    a finite time: then the model cannot run the sample batch at all.
    The model is left as it was: apply the returned parts to train with them.
    """
    device = torch.device(device)
    if candidates is None:
        candidates = auto_candidates(device)
        mask = (sample_batch or {}).get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            # A 4-D mask (packing's cross-document mask, the shared-prompt preference layout)
            # is one flash attention cannot take: it would attend across what the mask separates.
            candidates = [parts for parts in candidates if "flash_attn" not in parts]
    batch = _benchmark_batch(model, sample_batch, device)
    results: dict = {}
    with _benchmark_mode(model, device, autocast_dtype):
        for parts in candidates:
            name = candidate_name(parts)
            journal = _PatchJournal(model)
            try:
                _apply_parts(model, parts, device)
                ms = float(_forward_ms(model, batch, device))
                results[name] = ms if math.isfinite(ms) and ms >= 0 else f"skipped (time {ms})"
            # A candidate that cannot run here is the question auto answers, not a bug:
            # keep its error for the log line and time the others.
            except Exception as exc:  # noqa: BLE001
                first_line = (str(exc).splitlines() or [""])[0][:120]
                results[name] = f"failed ({type(exc).__name__}: {first_line})"
            finally:
                journal.restore()
    chosen_name = pick_fastest(results, [candidate_name(p) for p in candidates])
    chosen = next(p for p in candidates if candidate_name(p) == chosen_name)
    rows, tokens = batch["input_ids"].shape[:2]
    return AutoChoice(chosen, results, rows, tokens)


def pick_fastest(results: dict, simplest_first: list[str]) -> str:
    """The simplest candidate whose time is within AUTO_TIE_TOLERANCE of the best finite time.

    results: name -> ms (float) or a reason string; anything not a finite,
    non-negative float is never picked.
    """
    finite = {n: t for n, t in results.items()
              if isinstance(t, float) and math.isfinite(t) and t >= 0 and n in simplest_first}
    if not finite:
        raise RuntimeError("kernels=auto: no candidate ran the sample batch with a finite time, not even the "
                           f"unchanged model: {results}")
    best = min(finite.values())
    return next(n for n in simplest_first if n in finite and finite[n] <= best * (1 + AUTO_TIE_TOLERANCE))


def _benchmark_batch(model: nn.Module, sample_batch: dict | None, device: torch.device) -> dict:
    """At most AUTO_MAX_ROWS x AUTO_MAX_TOKENS of the sample batch's model inputs, on `device`."""
    if sample_batch is None:
        config = getattr(model, "config", None)
        vocab = getattr(config, "vocab_size", None)
        if vocab is None:
            raise ConfigError("kernels=auto needs a sample batch for a model without config.vocab_size.")
        tokens = min(AUTO_MAX_TOKENS, getattr(config, "max_position_embeddings", AUTO_MAX_TOKENS))
        # Own generator: timing must not shift the random stream the run sees.
        ids = torch.randint(vocab, (AUTO_MAX_ROWS, tokens), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if "input_ids" not in sample_batch:
        raise ConfigError("kernels=auto: the sample batch has no input_ids.")
    rows, seq = sample_batch["input_ids"].shape[:2]
    keep_rows, keep_tokens = min(rows, AUTO_MAX_ROWS), min(seq, AUTO_MAX_TOKENS)
    batch = {}
    for key in MODEL_INPUT_KEYS:
        value = sample_batch.get(key)
        if not isinstance(value, torch.Tensor):
            continue
        # Rows along dim 0; every later dim of sequence length (a 4-D block mask has two) is cut.
        index = (slice(keep_rows),) + tuple(slice(keep_tokens) if size == seq else slice(None)
                                            for size in value.shape[1:])
        batch[key] = value[index].to(device)
    return batch


@contextmanager
def _benchmark_mode(model: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None):
    """Eval mode and no grad for the benchmark; every module's training flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        for module, training in modes:
            module.training = training


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_ms(model: nn.Module, batch: dict, device: torch.device) -> float:
    """Median wall time of one forward in ms, after warmup; raises if the output is not finite."""
    def forward():
        # The training forward's shape: final hidden states, the head on one position only.
        return model(**batch, use_cache=False, output_hidden_states=True, logits_to_keep=1)

    for _ in range(AUTO_WARMUP_CALLS):
        out = forward()
    hidden = out.hidden_states[-1]
    if not torch.isfinite(hidden).all():
        raise FloatingPointError("non-finite hidden states")
    times_ms = []
    for _ in range(AUTO_TIMED_CALLS):
        _sync(device)
        start = time.perf_counter()
        forward()
        _sync(device)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_ms)


_MISSING = object()


class _PatchJournal:
    """What a kernel candidate may change on a model, recorded so it can be undone.

    Liger binds new `forward`s (and attributes) into module instances and swaps
    functions and classes in the model's modeling module (e.g.
    modeling_llama.apply_rotary_pos_emb); flash_attn rewrites the configs'
    `_attn_implementation_internal`; Module.compile() sets `_compiled_call_impl`.
    Restoring each module's and config's instance dict and child registry, and the
    changed globals of the modules that define the model's classes, undoes all
    three. Parameters and buffers are not touched by any candidate and not recorded.
    """

    def __init__(self, model: nn.Module):
        self.objects: list[tuple[object, dict, dict | None]] = []
        seen: set[int] = set()
        for module in model.modules():
            for obj in (module, getattr(module, "config", None)):
                if obj is None or id(obj) in seen or not hasattr(obj, "__dict__"):
                    continue
                seen.add(id(obj))
                children = dict(obj._modules) if isinstance(obj, nn.Module) else None
                self.objects.append((obj, dict(obj.__dict__), children))
        names = {type(m).__module__ for m in model.modules()}
        self.namespaces = {name: dict(vars(sys.modules[name])) for name in names if name in sys.modules}

    def restore(self) -> None:
        for obj, saved, children in self.objects:
            current = obj.__dict__
            for key in [k for k in current if k not in saved]:
                del current[key]
            for key, value in saved.items():
                if current.get(key, _MISSING) is not value:
                    current[key] = value
            if children is not None:
                obj._modules.clear()
                obj._modules.update(children)
        # Module globals: put back what changed, leave names added meanwhile (lazy imports).
        for name, saved in self.namespaces.items():
            namespace = vars(sys.modules[name])
            for key, value in saved.items():
                if namespace.get(key, _MISSING) is not value:
                    namespace[key] = value
