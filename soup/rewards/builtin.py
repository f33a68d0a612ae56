"""The built-in rewards: accuracy, format, math, code, json_schema.

Each returns 1.0 or 0.0 per completion (None where a row has nothing to check).
"""

from __future__ import annotations

import json
import re
from collections import Counter

from soup.errors import require
from soup.rewards.answers import extract_answer, normalised_text, reference_answer, safe_value, to_number
from soup.rewards.registry import register_reward
from soup.rewards.sandbox import Limits, run_python

# <think>reasoning</think> then a non-empty answer (DeepSeek-R1's format reward, arXiv 2501.12948).
THINK_FORMAT = r"^\s*<think>.*?</think>\s*\S.*$"
# How the sandboxed programs of the latest `code` call ended: passed / failed / timeout / killed / error.
SANDBOX_OUTCOMES: Counter = Counter()


@register_reward("accuracy", columns=("answer",))
def accuracy(completions: list[str], *, answer: list[str], **_) -> list[float | None]:
    """1 when the completion's final answer (\\boxed{}, #### or the last number) equals the row's `answer`.

    Numbers compare exactly as fractions: "1,234" == "1234.0", "3/4" == "0.75", "50%" == "0.5",
    "$5" == "5"; other answers compare as normalised text."""
    return [None if ref is None else float(_same_answer(extract_answer(text), reference_answer(str(ref))))
            for text, ref in zip(completions, answer)]


def _same_answer(found: str | None, expected: str) -> bool:
    if found is None:
        return False
    a, b = to_number(found), to_number(expected)
    if a is not None and b is not None:
        return a == b
    return normalised_text(found) == normalised_text(expected)


@register_reward("math", columns=("answer",))
def math_reward(completions: list[str], *, answer: list[str], **_) -> list[float | None]:
    """accuracy, plus symbolic equality of arithmetic answers ("2^3" == "8", "\\frac{1}{2}+1" == "1.5"),
    decided by a parser that evaluates only numbers and + - * / ^ (never eval)."""
    values = []
    for text, ref in zip(completions, answer):
        if ref is None:
            values.append(None)
            continue
        found, expected = extract_answer(text), reference_answer(str(ref))
        same = _same_answer(found, expected)
        if not same and found is not None:
            a = to_number(found) or safe_value(found)
            b = to_number(expected) or safe_value(expected)
            same = a is not None and b is not None and a == b
        values.append(float(same))
    return values


@register_reward("format")
def format_reward(completions: list[str], *, format_pattern: str = THINK_FORMAT, **_) -> list[float]:
    """1 when the completion is `<think>...</think>` followed by an answer (regex: task.format_pattern)."""
    pattern = re.compile(format_pattern, re.DOTALL)
    return [float(bool(pattern.match(text))) for text in completions]


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def program_of(text: str) -> str:
    """The last fenced ```python block of a completion, else the whole text."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


@register_reward("code", columns=("tests",))
def code(completions: list[str], *, tests: list[str], **_) -> list[float | None]:
    """1 when the completion's Python passes the row's `tests` (asserts) in the sandbox
    (soup/rewards/sandbox.py); a timeout, crash or limit scores 0 and is counted."""
    SANDBOX_OUTCOMES.clear()
    values = []
    for text, row_tests in zip(completions, tests):
        if row_tests is None:
            values.append(None)
            continue
        result = run_python(program_of(text) + "\n\n" + str(row_tests) + "\n", Limits())
        SANDBOX_OUTCOMES[result.status] += 1
        values.append(float(result.passed))
    return values


_JSON_FENCE = re.compile(r"```(?:json)?\s*\n(.*?)```", re.DOTALL)


@register_reward("json_schema", columns=("schema",))
def json_schema(completions: list[str], *, schema: list, **_) -> list[float | None]:
    """1 when the completion (or its last ```json block) is JSON valid under the row's `schema`."""
    jsonschema = require("jsonschema", extra="rl", wanted_by="task.reward=json_schema")
    values = []
    for text, row_schema in zip(completions, schema):
        if row_schema is None:
            values.append(None)
            continue
        blocks = _JSON_FENCE.findall(text)
        try:
            document = json.loads(blocks[-1] if blocks else text)
            jsonschema.validate(document, json.loads(row_schema) if isinstance(row_schema, str) else row_schema)
            values.append(1.0)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            values.append(0.0)
    return values
