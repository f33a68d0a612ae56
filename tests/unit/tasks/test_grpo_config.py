"""task=grpo from the config: the settings reach the task (soup/tasks/grpo.py from_config)."""

from hydra import compose, initialize_config_dir

from soup.config import register_configs
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks import build_task
from tests.conftest import REPO_ROOT

register_configs()


def task_of(*overrides):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["task=grpo", *overrides])
    return build_task(cfg, build_byte_tokenizer())


def rewards_of(task, completions, **columns):
    return [spec.fn(completions, **columns) for spec, _ in task.rewards]


def test_answer_column_picks_the_column_accuracy_compares_with():
    completions = ["\\boxed{5}", "\\boxed{7}"]
    columns = {"answer": ["5", "5"], "solution": ["7", "7"]}
    assert rewards_of(task_of(), completions, **columns) == [[1.0, 0.0]]
    assert rewards_of(task_of("task.answer_column=solution"), completions, **columns) == [[0.0, 1.0]]
    assert task_of("task.answer_column=solution").rewards[0][0].columns == ("solution",)


def test_the_sampling_and_loss_settings_reach_the_task():
    task = task_of("task.num_generations=6", "task.max_completion_length=9", "task.top_k=4", "task.loss_type=grpo",
                   "task.scale_rewards=none", "task.beta=0.1", "train.micro_batch_size=3", "task.reward=[accuracy,format]",
                   "task.reward_weights=[1.0,0.25]")
    s = task.settings
    assert (s.num_generations, s.sampling.max_completion_length, s.sampling.top_k) == (6, 9, 4)
    assert (s.loss_type, s.scale_rewards, s.beta, s.micro_batch_size) == ("grpo", "none", 0.1, 18)
    assert [(spec.name, w) for spec, w in task.rewards] == [("accuracy", 1.0), ("format", 0.25)]
    assert task.unit_name == "completions"
