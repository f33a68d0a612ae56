"""The built-in rewards on hand-written completions, with expected scores worked out by hand."""

import json

import pytest

from soup.rewards import get_reward
from soup.rewards.builtin import program_of
from tests.conftest import require_shared


def test_accuracy_compares_final_answers_as_numbers():
    completions = [
        "The answer is \\boxed{1234}",  # vs '#### 1,234': commas and the marker
        "so the answer is 3/4",  # vs 0.75: last number, as a rational
        "It grew by \\boxed{50\\%}",  # vs 50: a percentage against a bare number
        "#### -5",  # vs 5: the sign matters
        "\\boxed{1,234.0}",  # vs 1234: commas and a trailing .0
        "no answer at all",
        "\\boxed{5}",  # its row has no answer: not applicable
        "$5",
    ]
    answers = ["#### 1,234", "0.75", "50", "5", "1234", "5", None, "5"]
    assert get_reward("accuracy")(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, None, 1.0]


def test_accuracy_on_real_gsm8k_rows_with_hand_written_completions():
    rows = [json.loads(line) for line in require_shared("data/math/gsm8k_train_first1000.jsonl").open()]
    rows = [rows[0], rows[1], rows[15]]  # answers 72, 10 and 448000 ('$448,000' in the solution)
    answers = [row["answer"] for row in rows]
    right = [f"<think>{row['reasoning']}</think>\nThe answer is \\boxed{{{int(row['answer']):,}}}." for row in rows]
    gsm8k_style = [f"{row['reasoning']}\n#### {row['answer']}" for row in rows]
    off_by_one = [f"<think>{row['reasoning']}</think> \\boxed{{{int(row['answer']) + 1}}}" for row in rows]
    accuracy = get_reward("accuracy")
    assert accuracy(right, answer=answers) == [1.0, 1.0, 1.0]
    assert accuracy(gsm8k_style, answer=answers) == [1.0, 1.0, 1.0]
    assert accuracy(off_by_one, answer=answers) == [0.0, 0.0, 0.0]
    # The original GSM8K layout: the reference is the solution ending in '#### N'.
    solutions = [row["solution"] for row in rows]
    assert get_reward("accuracy", answer_column="solution")(right, solution=solutions) == [1.0, 1.0, 1.0]
    # With no box and no marker, the last number counts: the reasoning lines end '= 72 clips
    # altogether in April and May.', '= $10.' and '=$448,000', all three the answer.
    assert accuracy([row["reasoning"] for row in rows], answer=answers) == [1.0, 1.0, 1.0]
    assert accuracy([row["reasoning"] + " Check: 2 + 2 = 4." for row in rows], answer=answers) == [0.0, 0.0, 0.0]
    format_ = get_reward("format")
    assert format_(right) == [1.0, 1.0, 1.0] and format_(gsm8k_style) == [0.0, 0.0, 0.0]


def test_math_adds_exact_arithmetic_equality():
    completions = ["\\boxed{2^3}", "\\boxed{\\frac{1}{2}+1}", "\\boxed{(1+2)*3}", "\\boxed{7}", "\\boxed{\\sqrt{2}}",
                   "\\boxed{x+1}", "\\boxed{__import__('os').getcwd()}", "\\boxed{0.1+0.2}"]
    answers = ["8", "1.5", "9", "8", "\\sqrt{2}", "x + 1", "0", "\\frac{3}{10}"]
    assert get_reward("math")(completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    # accuracy does not evaluate: "2^3" is not the number 8
    assert get_reward("accuracy")(completions[:1], answer=answers[:1]) == [0.0]


def test_format_reward_and_a_configured_pattern():
    completions = ["<think>hmm</think> 42", "<think>\nmulti\nline\n</think>\n\\boxed{1}", "42",
                   "<think>no answer</think>   ", "preamble <think>x</think> 1"]
    assert get_reward("format")(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    tagged = get_reward("format", pattern=r"<think>.*?</think>\s*<answer>.*?</answer>")
    assert tagged(["<think>a</think><answer>1</answer>", "<think>a</think> 1"]) == [1.0, 0.0]


def test_program_of_takes_the_last_python_block_else_everything():
    assert program_of("try:\n```python\nx = 1\n```\nbetter:\n```py\nx = 2\n```\n") == "x = 2\n"
    assert program_of("def f(): return 1") == "def f(): return 1"
    assert program_of("```python\nx = 1\n") == "```python\nx = 1\n"  # never closed: the whole text


def test_code_reward_scores_and_counts_outcomes():
    completions = [
        "Here:\n```python\ndef f(x):\n    return x\n```\nFixed:\n```python\ndef f(x):\n    return x + 1\n```",
        "def f(x): return x - 1",
        "import os\nos._exit(0)",  # leaves before the tests run: not a pass
        "def f(x): return 2",
    ]
    tests = ["assert f(1) == 2", "assert f(1) == 2", "assert f(1) == 2", None]
    output = get_reward("code", timeout_s=3)(completions, tests=tests)
    assert output.values == [1.0, 0.0, 0.0, None]
    assert output.counts == {"passed": 1, "failed": 1, "exited": 1, "timeout": 0, "crashed": 0}
    as_list = [["assert f(1) == 2", "assert f(2) == 3"]]  # MBPP-style: a list of asserts
    listed = get_reward("code", timeout_s=3)(["def f(x): return x + 1"], tests=as_list)
    assert listed.values == [1.0]


def test_code_reward_in_parallel_keeps_each_completion_in_its_place():
    completions = [f"def f():\n    return {i}" for i in range(6)]
    tests = ["assert f() == 0", None, "assert f() == 2", "assert f() == 0", "assert f() == 4", "assert f() == 5"]
    output = get_reward("code", timeout_s=3, workers=3)(completions, tests=tests)
    assert output.values == [1.0, None, 1.0, 0.0, 1.0, 1.0]
    assert output.counts["passed"] == 4 and output.counts["failed"] == 1


def test_json_schema_reward():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    completions = ['{"a": 1}', 'Sure:\n```json\n{"a": 2}\n```', '```json\n{"a": "x"}\n```', "not json", '{"b": 2}',
                   '{"a": 1}']
    schemas = [json.dumps(schema)] * 5 + [None]
    assert get_reward("json_schema")(completions, schema=schemas) == [1.0, 1.0, 0.0, 0.0, 0.0, None]
    assert get_reward("json_schema")(['{"a": 1}'], schema=[schema]) == [1.0]  # a parsed schema works too


def test_json_schema_refuses_an_invalid_schema_naming_the_completion():
    from soup.rewards import RewardError

    with pytest.raises(RewardError, match="completion 1 is not a valid JSON Schema") as err:
        get_reward("json_schema")(["{}", "{}"], schema=['{"type": "object"}', '{"type": 12}'])
    assert err.value.index == 1


def test_json_schema_without_the_package_names_the_extra(monkeypatch):
    import sys

    from soup.errors import MissingDependency

    monkeypatch.setitem(sys.modules, "jsonschema", None)  # what an install without the rl extra sees
    with pytest.raises(MissingDependency, match=r"(?s)task.reward=json_schema needs .*soup-harness\[rl\]"):
        get_reward("json_schema")(["{}"], schema=["{}"])
