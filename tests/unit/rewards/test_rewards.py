"""The built-in rewards, the registry, custom reward files and the weighted sum."""

import json

import pytest

from soup.errors import ConfigError, SoupError
from soup.rewards import get_reward, score
from tests.conftest import require_shared


def values(name, completions, **columns):
    return get_reward(name).fn(completions, **columns)


def test_accuracy_compares_final_answers_as_numbers():
    completions = ["so \\boxed{1,234}", "#### 72", "the answer is 3/4", "it is 50%", "-5", "nothing", "$5"]
    answers = ["1234", "blah #### 72", "0.75", "0.5", "5", "5", None]
    assert values("accuracy", completions, answer=answers) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, None]


def test_accuracy_on_real_gsm8k_rows_with_hand_written_completions():
    rows = [json.loads(line) for line in require_shared("data/math/gsm8k_train_first1000.jsonl").open()][:3]
    right = [f"<think>{row['reasoning']}</think> The answer is \\boxed{{{row['answer']}}}." for row in rows]
    wrong = [f"#### {int(row['answer']) + 1}" for row in rows]
    answers = [row["answer"] for row in rows]
    assert values("accuracy", right, answer=answers) == [1.0, 1.0, 1.0]
    assert values("accuracy", wrong, answer=answers) == [0.0, 0.0, 0.0]
    assert values("accuracy", right, answer=[row["solution"] for row in rows]) == [1.0, 1.0, 1.0]  # '#### N'
    assert values("format", right) == [1.0, 1.0, 1.0] and values("format", wrong) == [0.0, 0.0, 0.0]


def test_math_also_accepts_arithmetic_equal_answers():
    assert values("math", ["\\boxed{2^3}", "\\boxed{\\frac{1}{2}+1}", "\\boxed{7}"], answer=["8", "1.5", "8"]) == \
        [1.0, 1.0, 0.0]
    assert values("accuracy", ["\\boxed{2^3}"], answer=["8"]) == [0.0]


def test_format_reward_and_its_pattern():
    completions = ["<think>hmm</think> 42", "42", "<think>no answer</think>", "<think>a</think>\n\\boxed{1}"]
    assert values("format", completions) == [1.0, 0.0, 0.0, 1.0]
    assert values("format", ["ANSWER: 3"], format_pattern=r"^ANSWER: \d+$") == [1.0]


def test_code_reward_runs_the_last_fenced_block_against_the_tests():
    completions = ["first try:\n```python\ndef f(x): return x\n```\nbetter:\n```python\ndef f(x):\n    return x + 1\n```",
                   "def f(x): return x - 1"]
    assert values("code", completions, tests=["assert f(1) == 2"] * 2) == [1.0, 0.0]


def test_json_schema_reward():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    completions = ['{"a": 1}', '```json\n{"a": "x"}\n```', "not json", '{"b": 2}']
    assert values("json_schema", completions, schema=[json.dumps(schema)] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_unknown_reward_names_the_registered_ones():
    with pytest.raises(ConfigError, match="accuracy, code, format, json_schema, math"):
        get_reward("acuracy")


def test_a_custom_reward_comes_from_the_file_named(tmp_path):
    file = tmp_path / "my_reward.py"
    file.write_text("def reward_fn(completions, **columns):\n    return [float(len(c)) for c in completions]\n")
    assert get_reward(str(file)).fn(["ab", "abcd"]) == [2.0, 4.0]
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no reward_fn"):
        get_reward(str(tmp_path / "empty.py"))
    with pytest.raises(ConfigError, match="no such file"):
        get_reward(str(tmp_path / "missing.py"))


def test_score_sums_weighted_rewards_and_keeps_each():
    scores = score([(get_reward("format"), 0.5), (get_reward("accuracy"), 2.0)],
                   ["<think>x</think> \\boxed{4}", "\\boxed{5}"], {"answer": ["4", None]})
    assert scores.total == [0.5 + 2.0, 0.0]  # None (not applicable) counts as 0
    assert scores.per_reward == {"format": [1.0, 0.0], "accuracy": [1.0, None]}


@pytest.mark.parametrize("body, says", [
    ("return [1.0]", "returned 1 values for 2 completions"),
    ("return [1.0, float('nan')]", "returned nan for completion 1"),
    ("return [1.0, 'high']", "returned 'high' (str) for completion 1"),
    ("raise KeyError('answer')", "raised KeyError"),
])
def test_bad_reward_output_names_the_reward_and_the_fix(tmp_path, body, says):
    file = tmp_path / "bad.py"
    file.write_text(f"def reward_fn(completions, **columns):\n    {body}\n")
    with pytest.raises(SoupError) as err:
        score([(get_reward(str(file)), 1.0)], ["a", "b"], {})
    assert says in str(err.value) and str(file) in str(err.value) and "fix:" in str(err.value)
