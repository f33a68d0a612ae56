"""The built-in verifiable rewards: accuracy, math, format, code, json_schema.

Each returns 1.0 or 0.0 per completion, and None where the row has nothing to check
against (its answer, tests or schema is None). Registered in soup/rewards/registry.py.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Any

from soup.errors import ConfigError, require
from soup.rewards.answers import extract_answer, parse_number, reference_answer, same_answer
from soup.rewards.arithmetic import safe_value
from soup.rewards.registry import RewardError, RewardOutput, register_reward
from soup.rewards.sandbox import Limits, run_python

# <think>reasoning</think> then a non-empty answer: the format reward of DeepSeek-R1
# (arXiv 2501.12948, section 2.2.2), with the answer left free.
THINK_FORMAT = r"\s*<think>.*?</think>\s*\S.*"


@register_reward("accuracy", columns=("answer",))
def accuracy(completions: list[str], *, answer: list[Any]) -> list[float | None]:
    """1.0 when the completion's final answer equals the row's `answer`, else 0.0.

    Final answer: the last \\boxed{...} (nested braces), else the line after the last '####',
    else the last number (soup/rewards/answers.py). The reference may be a bare answer or a
    full solution ending in '#### N' (GSM8K) or holding a \\boxed{} (MATH). Numbers compare
    exactly as fractions: "1,234" == "1234.0", "3/4" == "0.75", "$5" == "5", "50%" == "50" ==
    "0.5", "-5" != "5"; anything else compares as normalised text. Rename the column with
    answer_column=<name>.
    """
    return [None if ref is None else float(same_answer(extract_answer(text), reference_answer(str(ref))))
            for text, ref in zip(completions, answer)]


@register_reward("math", columns=("answer",))
def math_reward(completions: list[str], *, answer: list[Any]) -> list[float | None]:
    """accuracy, plus equality of arithmetic answers decided exactly without eval.

    "\\boxed{2^3}" matches "8", "\\frac{1}{2}+1" matches "1.5", "(1+2)*3" matches "9": both
    sides are evaluated by a parser that accepts only numbers, + - * / ^ and parentheses
    (soup/rewards/arithmetic.py). When a side is not such an expression (symbols, \\sqrt{2}),
    the answers compare as normalised text, as in accuracy.
    """
    values: list[float | None] = []
    for text, ref in zip(completions, answer):
        if ref is None:
            values.append(None)
            continue
        found, expected = extract_answer(text), reference_answer(str(ref))
        same = same_answer(found, expected)
        if not same and found is not None:
            a, b = _exact_value(found), _exact_value(expected)
            same = a is not None and a == b
        values.append(float(same))
    return values


def _exact_value(answer: str) -> Fraction | None:
    """A plain number (not a percentage) or a bounded arithmetic expression, as an exact value."""
    number = parse_number(answer)
    if number is not None and not number.percent:
        return number.value
    return safe_value(answer)


def _check_pattern(*, pattern: str = THINK_FORMAT) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"reward 'format': pattern {pattern!r} is not a regular expression ({exc}).\n"
                          "  fix: give a Python regex the whole completion must match.") from None


@register_reward("format", params=("pattern",), check=_check_pattern)
def format_reward(completions: list[str], *, pattern: str = THINK_FORMAT) -> list[float]:
    """1.0 when the whole completion matches `pattern` (re.fullmatch, DOTALL), else 0.0.

    Default: <think>...</think> followed by a non-empty answer, DeepSeek-R1's format reward
    (arXiv 2501.12948). Set pattern=... for another layout, e.g. r"<think>.*?</think>\\s*<answer>.*?</answer>".
    """
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(text) is not None) for text in completions]


_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def program_of(completion: str) -> str:
    """The last fenced ```python block of a completion, else the whole completion."""
    blocks = _PYTHON_FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def _check_code(*, timeout_s: float = 5.0, memory_mb: int = 1024, isolation: str = "auto", workers: int = 1) -> None:
    if not timeout_s > 0 or not memory_mb > 0 or isolation not in ("auto", "none") or not workers >= 1:
        raise ConfigError(f"reward 'code': timeout_s={timeout_s}, memory_mb={memory_mb}, isolation={isolation!r}, "
                          f"workers={workers}.\n  fix: timeout_s, memory_mb and workers must be positive; "
                          "isolation is 'auto' or 'none'.")


@register_reward("code", columns=("tests",), params=("timeout_s", "memory_mb", "isolation", "workers"),
                 check=_check_code)
def code(completions: list[str], *, tests: list[Any], timeout_s: float = 5.0, memory_mb: int = 1024,
         isolation: str = "auto", workers: int = 1) -> RewardOutput:
    """1.0 when the completion's Python passes the row's `tests` in the sandbox, else 0.0.

    The program is the last ```python block (else the whole completion), then the tests (a
    string of asserts, or a list of them), run by soup/rewards/sandbox.py: python -I -S,
    rlimits, no network, a private read-only filesystem where the kernel allows it, killed
    at timeout_s. A timeout or crash scores 0; counts of each outcome (passed, failed,
    exited, timeout, crashed) come back for the log as code/<outcome>. `workers` > 1 runs
    that many programs at once (about 65 ms each alone); 1, the default, keeps a program's
    wall clock free of its neighbours, so a reward never depends on what else ran.
    """
    limits = Limits(timeout_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)), memory_mb=memory_mb,
                    isolation=isolation)
    jobs = [(i, program_of(text), "\n".join(t) if isinstance(t, (list, tuple)) else str(t))
            for i, (text, t) in enumerate(zip(completions, tests)) if t is not None]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # each run is a subprocess wait: threads suffice
        results = list(pool.map(lambda job: run_python(job[1], job[2], limits), jobs))
    values: list[float | None] = [None] * len(completions)
    outcomes = Counter({status: 0 for status in ("passed", "failed", "exited", "timeout", "crashed")})
    for (i, _, _), result in zip(jobs, results):
        values[i] = float(result.passed)
        outcomes[result.status] += 1
    return RewardOutput(values, dict(outcomes))


_JSON_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@register_reward("json_schema", columns=("schema",))
def json_schema(completions: list[str], *, schema: list[Any]) -> list[float | None]:
    """1.0 when the completion is JSON valid under the row's `schema`, else 0.0.

    The completion is its last ```json block, else its whole text; `schema` is a JSON Schema
    (an object, or a string holding one), checked with the `jsonschema` package (draft from
    its $schema, 2020-12 by default). jsonschema >= 4.18 resolves no remote $ref, so a schema
    in the data cannot make soup fetch a URL. A row whose schema is itself invalid raises.
    """
    jsonschema = require("jsonschema", extra="rl", wanted_by="task.reward=json_schema")
    validators: dict[str, Any] = {}
    values: list[float | None] = []
    for i, (text, row_schema) in enumerate(zip(completions, schema)):
        if row_schema is None:
            values.append(None)
            continue
        key = row_schema if isinstance(row_schema, str) else json.dumps(row_schema, sort_keys=True)
        if key not in validators:
            validators[key] = _validator(jsonschema, row_schema, i)
        blocks = _JSON_FENCE.findall(text)
        try:
            document = json.loads(blocks[-1] if blocks else text)
        except json.JSONDecodeError:
            values.append(0.0)
            continue
        values.append(float(validators[key].is_valid(document)))
    return values


def _validator(jsonschema, row_schema: Any, index: int):
    try:
        parsed = json.loads(row_schema) if isinstance(row_schema, str) else row_schema
        cls = jsonschema.validators.validator_for(parsed)
        cls.check_schema(parsed)
    except (json.JSONDecodeError, jsonschema.SchemaError, TypeError, AttributeError) as exc:
        raise RewardError(f"reward 'json_schema': the schema of the row of completion {index} is not a valid JSON "
                          f"Schema: {str(exc).splitlines()[0]}\n  fix: correct that row's `schema` column.",
                          reward="json_schema", index=index) from None
    return cls(parsed)
