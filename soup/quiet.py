"""Silence the known-harmless messages our dependencies print at import, so a run opens with soup's lines.

Importing transformers' modelling code imports torchao whenever it is installed
(transformers.quantizers registers its torchao quantizer at import), and apply_peft
imports peft, which imports bitsandbytes. soup itself imports torchao only for
quant=fp8 / int8_qat, but those library imports happen in every run. All three
messages below go through `logging` (none through `warnings`), before Hydra or soup
configures any handler, so Python's last-resort handler prints them bare on stderr.
Each is dropped by a filter on the exact logger that emits it, matching the exact
message: the same logger's other messages, and other messages of the same kind,
still print.

`quiet_known_noise()` is called once, from soup/__init__.py, before anything else
imports torch, torchao or bitsandbytes (a logger's filters apply to the records
created on it, so they must be in place before the import that logs).
"""

from __future__ import annotations

import logging
import re

# logger name -> (pattern the message matches, why it is harmless).
KNOWN_NOISE: dict[str, tuple[re.Pattern, str]] = {
    # torchao/__init__.py tries every bundled _C*.so and logs each one this torch build
    # cannot load (here: _C_mxfp8, built for CPython 3.10, and _C_cutlass_90a, which
    # needs Hopper + CUDA). They hold torchao's optional C++/CUDA kernels (MX formats,
    # CUTLASS GEMMs); soup calls none of them: float8 training goes through
    # torch._scaled_mm (or CPU emulation) and QAT, plus its converted int8 weights, is
    # plain PyTorch. TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 would also silence it, but
    # would skip the .so files that do load and warn instead; a filter changes nothing.
    "torchao": (re.compile(r"Failed to load \S*torchao[/\\]_C\w*\.\S*: "),
                "torchao's optional C++/CUDA kernels for this build; soup uses none"),
    # torch >= 2.13 supports Enums natively under torch.compile and warns when a library
    # still registers one as a pytree constant; torchao registers its config enums
    # (KernelPreference, ScaleCalculationMode, ...) at import. A deprecation notice
    # addressed to torchao: the registration still works, nothing behaves differently.
    "torch.utils._pytree": (re.compile(r"is an Enum subclass and is now natively supported by torch\.compile"),
                            "torchao's enum pytree registration, deprecated in torch but still working"),
    # bitsandbytes' CPU backend tries to fetch a faster 4-bit GEMM from the Hugging Face
    # Hub through the optional `kernels` package (only on CPUs with AVX512-BF16) and,
    # without it, falls back to its own CPU implementation. Only quant=4bit on CPU would
    # run that GEMM, and the fallback computes the same result.
    "bitsandbytes.backends.cpu.ops": (re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community"),
                                      "bitsandbytes' optional hub-downloaded CPU 4-bit kernel; it falls back"),
}


class _DropMessage(logging.Filter):
    """Drop the records whose message matches `pattern`; let every other record through."""

    def __init__(self, pattern: re.Pattern, reason: str):
        super().__init__()
        self.pattern = pattern
        self.reason = reason

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    """Install the filters of KNOWN_NOISE (idempotent: each logger gets one filter per pattern)."""
    for logger_name, (pattern, reason) in KNOWN_NOISE.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessage) and f.pattern is pattern for f in logger.filters):
            logger.addFilter(_DropMessage(pattern, reason))
