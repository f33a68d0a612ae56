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
    for key in ("reward_std", "advantage_std", "frac_reward_zero_std", "completions/mean_length",
                "completions/clipped_ratio", "clip_ratio/region_mean", "entropy", "time/rollout_s", "rollout_tokens_per_s",
                "rewards/dog/mean", "rewards/dog/std"):
        assert any(k.startswith(key) for k in row), key


def test_rloo_through_the_cli_raises_the_mean_reward(files, tmp_path):
    """task=rloo: the same rollouts and reward, a leave-one-out baseline, the KL in the reward."""
    rloo = ["task=rloo" if o == "task=grpo" else o for o in overrides(files, "optim.lr=1e-3")]
    out = run_cli(*rloo, f"hydra.run.dir={tmp_path / 'run'}")
    assert "rloo (leave-one-out baseline)" in out.stdout and "(KL in the reward)" in out.stdout
    history = rewards(tmp_path / "run")
    first, last = sum(history[:3]) / 3, sum(history[-3:]) / 3
    assert last > 2 * first and last > first + 2.0, history
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "non_score_reward" in row and "kl" in row


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
    assert row["rewards/accuracy/mean"] == 0.0 and row["rewards/format/mean"] == 0.0  # the story model cannot do it


@pytest.mark.parametrize("rows, extra, says", [
    ([{"text": "no prompt"}], [], ":1: the row has no prompt"),
    ([{"prompt": "Q", "answer": "1"}, {"prompt": "Q2"}], ["task.reward=[accuracy]"],
     ":2: reward 'accuracy' needs the column(s) answer"),
    ([{"prompt": "Q"}], ["task.reward=[acuracy]"], "no reward named 'acuracy'"),
    ([{"prompt": "Q"}], ["task.temperature=0"], "task.temperature must be > 0"),
    ([{"prompt": "Q"}], ["task.num_iterations=0"], "task.num_iterations must be at least 1"),
    ([{"prompt": "Q"}], ["task.epsilon_high=0.3"], "task.epsilon_high=0.3 is set, but this run does not read it"),
])
def test_bad_prompt_data_and_settings_are_named_before_any_generation(tmp_path, rows, extra, says):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli("task=grpo", "debug=tiny", "data=file", f"data.train_file={data}", *extra,
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


LENGTH_REWARD = "def reward_fn(completions, **columns):\n    return [len(c) / 10 for c in completions]\n"
EVERY_OPTION = ["task.num_iterations=2", "task.epsilon=0.1", "task.epsilon_high=0.3", "task.replay_buffer_size=4",
                "task.skip_zero_advantage=true", "task.tis_threshold=2.0", "task.off_policy_mask_threshold=0.5",
                "task.beta=0.1", "task.ref_sync_steps=2", "task.ref_model_ema_alpha=0.5", "task.top_k=20"]


def test_a_grpo_run_stopped_inside_a_generation_batch_resumes_exactly(tmp_path):
    """num_iterations=2 and a checkpoint after step 3: the resumed run needs the generation batch
    of step 2, the replay buffer and the moving reference from the checkpoint, not a new draw."""
    (tmp_path / "len.py").write_text(LENGTH_REWARD)
    base = ["task=grpo", "debug=tiny", f"task.reward=[{tmp_path / 'len.py'}]", "task.num_generations=4",
            "task.max_completion_length=10", "train.micro_batch_size=2", "train.max_steps=6", "optim.lr=1e-2",
            "train.save_every_steps=1", "train.keep_last_checkpoints=10", *EVERY_OPTION]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_in_process(straight, base)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "final")
    (resumed / "run.json").unlink()
    for later in ("step-4", "step-5", "step-6"):
        shutil.rmtree(resumed / "checkpoints" / later)
    run_in_process(resumed, [*base, "resume=auto"])
    a, b = load_file(str(straight / "final" / "model.safetensors")), load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], load_file(str(straight / "checkpoints" / "step-1" / "model.safetensors"))[k])
               for k in a)  # it trained
    assert rewards(resumed) == rewards(straight)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    # two optimizer steps per draw: 6 steps read 3 x 2 prompts of the 58 demo prompts (6 held out)
    assert rows[-1]["epoch"] == pytest.approx(6 / 58)
    assert [r["reward"] for r in rows][0::2] == [r["reward"] for r in rows][1::2]  # each batch trained twice


@pytest.fixture(scope="module")
def plain_tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_memory")
    (root / "len.py").write_text(LENGTH_REWARD)
    base = ["task=grpo", "debug=tiny", f"task.reward=[{root / 'len.py'}]", "task.num_generations=4",
            "task.max_completion_length=8", "train.micro_batch_size=2", "train.max_steps=2", "task.beta=0.1"]
    run_in_process(root / "plain", base)
    return root, base


def final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.parametrize("feature", [["checkpointing=full"], ["offload=disk"], ["kernels=compile"]])
def test_memory_features_train_grpo_to_the_same_weights(plain_tiny_run, feature):
    """They change how the training forward runs, not what it computes; rollouts run eagerly."""
    root, base = plain_tiny_run
    run_dir = root / feature[0].replace("=", "_")
    run_in_process(run_dir, [*base, *feature])
    plain, featured = final_weights(root / "plain"), final_weights(run_dir)
    for key in plain:
        torch.testing.assert_close(featured[key], plain[key], rtol=1e-4, atol=1e-5)
    assert rewards(run_dir) == rewards(root / "plain")


def test_grpo_trains_lora_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    (tmp_path / "len.py").write_text(LENGTH_REWARD)
    run_in_process(tmp_path / "run", ["task=grpo", "debug=tiny", f"task.reward=[{tmp_path / 'len.py'}]",
                                      "task.num_generations=4", "task.max_completion_length=8",
                                      "train.micro_batch_size=2", "train.max_steps=2", "task.beta=0.1", "peft=lora",
                                      "quant=4bit", "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    assert rows[-1]["kl"] > 0  # the adapter moved the policy away from the 4-bit base it is compared with


def test_grpo_evaluates_the_rewards_of_validation_prompts(tmp_path):
    (tmp_path / "len.py").write_text(LENGTH_REWARD)
    run_in_process(tmp_path / "run", ["task=grpo", "debug=tiny", f"task.reward=[{tmp_path / 'len.py'}]",
                                      "task.num_generations=4", "task.max_completion_length=8",
                                      "train.micro_batch_size=2", "train.max_steps=4", "data.val_split=0.1",
                                      "train.eval_every_steps=2", "train.eval_at_start=true", "optim.lr=3e-2"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all({"reward", "rewards/len/mean", "completions/mean_length"} <= r.keys() for r in evals)
    assert len({r["reward"] for r in evals}) > 1  # the same draws each time: the change is the policy's
    again = evaluate_once(tmp_path)
    assert again == evals[0]["reward"]


def evaluate_once(tmp_path) -> float:
    """The step-0 evaluation of a second, identical run: evaluation draws from a fixed seed."""
    run_in_process(tmp_path / "again", ["task=grpo", "debug=tiny", f"task.reward=[{tmp_path / 'len.py'}]",
                                        "task.num_generations=4", "task.max_completion_length=8",
                                        "train.micro_batch_size=2", "train.max_steps=1", "data.val_split=0.1",
                                        "train.eval_at_start=true"])
    rows = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    return next(r["reward"] for r in rows if r["split"] == "eval")


def test_a_reward_model_directory_scores_the_rollouts(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from soup.models.tokenizer import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    run_in_process(tmp_path / "run", ["task=grpo", "debug=tiny", f"task.reward=[{tmp_path / 'rm'}]",
                                      "task.num_generations=4", "task.max_completion_length=8",
                                      "train.micro_batch_size=2", "train.max_steps=2"])
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward_std"] > 0 and row["rewards/rm/mean"] == pytest.approx(row["reward"])
