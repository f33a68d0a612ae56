"""GRPO learns: rollouts from the real stories260K Llama, a reward it can learn, the
GRPO-family loss, and the mean reward rises clearly within a dozen steps (full fine-tune
and LoRA). The loop here is the plainest one (experience, then one optimizer step); the
harness loop drives the same GRPOTask once task=grpo is wired into the config (issue 11)."""

import pytest
import torch

from soup.losses.grpo import LOSS_TYPES
from soup.rewards.registry import RewardSpec
from soup.rollout.engine import SamplingParams
from soup.tasks.grpo import GRPOSettings, GRPOTask
from tests.conftest import require_shared

pytestmark = pytest.mark.slow
PROMPTS = ["Once upon a time", "One day, a little girl", "Tom and his friend", "The sun was"]


def dog_count(completions, **_):
    """The reward: how often the completion says "dog" (stories260K says it now and then)."""
    return [float(text.lower().count("dog")) for text in completions]


def setup(peft: bool, **settings):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from soup.models.tokenizer import ensure_pad_token

    path = require_shared("models/stories260k")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path)
    if peft:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    options = {"num_generations": 8, "micro_batch_size": 16, **settings}
    task = GRPOTask(GRPOSettings(SamplingParams(max_completion_length=24), **options),
                    [(RewardSpec("dog", dog_count, (), ""), 1.0)], tokenizer, {tokenizer.eos_token_id})
    rows = [{"prompt_ids": tokenizer(p)["input_ids"]} for p in PROMPTS]
    return model, task, rows


def train(model, task, rows, lr: float, steps: int) -> list[dict]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    task.setup(model)
    model.train()
    history = []
    for step in range(steps):
        experience = task.make_experience(model, rows, step)
        units = sum(task.units(b) for b in experience.batches)
        for batch in experience.batches:
            out = task.forward(model, batch)
            (out.loss_sum / units).backward()
            experience.metrics.update({k: v / units for k, v in out.metric_sums.items()})
        optimizer.step()
        optimizer.zero_grad()
        history.append(experience.metrics)
    return history


@pytest.mark.parametrize("peft, lr", [(False, 1e-3), (True, 1e-2)])
def test_grpo_raises_the_mean_reward(peft, lr):
    history = train(*setup(peft), lr=lr, steps=12)
    first = sum(h["reward"] for h in history[:3]) / 3
    last = sum(h["reward"] for h in history[-3:]) / 3
    assert last > 2 * first and last > first + 2.0, [round(h["reward"], 2) for h in history]


# Each reduction of soup/losses/grpo.py, "sequence" through loss_type=rloo (RLOO's sum over tokens).
@pytest.mark.parametrize("loss_type", [t if t != "sequence" else "rloo" for t in LOSS_TYPES])
def test_every_loss_type_and_a_kl_penalty_train(loss_type):
    history = train(*setup(False, loss_type=loss_type, beta=0.05), lr=1e-3, steps=6)
    assert history[-1]["reward"] > history[0]["reward"]
    assert history[-1]["kl"] > 0 and history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference starts equal


def test_the_same_step_draws_the_same_completions():
    model, task, rows = setup(False)
    a, b = task.make_experience(model, rows, 3), task.make_experience(model, rows, 3)
    assert a.completions == b.completions
    assert a.completions != task.make_experience(model, rows, 4).completions
