"""The paper presets of conf/experiment/: each carries the values its source names (the comment at
the top of its yaml cites them) and runs, shrunk by debug=tiny to two steps (the online ones also
with two short completions per prompt of stories260K, on the GSM8K rows of ../shared)."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_config, require_shared, run_in_process

pytestmark = pytest.mark.slow

# preset -> {config path: the recipe's value}; "batch" is micro_batch_size x grad_accum_steps, the
# pairs, rows or prompts of one optimizer step (one rollout for the online presets).
RECIPES = {
    "zephyr_dpo": {"task.name": "dpo", "task.loss_type": "sigmoid", "task.beta": 0.1, "optim.lr": 5e-7,
                   "optim.weight_decay": 0.0, "sched.name": "linear", "sched.warmup_ratio": 0.1,
                   "train.epochs": 3, "batch": 32, "data.max_length": 1024, "data.max_prompt_length": 512},
    "tulu3_dpo": {"task.name": "dpo", "task.loss_type": "sigmoid_norm", "task.beta": 5.0, "optim.lr": 5e-7,
                  "optim.weight_decay": 0.0, "sched.name": "linear", "sched.warmup_ratio": 0.1,
                  "train.epochs": 1, "batch": 128, "data.max_length": 2048},
    "simpo": {"task.name": "simpo", "task.beta": 2.0, "task.simpo_gamma": 1.6, "optim.lr": 3e-7,
              "sched.name": "cosine", "sched.warmup_ratio": 0.1, "sched.min_lr_ratio": 0.0, "train.epochs": 1,
              "batch": 128, "data.max_length": 1024, "data.max_prompt_length": 512},
    "orpo": {"task.name": "orpo", "task.orpo_lambda": 0.1, "optim.lr": 5e-6, "sched.warmup_steps": 200,
             "train.epochs": 5, "batch": 32, "data.max_length": 2048, "data.max_prompt_length": 1792},
    "kto": {"task.name": "kto", "task.beta": 0.1, "task.desirable_weight": 1.0, "task.undesirable_weight": 1.0,
            "optim.lr": 5e-7, "sched.name": "constant", "sched.warmup_steps": 150, "train.epochs": 1, "batch": 32,
            "data.max_length": 1024, "data.max_prompt_length": 512},
    "r1_zero_grpo_gsm8k": {"task.name": "grpo", "task.loss_type": "grpo", "task.beta": 0.001,
                           "task.num_generations": 16, "task.reward": ["accuracy", "format"],
                           "task.prompt_template": "r1_zero", "task.max_completion_length": 32768,
                           "task.ref_sync_steps": 400, "optim.lr": 3e-6, "sched.name": "constant", "batch": 32},
    "dr_grpo": {"task.name": "grpo", "task.loss_type": "dr_grpo", "task.scale_rewards": "none", "task.beta": 0.0,
                "task.num_generations": 8, "task.max_completion_length": 3000, "optim.lr": 1e-6,
                "sched.name": "constant", "batch": 128},
    "dapo": {"task.name": "grpo", "task.loss_type": "dapo", "task.epsilon": 0.2, "task.epsilon_high": 0.28,
             "task.skip_zero_advantage": True, "task.beta": 0.0, "task.num_generations": 16,
             "task.num_iterations": 16, "task.max_completion_length": 20480, "optim.lr": 1e-6,
             "optim.weight_decay": 0.1, "sched.name": "constant", "sched.warmup_steps": 320, "batch": 512},
}
ONLINE = ("r1_zero_grpo_gsm8k", "dr_grpo", "dapo")


def recipe_values(config, paths) -> dict:
    """{path: its value in `config`} for RECIPES paths ("batch": micro_batch_size x grad_accum_steps)."""
    values = {}
    for path in paths:
        if path == "batch":
            values[path] = config.train.micro_batch_size * config.train.grad_accum_steps
        else:
            value = OmegaConf.select(config, path)
            values[path] = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    return values


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_the_preset_sets_its_recipes_values(preset):
    assert recipe_values(compose_config([f"experiment={preset}"]), RECIPES[preset]) == RECIPES[preset]


@pytest.mark.parametrize("preset", sorted(RECIPES))
def test_the_preset_runs_two_tiny_steps(preset, tmp_path):
    overrides = [f"experiment={preset}", "debug=tiny", "train.max_steps=2"]
    if preset in ONLINE:  # stories260K and the GSM8K rows, two 8-token completions per prompt
        overrides += [f"model.path={require_shared('models/stories260k')}",
                      f"data.train_file={require_shared('data/math/gsm8k_train_first1000.jsonl')}",
                      "task.num_generations=2", "task.max_completion_length=8"]
    run_in_process(tmp_path, overrides)

    assert (tmp_path / "run.json").exists() and (tmp_path / "final").is_dir()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train] == [1, 2]
    assert all(math.isfinite(row["loss"]) for row in train), train
    # What the run recorded: the recipe's objective, untouched by debug=tiny's shrinking.
    recorded = OmegaConf.create(json.loads((tmp_path / "run.json").read_text())["config"])
    shrunk = {override.split("=")[0] for override in overrides}
    objective = [path for path in RECIPES[preset] if path.startswith(("task.", "optim.")) and path not in shrunk]
    assert recipe_values(recorded, objective) == {path: RECIPES[preset][path] for path in objective}
