"""task=grpo end to end: through the CLI on the real stories260K Llama the mean reward
rises; a stopped run resumes to the same weights; GSM8K rows run with accuracy + format;
bad prompt data is named before any generation."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import require_shared, run_cli, run_in_process

pytestmark = pytest.mark.slow
PROMPTS = ["Once upon a time", "One day, a little girl", "Tom and his friend", "The sun was", "Lily had a",
           "A big cat"]
REWARD = "def reward_fn(completions, **columns):\n    return [float(c.lower().count('dog')) for c in completions]\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 4))
    (tmp_path / "dog.py").write_text(REWARD)
    return tmp_path


def overrides(files: Path, *extra: str) -> list[str]:
    return ["task=grpo", "model=hf", f"model.path={require_shared('models/stories260k')}", "data=file",
            f"data.train_file={files / 'prompts.jsonl'}", f"task.reward=[{files / 'dog.py'}]",
            "task.num_generations=8", "task.max_completion_length=24", "train.micro_batch_size=4",
            "train.grad_accum_steps=1", "train.max_steps=12", "train.progress_bar=false", *extra]


def rewards(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["reward"] for row in rows if row["split"] == "train"]


@pytest.mark.parametrize("variant", [["optim.lr=1e-3"], ["peft=lora", "optim.lr=1e-2"]])
def test_grpo_through_the_cli_raises_the_mean_reward(files, tmp_path, variant):
    run_cli(*overrides(files, *variant), f"hydra.run.dir={tmp_path / 'run'}")
    history = rewards(tmp_path / "run")
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last > 2 * first and last > first + 2.0, history
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("reward_std", "advantage_std", "frac_zero_std_groups", "completion_length", "truncated",
                "clip_region", "time/rollout_s", "rollout_tokens_per_s", "rewards/dog"):
        assert any(k.startswith(key) for k in row), key


def train(run_dir: Path, *extra: str, files: Path):
    return run_in_process(run_dir, overrides(files, "optim.lr=1e-3", "train.save_every_steps=4",
                                             "train.keep_last_checkpoints=5", *extra))


def test_a_stopped_grpo_run_resumes_to_the_same_weights(files, tmp_path):
    """Rollouts are seeded by step, so the resumed run draws what the straight one drew."""
    straight = tmp_path / "straight"
    train(straight, "task.beta=0.05", files=files)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "run.json").unlink()
    for later in ("step-8", "step-12"):  # as if stopped right after the step-4 checkpoint
        shutil.rmtree(resumed / "checkpoints" / later)
    train(resumed, "task.beta=0.05", "resume=auto", files=files)
    a, b = load_file(str(straight / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rewards(resumed) == rewards(straight)


def test_gsm8k_rows_run_with_accuracy_and_format(tmp_path):
    gsm8k = require_shared("data/math/gsm8k_train_first1000.jsonl")
    run_cli("task=grpo", "model=hf", f"model.path={require_shared('models/stories260k')}", "data=file",
            f"data.train_file={gsm8k}", "data.max_rows=8", "data.max_length=320", "task.reward=[accuracy,format]",
            "task.reward_weights=[1.0,0.5]", "task.max_completion_length=16", "train.micro_batch_size=2",
            "train.max_steps=2", "train.progress_bar=false", f"hydra.run.dir={tmp_path}")
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["rewards/accuracy"] == 0.0 and row["rewards/format"] == 0.0  # the story model cannot do it


@pytest.mark.parametrize("rows, extra, says", [
    ([{"text": "no prompt"}], [], ":1: the row has no prompt"),
    ([{"prompt": "Q", "answer": "1"}, {"prompt": "Q2"}], ["task.reward=[accuracy]"],
     ":2: reward 'accuracy' needs the column(s) answer"),
    ([{"prompt": "Q"}], ["task.reward=[acuracy]"], "no reward named 'acuracy'"),
    ([{"prompt": "Q"}], ["task.temperature=0"], "task.temperature must be > 0"),
    ([{"prompt": "Q"}], ["data.val_split=0.1"], "task=grpo does not evaluate yet"),
])
def test_bad_prompt_data_and_settings_are_named_before_any_generation(tmp_path, rows, extra, says):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("task=grpo", "debug=tiny", "data=file", f"data.train_file={data}", *extra,
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
