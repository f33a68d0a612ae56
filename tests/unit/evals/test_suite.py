"""Suite files (soup/evals/suite.py): every mistake is named with its file, line and task, before a model loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from soup.errors import ConfigError
from soup.evals.suite import read_suite


def suite_file(tmp_path: Path, text: str) -> str:
    (tmp_path / "rows.jsonl").write_text('{"prompt": "1+1?", "answer": "2"}\n')
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return str(path)


def refused(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as error:
        read_suite(suite_file(tmp_path, text))
    message = str(error.value)
    assert "\n  fix: " in message, message
    return message


def test_a_suite_reads_each_kind_with_its_defaults_and_paths_beside_the_file(tmp_path):
    suite = read_suite(suite_file(tmp_path, "tasks:\n  sums:\n    kind: generation\n    file: rows.jsonl\n"
                                            "  held:\n    kind: loss\n    file: rows.jsonl\n    data: {max_length: 64}\n"))
    sums, held = suite.tasks
    assert (sums.name, sums.kind, sums.scorer, sums.temperature, sums.max_new_tokens) == \
        ("sums", "generation", "answer", 0.0, 256)
    assert sums.file == str(tmp_path / "rows.jsonl") and held.data == {"max_length": 64}
    assert len(suite.sha256) == 64


def test_the_line_and_task_of_a_mistake_are_named(tmp_path):
    message = refused(tmp_path, "tasks:\n  a:\n    kind: loss\n    file: rows.jsonl\n  b:\n    kind: generaton\n")
    assert "suite.yaml:5 tasks.b" in message and "did you mean 'generation'" in message


@pytest.mark.parametrize("text, expected", [
    # a field of another kind says which kind reads it
    ("tasks:\n  a:\n    kind: loss\n    file: rows.jsonl\n    scorer: answer\n", "it is read by kind generation"),
    ("tasks:\n  a:\n    kind: generation\n    file: rows.jsonl\n    max_new_token: 5\n",
     "did you mean 'max_new_tokens'"),
    ("tasks:\n  a:\n    kind: generation\n    file: missing.jsonl\n", "no such file"),
    ("tasks:\n  a:\n    kind: generation\n", "kind generation needs `file`"),
    ("tasks:\n  a:\n    kind: generation\n    file: rows.jsonl\n    max_new_tokens: many\n", "it must be an integer"),
    ("tasks:\n  a:\n    kind: generation\n    file: rows.jsonl\n    max_new_tokens: 0\n", "at least 1"),
    ("tasks:\n  a:\n    kind: generation\n    file: rows.jsonl\n    scorer: regex\n", "regex"),
    ("tasks:\n  a:\n    kind: loss\n    file: rows.jsonl\n    task: dpo\n", "task: sft"),
    ("tasks:\n  a:\n    kind: loss\n    file: rows.jsonl\n    data: {packing: true}\n", "not read by a loss task"),
    ("tasks: []\n", "a mapping with `tasks` naming at least one task"),
    ("tasks:\n  a: [\n", "not valid YAML"),
])
def test_each_kind_of_mistake_is_refused_with_the_fix(tmp_path, text, expected):
    assert expected in refused(tmp_path, text)


def test_a_judge_must_be_a_local_model_folder_never_a_url(tmp_path):
    base = "tasks:\n  j:\n    kind: judge\n    file: rows.jsonl\n    rubric: 'Rate {completion}'\n"
    assert "is remote" in refused(tmp_path, base + "    judge: https://api.example.com/v1\n")
    assert "not a local model directory" in refused(tmp_path, base + "    judge: some-org/judge-7b\n")


def test_a_rubric_must_show_the_completion_and_only_known_placeholders(tmp_path):
    (tmp_path / "judge").mkdir()
    (tmp_path / "judge" / "config.json").write_text("{}")
    base = "tasks:\n  j:\n    kind: judge\n    file: rows.jsonl\n    judge: judge\n"
    assert "must show the judge {completion}" in refused(tmp_path, base + "    rubric: 'Rate {answer}'\n")
    assert "no reference_column" in refused(tmp_path, base + "    rubric: '{completion} vs {reference}'\n")
    suite = read_suite(suite_file(tmp_path, base + "    rubric: 'Rate {completion}'\n"))
    assert suite.tasks[0].judge == str((tmp_path / "judge").resolve())


def test_the_bundled_demo_suite_reads():
    suite = read_suite("demo")  # conf/suite/demo.yaml, as train.eval_gate=demo names it
    assert [t.kind for t in suite.tasks] == ["loss", "generation", "multiple_choice"]


def compose_eval(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from soup.evals.config import register_eval_configs
    from tests.conftest import REPO_ROOT

    register_eval_configs()
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        return compose(config_name="eval", overrides=overrides)


def test_the_suite_group_composes_the_demo_suite_and_command_line_fields_over_it():
    from soup.evals.suite import compose_suite

    demo = compose_suite(compose_eval([]).suite)
    changed = compose_suite(compose_eval(["suite.tasks.sums.max_new_tokens=4",
                                          "+suite.tasks.more={kind: loss, file: pkg://demo/pretrain.jsonl}"]).suite)
    assert [t.name for t in demo.tasks] == ["chat", "sums", "capitals"]
    assert [t.name for t in changed.tasks] == ["chat", "sums", "capitals", "more"]
    assert (demo.tasks[1].max_new_tokens, changed.tasks[1].max_new_tokens, changed.tasks[1].max_rows) == (16, 4, 16)
    assert demo.sha256 != changed.sha256 == compose_suite(compose_eval(
        ["suite.tasks.sums.max_new_tokens=4", "+suite.tasks.more={kind: loss, file: pkg://demo/pretrain.jsonl}"]).suite).sha256
    with pytest.raises(ConfigError, match=r"suite.tasks.sums: kind generation does not read `max_new_token`"):
        compose_suite(compose_eval(["+suite.tasks.sums.max_new_token=4"]).suite)


def test_a_suite_files_tasks_take_command_line_fields_and_extend_a_base_file(tmp_path):
    from soup.evals.suite import compose_suite

    suite_file(tmp_path, "tasks:\n  sums:\n    kind: generation\n    file: rows.jsonl\n")
    (tmp_path / "more.yaml").write_text("file: suite.yaml\ntasks:\n  sums:\n    max_rows: 1\n"
                                        "  held:\n    kind: loss\n    file: rows.jsonl\n")
    extended = read_suite(str(tmp_path / "more.yaml"))
    assert [(t.name, t.max_rows) for t in extended.tasks] == [("sums", 1), ("held", None)]
    assert extended.tasks[0].file == str(tmp_path / "rows.jsonl")
    assert "more.yaml:3 tasks.sums (over " in extended.tasks[0].where
    composed = compose_suite(compose_eval(["suite=file", f"suite.file={tmp_path / 'more.yaml'}",
                                           "+suite.tasks.sums.scorer=exact"]).suite)
    assert (composed.tasks[0].scorer, composed.tasks[0].max_rows) == ("exact", 1)


def test_a_base_file_may_be_bundled_or_named_and_a_loop_of_bases_is_refused(tmp_path):
    (tmp_path / "extends_demo.yaml").write_text("file: demo\ntasks:\n  sums:\n    max_rows: 2\n")
    assert [(t.name, t.max_rows) for t in read_suite(str(tmp_path / "extends_demo.yaml")).tasks][:2] == \
        [("chat", 64), ("sums", 2)]
    (tmp_path / "a.yaml").write_text("file: b.yaml\n")
    (tmp_path / "b.yaml").write_text("file: a.yaml\n")
    assert "a loop?" in refused(tmp_path, "file: a.yaml\n")


def test_a_task_name_that_would_make_a_path_is_refused(tmp_path):
    assert "letters, digits" in refused(tmp_path, "tasks:\n  mmlu/stem:\n    kind: loss\n    file: rows.jsonl\n")
