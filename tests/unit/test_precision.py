"""soup/precision.py: train.precision=auto, and bf16 refused on a CPU without a fast bf16 path."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import soup.precision as precision
from soup.config import register_configs, validate
from soup.errors import ConfigError
from soup.loop import autocast_context
from soup.precision import cpu_bf16_path, cpu_has_native_bf16, describe_precision, resolve_precision

CONF = Path(__file__).resolve().parents[2] / "conf"
REPO = Path(__file__).resolve().parents[2]
register_configs()
CPU = torch.device("cpu")

# /proc/cpuinfo flags of three kinds of x86 CPU (abridged to what the rule reads).
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma", "f16c"}
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}  # e.g. Cascade Lake
AVX512_BF16 = AVX512_NO_BF16 | {"avx512_bf16"}  # e.g. Zen 4, Cooper Lake
AMX = AVX512_NO_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}  # Sapphire Rapids
x86_only = pytest.mark.skipif(platform.machine().lower() not in precision.X86_MACHINES,
                              reason="the CPU bf16 rule is measured and applied on x86 only")


def make(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def this_cpu_has(monkeypatch):
    """Make the probe answer for a CPU with the given flags, as validate() and the log line ask it."""
    real = precision.cpu_bf16_path

    def pretend(flags):
        monkeypatch.setattr(precision, "cpu_bf16_path", lambda given=None: real(flags if given is None else given))
        monkeypatch.delenv(precision.ALLOW_SLOW_BF16_ENV, raising=False)

    return pretend


@pytest.mark.parametrize("flags,path", [
    (AVX2_ONLY, "slow"), (AVX512_NO_BF16, "emulated"), (AVX512_BF16, "native"), (AMX, "native"), (set(), "slow"),
])
def test_cpu_bf16_path_reads_the_flags(flags, path):
    assert cpu_bf16_path(flags) == path
    assert cpu_has_native_bf16(flags) == (path == "native")


@pytest.mark.parametrize("flags,resolved", [
    (AVX512_BF16, "bf16"), (AMX, "bf16"), (AVX512_NO_BF16, "fp32"), (AVX2_ONLY, "fp32"),
])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(flags, resolved):
    assert resolve_precision("auto", CPU, flags) == resolved


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept(requested):
    assert resolve_precision(requested, CPU, AVX2_ONLY) == requested


def test_this_machines_answers_agree():
    path = cpu_bf16_path()
    assert path in ("native", "emulated", "slow", "unknown")
    assert resolve_precision("auto", CPU) == ("bf16" if path == "native" else "fp32")
    assert precision.cpu_capability() == torch.backends.cpu.get_cpu_capability()


def test_explicit_bf16_on_a_slow_cpu_is_rejected_with_the_fix(this_cpu_has):
    this_cpu_has(AVX2_ONLY)
    overrides = ["train.device=cpu", "train.precision=bf16"]
    with pytest.raises(ConfigError) as info:
        validate(make(*overrides), overrides)
    message = str(info.value)
    assert "train.precision=bf16" in message and "100x slower" in message
    assert "train.precision=auto" in message and "train.precision=fp32" in message
    assert f"capability {torch.backends.cpu.get_cpu_capability()}" in message
    assert "SOUP_ALLOW_SLOW_BF16=1" in message


@pytest.mark.parametrize("requested", ["auto", "fp32"])
def test_the_fixes_named_are_accepted_on_a_slow_cpu(this_cpu_has, requested):
    this_cpu_has(AVX2_ONLY)
    overrides = ["train.device=cpu", f"train.precision={requested}"]
    validate(make(*overrides), overrides)


@pytest.mark.parametrize("flags", [AVX512_NO_BF16, AVX512_BF16])
def test_explicit_bf16_is_accepted_where_the_cpu_runs_it_at_speed(this_cpu_has, flags):
    this_cpu_has(flags)
    overrides = ["train.device=cpu", "train.precision=bf16"]
    validate(make(*overrides), overrides)


def test_the_escape_hatch_runs_slow_bf16_with_a_warning(this_cpu_has, monkeypatch):
    this_cpu_has(AVX2_ONLY)
    monkeypatch.setenv(precision.ALLOW_SLOW_BF16_ENV, "1")
    overrides = ["train.device=cpu", "train.precision=bf16"]
    validate(make(*overrides), overrides)
    line = describe_precision("bf16", "bf16", CPU)
    assert "WARNING" in line and "100x slower" in line and "SOUP_ALLOW_SLOW_BF16=1" in line


@pytest.mark.parametrize("flags,expect", [
    (AVX512_BF16, "auto -> bf16 (CPU {cap} with native bf16)"),
    (AVX2_ONLY, "auto -> fp32 (CPU {cap} without a fast bf16 path: bf16 would be about 100x slower)"),
    (AVX512_NO_BF16, "auto -> fp32 (CPU {cap} without native bf16: bf16 would be emulated, no faster than fp32)"),
])
def test_the_log_line_says_what_auto_chose_and_why(this_cpu_has, flags, expect):
    this_cpu_has(flags)
    resolved = resolve_precision("auto", CPU)
    assert describe_precision("auto", resolved, CPU) == expect.format(cap=torch.backends.cpu.get_cpu_capability())


def test_autocast_context_refuses_an_unresolved_precision():
    with pytest.raises(ValueError, match="auto"):
        autocast_context("auto", CPU)


@x86_only
def test_onednn_held_to_avx2_is_seen_as_slow_by_the_real_probe():
    """No monkeypatching: oneDNN limited to AVX2 is what an AVX2-only CPU runs, and torch's own check sees it."""
    code = ("import json, torch; from soup.precision import cpu_record, resolve_precision, slow_cpu_bf16_error; "
            "print(json.dumps({**cpu_record(), 'auto': resolve_precision('auto', torch.device('cpu')), "
            "'error': slow_cpu_bf16_error()}))")
    env = {k: v for k, v in os.environ.items() if k != precision.ALLOW_SLOW_BF16_ENV}
    env.update(ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["cpu_bf16"] == "slow" and record["cpu_native_bf16"] is False
    assert record["auto"] == "fp32" and "train.precision=auto" in record["error"]
