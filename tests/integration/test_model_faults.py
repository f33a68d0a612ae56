"""Broken model folders and moved base models: each is named with the fix, never a hub
error or a raw SafetensorError (issue 10, items 9 and 11)."""

import json
import shutil
from pathlib import Path

import pytest

from soup.errors import ConfigError
from soup.models.files import model_source
from tests.conftest import REPO_ROOT, require_shared, run_cli, run_in_process

STORIES = "models/stories260k"


def stories_copy(tmp_path: Path) -> Path:
    return Path(shutil.copytree(require_shared(STORIES), tmp_path / "stories"))


def test_a_missing_folder_is_named_not_a_hub_error(tmp_path):
    for path in (str(tmp_path / "nope"), "nope/dir/x", "./nope"):
        with pytest.raises(ConfigError, match="no such directory") as err:
            model_source(path)
        assert "Repo id" not in str(err.value) and "fix: point model.path at a folder" in str(err.value)


def test_a_hub_id_is_left_to_transformers():
    assert model_source("openai-community/gpt2") == "openai-community/gpt2"


def test_a_folder_without_a_model_lists_what_was_expected_and_what_is_there(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError) as err:
        model_source(str(tmp_path))
    message = str(err.value)
    assert "holds no model" in message and "config.json" in message and "model.safetensors" in message
    assert "tokenizer.json" in message and "It holds: notes.txt" in message
    assert "sentencepiece" not in message and "tiktoken" not in message.split("It holds")[1]


def test_a_folder_with_weights_but_no_tokenizer_suggests_tokenizer_path(tmp_path):
    folder = stories_copy(tmp_path)
    for name in ("tokenizer.json", "tokenizer.model"):
        (folder / name).unlink()
    with pytest.raises(ConfigError, match="model.tokenizer_path"):
        model_source(str(folder))
    assert model_source(str(folder), needs_tokenizer=False) == str(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_safetensors_file_is_named_as_corrupt(tmp_path, damage):
    folder = stories_copy(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07" * 4096, "empty": b""}[damage])
    with pytest.raises(ConfigError, match="is corrupt") as err:
        model_source(str(folder))
    assert str(weights) in str(err.value) and "fix:" in str(err.value)


def test_the_cli_names_a_corrupt_model_and_exits_2(tmp_path):
    folder = stories_copy(tmp_path)
    (folder / "model.safetensors").write_bytes(b"not a model")
    proc = run_cli("model=hf", f"model.path={folder}", "data.chat_template=chatml", "train.max_steps=1",
                   f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{folder / 'model.safetensors'} is corrupt" in proc.stderr


@pytest.mark.slow
def test_an_adapter_of_a_relative_model_path_merges_from_anywhere_and_a_moved_base_is_named(tmp_path):
    """Item 11: the adapter records the resolved base; a moved base names where it was read and --base."""
    require_shared(STORIES)
    run_dir = tmp_path / "run"
    assert Path.cwd().resolve() == REPO_ROOT.resolve()  # model.path is relative to where the run starts
    run_in_process(run_dir, ["model=hf", f"model.path=../shared/{STORIES}", "data.chat_template=chatml", "peft=lora",
                             "train.max_steps=2", "data.max_rows=16", "train.progress_bar=false"])
    adapter = run_dir / "final"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded).is_absolute() and Path(recorded) == (REPO_ROOT / ".." / "shared" / STORIES).resolve()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run_cli("--adapter", str(adapter), "--out", str(tmp_path / "merged"), module="soup.merge", cwd=elsewhere)
    assert (tmp_path / "merged" / "config.json").exists()

    moved = stories_copy(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "was-here")  # as if the base had moved
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    proc = run_cli("--adapter", str(adapter), "--out", str(tmp_path / "m2"), module="soup.merge", cwd=elsewhere,
                   check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(tmp_path / "was-here") in proc.stderr and "adapter_config.json" in proc.stderr
    assert "fix: pass --base" in proc.stderr
    run_cli("--adapter", str(adapter), "--out", str(tmp_path / "m3"), "--base", str(moved), module="soup.merge",
            cwd=elsewhere)
    assert (tmp_path / "m3" / "config.json").exists()
