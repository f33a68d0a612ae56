"""A user's mistake ends with exit status 2 and a message naming the file/line/flag, never a traceback."""

import json

import pytest

from tests.conftest import run_cli, run_in_process

pytestmark = pytest.mark.slow


def fails_with(*overrides, expect: list[str]):
    proc = run_cli("debug=tiny", "data.val_split=0", *overrides, check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    for text in expect:
        assert text in proc.stderr, proc.stderr
    return proc


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"instruction": "Say hi", "input": "", "output": "hi"}


def test_malformed_json_line_names_file_and_line(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [GOOD, GOOD, '{"instruction": "x", "output": '])
    fails_with("data=file", f"data.train_file={data}", f"hydra.run.dir={tmp_path / 'run'}", expect=[f"{data}:3"])


def test_row_missing_a_field_names_the_field_and_line(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [GOOD, {"instruction": "no output"}])
    fails_with("data=file", f"data.train_file={data}", f"hydra.run.dir={tmp_path / 'run'}",
               expect=[f"{data}:2", "output"])


def test_empty_file_is_an_error_not_a_run_on_zero_rows(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    fails_with("data=file", f"data.train_file={data}", f"hydra.run.dir={tmp_path / 'run'}", expect=[str(data)])
    assert not (tmp_path / "run" / "final").exists()


def test_format_mismatch_names_the_flag(tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [GOOD])
    fails_with("data=file", f"data.train_file={data}", "data.format=sharegpt", f"hydra.run.dir={tmp_path / 'run'}",
               expect=[f"{data}:1", "data.format"])


def test_row_with_zero_trainable_tokens_names_the_fix(tmp_path, capsys):
    long_prompt = {"instruction": "x" * 400, "input": "", "output": "ok"}
    data = write_rows(tmp_path / "d.jsonl", [GOOD, long_prompt])
    fails_with("data=file", f"data.train_file={data}", "data.max_length=64", f"hydra.run.dir={tmp_path / 'run'}",
               expect=[f"{data}:2", "data.overlong=truncate_or_drop"])
    # The fix it names works: the row is dropped and counted, the good row trains.
    run_in_process(tmp_path / "fixed", ["data=file", f"data.train_file={data}", "data.max_length=64",
                                        "data.overlong=truncate_or_drop", "train.max_steps=1"])
    assert "nothing_to_train_after_truncation: 1" in capsys.readouterr().out


def test_missing_file_names_the_flag(tmp_path):
    fails_with("data=file", f"data.train_file={tmp_path / 'nope.jsonl'}", f"hydra.run.dir={tmp_path / 'run'}",
               expect=["nope.jsonl"])


def test_config_typo_fails_at_compose_with_hydras_message(tmp_path):
    proc = run_cli("optim.lrr=1e-3", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "lrr" in proc.stderr


def test_cross_group_rule_fails_before_any_model_loads(tmp_path):
    fails_with("model=hf", f"hydra.run.dir={tmp_path}", expect=["model.path"])


@pytest.mark.parametrize("template, why", [
    ("{{ cycler.__init__.__globals__ }}", "access to attribute '__init__'"),
    ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
])
def test_a_template_the_sandbox_blocks_names_the_template_not_the_row(tmp_path, template, why):
    proc = fails_with(f"data.chat_template='{template}'", f"hydra.run.dir={tmp_path / 'run'}",
                      expect=["data.chat_template was refused", why])
    assert proc.returncode == 2 and "roles/order" not in proc.stderr
