"""Prompt rows for task=grpo (soup/tasks/prompts.py): the text each prompt becomes, the
`prompt` column the rewards receive, the validation split and the prompt template."""

import json

import pytest
from hydra import compose, initialize_config_dir

from soup.config import register_configs
from soup.errors import DataError
from soup.models.tokenizer import build_byte_tokenizer
from soup.tasks.prompts import PROMPT_TEMPLATES, build_prompt_data
from tests.conftest import REPO_ROOT

register_configs()


def data_of(tmp_path, rows, *overrides):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["task=grpo", "data=file", f"data.train_file={path}",
                                                        "data.max_length=512", *overrides])
    return build_prompt_data(cfg, build_byte_tokenizer(), [])


def test_rows_become_prompt_ids_and_the_prompt_text_the_rewards_see(tmp_path):
    data = data_of(tmp_path, [{"question": "What is 2+2?", "answer": "4"}, {"prompt": "Tell a story", "x": 1}])
    tokenizer = build_byte_tokenizer()
    first, second = data.train
    assert first["prompt"] == "What is 2+2?" and first["answer"] == "4" and "question" not in first
    assert tokenizer.decode(first["prompt_ids"], skip_special_tokens=True) == "What is 2+2?"
    assert second["prompt"] == "Tell a story" and second["x"] == 1


def test_r1_zero_wraps_each_question_in_the_template(tmp_path):
    data = data_of(tmp_path, [{"question": "What is 2+2? ", "answer": "4"}], "task.prompt_template=r1_zero")
    text = data.train[0]["prompt"]
    assert text == PROMPT_TEMPLATES["r1_zero"].replace("{prompt}", "What is 2+2?")
    assert text.endswith("User: What is 2+2?. Assistant:") and "<think>" in text
    custom = data_of(tmp_path, [{"prompt": "Hi"}], "task.prompt_template='Q: {prompt} A:'")
    assert custom.train[0]["prompt"] == "Q: Hi A:"


def test_a_template_with_chat_message_rows_is_an_error_naming_the_row(tmp_path):
    with pytest.raises(DataError, match=r"p.jsonl:2: task.prompt_template wraps text prompts"):
        data_of(tmp_path, [{"prompt": "ok"}, {"prompt": [{"role": "user", "content": "hi"}]}],
                "task.prompt_template=r1_zero")


def test_val_split_holds_out_prompts(tmp_path):
    data = data_of(tmp_path, [{"prompt": f"p{i}"} for i in range(20)], "data.val_split=0.2")
    assert len(data.train) == 16 and len(data.val) == 4
    assert not {r["prompt"] for r in data.train} & {r["prompt"] for r in data.val}
