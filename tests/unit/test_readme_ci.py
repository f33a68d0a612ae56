"""CI runs the README's quick start as written: the same install line, the same test command.

A CI that installs more than the README does passes where a new user fails, so the two
must be the same text.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def quick_start_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_quick_start_lines_verbatim():
    install, test = quick_start_lines()
    lines = ci_lines()
    assert install in lines, f".ci/run does not run the README's install line:\n{install}"
    assert test in lines, f".ci/run does not run the README's test command:\n{test}"
    # ... and installs nothing else.
    installs = [line for line in lines if "pip install" in line]
    assert installs == [install], installs


def test_the_readme_installs_the_dev_extra_which_holds_every_cpu_extra():
    install, _ = quick_start_lines()
    assert 'pip install -e ".[dev]"' in install
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (dev,) = extras["dev"]
    named = set(re.search(r"\[(.*)\]", dev).group(1).split(","))
    gpu_or_peer_only = {"gpu", "cce", "bench", "dev"}
    assert named == set(extras) - gpu_or_peer_only
