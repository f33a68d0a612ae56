"""Which precision a run trains in: `train.precision=auto`, and bf16 on CPUs that lack it.

A CPU runs torch's bf16 matmuls one of three ways (torch 2.13 with oneDNN, x86). Speeds are
bf16 over fp32 for a 384^3 matmul on one core of an AMD EPYC with avx512_bf16, with oneDNN held
to lower ISAs by ONEDNN_MAX_CPU_ISA for the other rows, and issue 9's AVX2-only CPU:

    native    bf16 instructions (the x86 flags avx512_bf16 or amx_bf16): bf16 beats fp32 (~4x).
    emulated  AVX-512 without them: oneDNN widens bf16 to fp32 in registers, so bf16 runs at
              about fp32 speed and gains nothing (0.8x).
    slow      neither, e.g. an AVX2-only CPU: torch leaves oneDNN for its fallback kernel
              (1/30; issue 9: 0.3 against 27 GFLOP/s, and a multipack SFT step of 33 s
              instead of ~2 s).

Other CPUs (ARM, ...) are "unknown": no measurement stands behind a rule there.

The rules built on it:
- `train.precision=auto` is bf16 on a CUDA GPU with native bf16 (compute capability >= 8)
  and on a CPU with native bf16, and fp32 everywhere else. soup/train.py resolves it once,
  before anything reads the precision, and logs the choice and why.
- `train.precision=bf16` on a "slow" CPU is refused at config load (soup/config/validate.py),
  naming the fix; SOUP_ALLOW_SLOW_BF16=1 runs it anyway, with a warning in the log (to check
  bf16 numerics on such a machine, or for tests that must run bf16 there).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable

import torch

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# oneDNN's avx512_core, the least it needs for its bf16 kernels on a CPU without bf16 instructions.
AVX512_CORE_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq"})
X86_MACHINES = ("x86_64", "amd64", "i386", "i686")
ALLOW_SLOW_BF16_ENV = "SOUP_ALLOW_SLOW_BF16"
SLOWDOWN = "about 100x slower than fp32 per matmul (a run 15-100x slower)"
# The reason `auto` gives for its choice on a CPU, by cpu_bf16_path.
WHY_AUTO = {
    "native": "with native bf16",
    "emulated": "without native bf16: bf16 would be emulated, no faster than fp32",
    "slow": "without a fast bf16 path: bf16 would be about 100x slower",
    "unknown": "not x86: its bf16 speed is not known",
}


def cpu_capability() -> str:
    """The SIMD level torch dispatches its CPU kernels at: DEFAULT, AVX2, AVX512, ... (not bf16 support)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags from /proc/cpuinfo (Linux on x86), or None where it has no flags line."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_bf16_path(flags: Iterable[str] | None = None) -> str:
    """How this CPU runs a bf16 matmul: "native", "emulated", "slow" or "unknown" (module docstring).

    `flags`: x86 feature flags as /proc/cpuinfo names them (avx512_bf16, avx512f, ...), to ask about
    another CPU; None asks about this one.
    """
    if flags is None:
        if platform.machine().lower() not in X86_MACHINES:
            return "unknown"
        # torch's own test of whether its bf16 matmul goes to oneDNN (false on AVX2, or with
        # ONEDNN_MAX_CPU_ISA=AVX2): then the fallback kernel runs, whatever the flags say.
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return "slow"
        flags = cpu_flags()
        if flags is None:  # macOS, Windows: torch reads the same bits with cpuinfo
            if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
                return "native"
            return "emulated" if torch.cpu._is_avx512_supported() else "slow"
    flags = frozenset(flags)
    if flags & NATIVE_BF16_FLAGS:
        return "native"
    return "emulated" if AVX512_CORE_FLAGS <= flags else "slow"


def cpu_has_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether the CPU has bf16 instructions (avx512_bf16 or AMX), so bf16 beats fp32 on it."""
    return cpu_bf16_path(flags) == "native"


def cpu_record() -> dict:
    """What run.json and the benchmarks record about this CPU's precision support."""
    path = cpu_bf16_path()
    return {"cpu_capability": cpu_capability(), "cpu_native_bf16": path == "native", "cpu_bf16": path}


def resolve_precision(requested: str, device: torch.device, flags: Iterable[str] | None = None) -> str:
    """`requested` (fp32 | bf16 | fp16 | auto) with auto replaced by what `device` runs fastest.

    auto: bf16 on CUDA with native bf16 (compute capability >= 8; older GPUs emulate it) and
    on a CPU with native bf16, fp32 otherwise. `flags` as in cpu_bf16_path.
    """
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16(flags) else "fp32"
    return "fp32"


def slow_bf16_allowed() -> bool:
    return os.environ.get(ALLOW_SLOW_BF16_ENV) == "1"


def slow_cpu_bf16_error(flags: Iterable[str] | None = None) -> str | None:
    """The config error for train.precision=bf16 on this CPU, or None when bf16 runs at speed here
    (or SOUP_ALLOW_SLOW_BF16=1 is set). Only for runs on the CPU."""
    if cpu_bf16_path(flags) != "slow" or slow_bf16_allowed():
        return None
    return (f"train.precision=bf16 on this CPU (torch CPU capability {cpu_capability()}; no avx512_bf16 or AMX, "
            f"and oneDNN cannot run bf16 here) makes torch run bf16 matmuls in its fallback kernel, {SLOWDOWN}. "
            f"Use train.precision=auto (fp32 here, bf16 where the hardware has it) or train.precision=fp32; "
            f"to run bf16 here anyway (e.g. to check bf16 numerics), set {ALLOW_SLOW_BF16_ENV}=1.")


def describe_precision(requested: str, resolved: str, device: torch.device) -> str:
    """One log line: the precision the run trains in, and why when auto chose it or the CPU slows it."""
    device = torch.device(device)
    choice = f"{requested} -> {resolved}" if requested != resolved else resolved
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        bf16 = "native bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no native bf16"
        return f"{choice} (CUDA {name}, {bf16})" if requested == "auto" else choice
    if device.type != "cpu":
        return choice
    path = cpu_bf16_path()
    cpu = f"CPU {cpu_capability()}"
    if resolved == "bf16" and path == "slow":
        return (f"{choice} -- WARNING: {cpu} has no fast bf16 path; bf16 runs {SLOWDOWN} "
                f"({ALLOW_SLOW_BF16_ENV}=1 allowed it)")
    if resolved == "bf16" and path == "emulated":
        return f"{choice} ({cpu} emulates bf16 with AVX-512: about fp32 speed, no gain)"
    if requested == "auto":
        return f"{choice} ({cpu} {WHY_AUTO[path]})"
    return choice
