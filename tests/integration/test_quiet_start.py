"""A run starts with soup's own lines: the known-harmless import messages of torchao, torch and
bitsandbytes (soup/quiet.py) never reach the terminal, and the filters drop nothing else."""

import logging
import os
import subprocess
import sys

import pytest

from soup.quiet import KNOWN_NOISE, quiet_known_noise
from tests.conftest import REPO_ROOT

# What each message looked like before the filters (torchao 0.18, torch 2.13, bitsandbytes 0.50).
NOISE = ("Failed to load", "_C_mxfp8", "_C_cutlass", "is an Enum subclass", "register_constant()",
         "gemm_4bit_forward", "kernels-community")


def run_merged(*overrides: str) -> list[str]:
    """`python -m soup.train <overrides>` with stderr merged into stdout, in the order printed."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "soup.train", *overrides], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [[], ["quant=fp8"]])
def test_a_tiny_run_starts_with_soup_and_prints_none_of_the_known_noise(tmp_path, overrides):
    if overrides:
        pytest.importorskip("torchao")
    lines = run_merged("debug=tiny", "train.max_steps=1", *overrides, f"hydra.run.dir={tmp_path}")
    assert lines and lines[0].startswith("[soup] "), lines[:3]
    for line in lines:
        assert not any(word in line for word in NOISE), line


@pytest.mark.slow
def test_soup_memory_modules_do_not_import_torchao_themselves():
    # torchao is imported by transformers' modelling code when installed; soup's own
    # modules import it only inside the functions of quant=fp8 / int8_qat.
    code = ("import sys, soup.memory.fp8, soup.memory.setup, soup.memory.kernels; "
            "print('torchao' in sys.modules, 'bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.parametrize("logger_name", sorted(KNOWN_NOISE))
def test_each_filter_drops_only_its_own_message(logger_name, caplog):
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger
    logger = logging.getLogger(logger_name)
    assert sum(f.pattern is KNOWN_NOISE[logger_name][0] for f in logger.filters if hasattr(f, "pattern")) == 1
    noise = {
        "torchao": "Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
                   "Could not load this library",
        "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                               "torch.compile as an opaque value type.",
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: "
                                         "No module named 'kernels'.",
    }[logger_name]
    with caplog.at_level(logging.WARNING, logger=logger_name):
        logger.warning(noise)
        logger.warning("Failed to load something else entirely")
    kept = [r.getMessage() for r in caplog.records if r.name == logger_name]
    assert kept == ["Failed to load something else entirely"]
