"""The eval scorers on hand-written completions, with expected scores worked out by hand."""

import json

import pytest

from soup.errors import ConfigError
from soup.evals.scorers import SCORERS, Score, check_scorer, needs_reference, score
from soup.rewards.builtin import accuracy

# GSM8K train row 0's solution column: the reference answer is what follows '####'.
NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("completion, reference, expected", [
    ("She sold 24 in May, so 48 + 24 = 72 clips.\n#### 72", NATALIA, Score(1.0, "72", {})),
    ("She sold 24 in May, so 48 + 24 = 72 clips.\n#### 72", "72", Score(1.0, "72", {})),
    ("In all she sold \\boxed{72} clips.", NATALIA, Score(1.0, "72", {})),
    ("So the total is \\boxed{1,234}.", "1234", Score(1.0, "1,234", {})),  # thousands comma
    ("the answer is 18 dollars", "18", Score(1.0, "18", {})),  # last number, unit dropped
    ("the answer is 18 dollars", NATALIA, Score(0.0, "18", {})),
    ("48 + 24 = 72, so \\boxed{12", "72", Score(0.0, None, {})),  # truncated box: no answer, not the 72 before it
    ("It is 3/4 of the cake", "0.75", Score(1.0, "3/4", {})),
    ("no number here", "72", Score(0.0, None, {})),
])
def test_answer_scores_the_final_answer_as_the_accuracy_reward_does(completion, reference, expected):
    assert score("answer", completion, reference) == expected


def test_answer_and_math_disagree_on_an_arithmetic_expression():
    # 2^3 is not a number to `answer`, but `math` evaluates it to 8.
    assert score("answer", "so it is \\boxed{2^3}", "8") == Score(0.0, "2^3", {})
    assert score("math", "so it is \\boxed{2^3}", "8") == Score(1.0, "2^3", {})
    assert score("math", "so it is \\boxed{2^3}", "9") == Score(0.0, "2^3", {})
    assert score("math", "\\boxed{72}", NATALIA) == Score(1.0, "72", {})


def test_answer_agrees_with_the_accuracy_reward_row_by_row():
    completions = ["#### 72", "\\boxed{1,234.0}", "It grew by \\boxed{50\\%}", "#### -5", "so it is 3/4",
                   "\\boxed{12", "no answer", "\\boxed{\\text{Paris}}", "$5 each", "x = 72 clips."]
    answers = [NATALIA, "1234", "50", "5", "0.75", "12", "72", "paris", "5", "72"]
    rewards = accuracy(completions, answer=answers)
    assert rewards == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # by hand, so the parity is not vacuous
    assert [score("answer", c, a).value for c, a in zip(completions, answers)] == rewards


def test_exact_compares_stripped_text_only():
    assert score("exact", "  Paris \n", "Paris") == Score(1.0, "Paris", {})
    assert score("exact", "paris", "Paris") == Score(0.0, "paris", {})
    assert score("exact", "72", 72).value == 1.0  # a non-string reference is compared as its str()


def test_text_ignores_case_whitespace_latex_wrappers_and_a_final_period():
    assert score("text", "Paris.", "paris") == Score(1.0, "paris", {})
    assert score("text", "\\text{New York}", "new york") == Score(1.0, "newyork", {})
    assert score("text", "Paris, France", "Paris").value == 0.0


def test_regex_compares_the_first_group_with_the_reference():
    pattern = r"Answer:\s*([A-D])"
    assert score("regex", "Hmm, (A) is wrong.\nAnswer: B", "B", pattern=pattern) == Score(1.0, "B", {})
    assert score("regex", "Answer: B", " B\n", pattern=pattern).value == 1.0  # reference stripped too
    assert score("regex", "Answer: B", "C", pattern=pattern) == Score(0.0, "B", {})
    assert score("regex", "I pick B", "B", pattern=pattern) == Score(0.0, None, {})


def test_regex_without_a_group_compares_the_whole_match_and_dot_matches_newlines():
    assert score("regex", "I have 12 apples now", "12 apples", pattern=r"\d+ apples") == Score(1.0, "12 apples", {})
    completion = "<answer>\nline one\nline two\n</answer>"
    assert score("regex", completion, "line one\nline two", pattern=r"<answer>(.*)</answer>").value == 1.0


def test_regex_without_a_reference_scores_whether_it_matches():
    pattern = r"<think>.*</think>"
    assert score("regex", "<think>a\nb</think> 4", None, pattern=pattern) == Score(1.0, "<think>a\nb</think>", {})
    assert score("regex", "4", None, pattern=pattern) == Score(0.0, None, {})


def test_json_reads_the_last_fenced_block_and_ignores_key_order():
    completion = ('First try:\n```json\n{"a": [1, 3]}\n```\nFixed:\n```json\n{"b": 2, "a": [1, 2]}\n```\nDone.')
    assert score("json", completion, {"a": [1, 2], "b": 2}) == Score(1.0, '{"a": [1, 2], "b": 2}', {})
    assert score("json", completion, '{"a": [1, 3]}').value == 0.0


def test_json_finds_a_value_wrapped_in_prose():
    completion = 'See [note 1]. The result is {"x": [1, {"y": null}]} as asked.'
    assert score("json", completion, {"x": [1, {"y": None}]}) == Score(1.0, '{"x": [1, {"y": null}]}', {})
    assert score("json", "no json here", {"x": 1}) == Score(0.0, None, {})


def test_json_tells_true_from_one_but_not_one_from_one_point_zero():
    assert score("json", '{"ok": true, "n": 1.0}', {"ok": 1, "n": 1}).value == 0.0
    assert score("json", '{"ok": true, "n": 1.0}', {"ok": True, "n": 1}).value == 1.0
    assert score("json", '{"ok": true, "n": 1.0}', '{"n": 1, "ok": true}').value == 1.0  # reference as JSON text
    assert score("json", "[1, 2]", [1, 2, 3]).value == 0.0


def test_json_reference_that_is_not_json_text_is_a_json_string():
    assert score("json", '"hello"', "hello") == Score(1.0, '"hello"', {})
    assert score("json", "72", "72").value == 1.0  # "72" parses: the number 72
    assert score("json", '"72"', "72").value == 0.0  # the string "72" is not the number


WEATHER_PARIS = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
PARIS_DUMP = '[{"arguments": {"city": "Paris", "unit": "c"}, "name": "get_weather"}]'
PARIS_ARGS_TEXT = '{"city": "Paris", "unit": "c"}'  # OpenAI sends arguments as a JSON string


@pytest.mark.parametrize("completion", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", "city": "Paris"}}\n</tool_call>',
    "<tool_call>\n" + json.dumps({"name": "get_weather", "arguments": PARIS_ARGS_TEXT}) + "\n</tool_call>",
    json.dumps({"type": "function", "function": {"name": "get_weather", "arguments": PARIS_ARGS_TEXT}}),
    'Calling: {"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}',
    '[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}]',
])
def test_tool_call_reads_each_accepted_shape(completion):
    assert score("tool_call", completion, WEATHER_PARIS) == Score(1.0, PARIS_DUMP, {"name_match": 1.0})


@pytest.mark.parametrize("reference", [
    json.dumps(WEATHER_PARIS),
    [WEATHER_PARIS],
    {"type": "function", "function": {"name": "get_weather", "arguments": PARIS_ARGS_TEXT}},
    {"name": "get_weather", "parameters": {"unit": "c", "city": "Paris"}},
])
def test_tool_call_reads_the_reference_in_each_shape(reference):
    completion = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    assert score("tool_call", completion, reference) == Score(1.0, PARIS_DUMP, {"name_match": 1.0})


def test_tool_call_with_a_wrong_argument_scores_zero_but_matches_the_name():
    completion = '<tool_call>{"name": "get_weather", "arguments": {"city": "London", "unit": "c"}}</tool_call>'
    result = score("tool_call", completion, WEATHER_PARIS)
    assert (result.value, result.detail) == (0.0, {"name_match": 1.0})
    wrong_name = '<tool_call>{"name": "get_time", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    assert score("tool_call", wrong_name, WEATHER_PARIS).detail == {"name_match": 0.0}


def test_tool_calls_must_come_in_the_reference_order():
    paris = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    time = '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>'
    reference = [WEATHER_PARIS, {"name": "get_time", "arguments": {"zone": "CET"}}]
    assert score("tool_call", f"{paris}\n{time}", reference).value == 1.0
    swapped = ('[{"arguments": {"zone": "CET"}, "name": "get_time"}, '
               '{"arguments": {"city": "Paris", "unit": "c"}, "name": "get_weather"}]')
    assert score("tool_call", f"{time}\n{paris}", reference) == Score(0.0, swapped, {"name_match": 0.0})
    # Same function twice with swapped arguments: the names still line up.
    london = paris.replace("Paris", "London")
    twice = [WEATHER_PARIS, {"name": "get_weather", "arguments": {"city": "London", "unit": "c"}}]
    assert score("tool_call", f"{london}{paris}", twice).detail == {"name_match": 1.0}
    assert score("tool_call", f"{london}{paris}", twice).value == 0.0
    assert score("tool_call", paris, twice).value == 0.0  # one call of two


def test_tool_call_that_cannot_be_read_scores_zero():
    for completion in ["I do not know the weather.", '<tool_call>{"name": "get_weather", "arguments": {</tool_call>',
                       '{"name": "get_weather", "arguments": "{city: Paris}"}', "[1, 2]"]:
        assert score("tool_call", completion, WEATHER_PARIS) == Score(0.0, None, {"name_match": 0.0})


def test_rows_without_a_reference_are_skipped_except_by_regex():
    for scorer in SCORERS:
        assert needs_reference(scorer, r"\d" if scorer == "regex" else None) == (scorer != "regex")
        if scorer != "regex":
            assert score(scorer, "#### 72", None) is None
    assert score("regex", "#### 72", None, pattern=r"#### (\d+)") == Score(1.0, "72", {})


def test_check_scorer_accepts_valid_settings():
    for scorer in SCORERS:
        check_scorer(scorer, r"#### (\d+)" if scorer == "regex" else None, "suite.yaml: tasks.gsm8k")


@pytest.mark.parametrize("scorer, pattern, says", [
    ("anwser", None, "did you mean 'answer'?"),
    ("rouge", None, "answer, math, exact, text, regex, json, tool_call"),
    ("regex", "#### (\\d+", "not a regular expression (missing ), unterminated subpattern"),
    ("regex", None, "needs a pattern"),
    ("answer", r"#### (\d+)", "scorer 'answer' takes none"),
])
def test_check_scorer_names_the_place_the_problem_and_the_fix(scorer, pattern, says):
    with pytest.raises(ConfigError) as caught:
        check_scorer(scorer, pattern, "suite.yaml: tasks.gsm8k")
    message = str(caught.value)
    assert message.startswith("suite.yaml: tasks.gsm8k: ")
    assert says in message
    assert "\n  fix: " in message


def test_score_refuses_an_unknown_scorer():
    with pytest.raises(ConfigError, match="did you mean 'json'"):
        score("jsn", "{}", {})
