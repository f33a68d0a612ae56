"""Scorers for `python -m soup.eval`'s generation tasks: one completion against its row's reference.

    score("answer", "... so she sold 72 clips.\\n#### 72", "Natalia sold ... #### 72")  -> Score(1.0, "72", {})
    score("regex", "Final: B", None, pattern=r"Final: ([A-D])")                    -> Score(1.0, "B", {})
    score("tool_call", '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>',
          {"name": "f", "arguments": {"x": 2}})                                     -> value 0.0, name_match 1.0

`answer` and `math` call the RL rewards of the same names (soup/rewards/builtin.py), and
`text` and `json` use the rewards' answer and ```json parsers, so a model evaluated here is
scored exactly as it is rewarded in training. A row the model gets wrong in any way (no
answer, a truncated box, JSON that does not parse) scores 0; only check_scorer raises, on a
mistake in the suite.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from soup.errors import ConfigError
from soup.rewards.answers import extract_answer, normalised_text
from soup.rewards.builtin import _JSON_FENCE, accuracy, math_reward

SCORERS: tuple[str, ...] = ("answer", "math", "exact", "text", "regex", "json", "tool_call")

_NO_JSON = object()  # "no JSON value found"; None cannot say it, since `null` is a JSON value
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)  # Hermes / Qwen chat templates


@dataclass(frozen=True)
class Score:
    """One row's score.

    value: 1.0 (right) or 0.0 (wrong).
    extracted: what was compared from the completion, as text (the final answer, the regex
      capture, the JSON re-dumped with sorted keys, the tool calls as JSON); None when
      nothing could be extracted.
    detail: further per-row figures, e.g. {"name_match": 1.0} for tool_call; {} for most.
    """

    value: float
    extracted: str | None
    detail: dict = field(default_factory=dict)


def check_scorer(scorer: str, pattern: str | None, where: str) -> None:
    """Raise ConfigError for an unknown scorer, a regex scorer without a valid pattern, or a
    pattern given to a scorer that takes none. `where` locates it, e.g. "suite.yaml: tasks.gsm8k"."""
    if scorer not in SCORERS:
        close = difflib.get_close_matches(str(scorer), SCORERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: unknown scorer {scorer!r}{hint}.\n"
                          f"  fix: use one of: {', '.join(SCORERS)}.")
    if scorer != "regex":
        if pattern is not None:
            raise ConfigError(f"{where}: a pattern is set, but scorer {scorer!r} takes none.\n"
                              "  fix: drop the pattern, or use scorer: regex.")
        return
    if pattern is None:
        raise ConfigError(f"{where}: scorer 'regex' needs a pattern.\n"
                          "  fix: set pattern to a Python regex; its first group (else the whole match) "
                          "is compared with the reference, or any match scores 1 when a row has none.")
    try:
        re.compile(pattern)
    except (re.error, TypeError) as exc:
        raise ConfigError(f"{where}: pattern {pattern!r} is not a regular expression ({exc}).\n"
                          "  fix: give a Python regex (re.search, DOTALL) to find in each completion.") from None


def needs_reference(scorer: str, pattern: str | None) -> bool:
    """Whether a row without a reference is skipped: for every scorer but regex, where a match
    alone is the score. Takes the pattern too, as check_scorer does, so callers pass the pair."""
    return scorer != "regex"


def score(scorer: str, completion: str, reference: Any, *, pattern: str | None = None) -> Score | None:
    """`completion` scored against `reference` by `scorer` (one of SCORERS); None when the row
    has no reference and the scorer needs one. Raises only for a bad scorer or pattern."""
    check_scorer(scorer, pattern, "score()")
    if reference is None and needs_reference(scorer, pattern):
        return None
    if scorer == "regex":
        return _regex(completion, reference, pattern)
    return _SCORERS[scorer](completion, reference)


def _answer(completion: str, reference: Any) -> Score:
    value = accuracy([completion], answer=[reference])[0]
    return Score(value, extract_answer(completion), {})


def _math(completion: str, reference: Any) -> Score:
    value = math_reward([completion], answer=[reference])[0]
    return Score(value, extract_answer(completion), {})


def _exact(completion: str, reference: Any) -> Score:
    found = completion.strip()
    return Score(float(found == str(reference).strip()), found, {})


def _text(completion: str, reference: Any) -> Score:
    found = normalised_text(completion)
    return Score(float(found == normalised_text(str(reference))), found, {})


def _regex(completion: str, reference: Any, pattern: str) -> Score:
    match = re.search(pattern, completion, re.DOTALL)
    if match is None:
        return Score(0.0, None, {})
    found = match.group(1) if match.re.groups else match.group(0)
    found = None if found is None else found.strip()  # None: the group did not take part in the match
    if reference is None:
        return Score(1.0, found, {})
    return Score(float(found is not None and found == str(reference).strip()), found, {})


def _json(completion: str, reference: Any) -> Score:
    found = _json_value(completion)
    if found is _NO_JSON:
        return Score(0.0, None, {})
    return Score(float(_same_json(found, _reference_json(reference))), _dump(found), {})


def _tool_call(completion: str, reference: Any) -> Score:
    found = _tool_calls(completion)
    if isinstance(reference, str):
        expected = _tool_calls(reference)
    else:
        expected = _calls(reference if isinstance(reference, (list, tuple)) else [reference])
    if found is None or expected is None:
        return Score(0.0, None if found is None else _dump_calls(found), {"name_match": 0.0})
    names_match = [name for name, _ in found] == [name for name, _ in expected]
    value = names_match and all(_same_json(a, b) for (_, a), (_, b) in zip(found, expected))
    return Score(float(value), _dump_calls(found), {"name_match": float(names_match)})


_SCORERS = {"answer": _answer, "math": _math, "exact": _exact, "text": _text, "json": _json, "tool_call": _tool_call}


def _json_value(text: str) -> Any:
    """The JSON value a completion gives, or _NO_JSON: its last ```json block (found as the
    json_schema reward finds it), else its whole text; when that does not parse, the first
    {...} or [...] in it that does (a model often wraps JSON in a sentence)."""
    blocks = _JSON_FENCE.findall(text)
    source = (blocks[-1] if blocks else text).strip()
    try:
        return json.loads(source)
    except (ValueError, RecursionError):  # RecursionError: pathologically deep nesting
        pass
    decoder = json.JSONDecoder()
    for start, char in enumerate(source):
        if char in "{[":
            try:
                return decoder.raw_decode(source, start)[0]
            except (ValueError, RecursionError):
                continue
    return _NO_JSON


def _reference_json(reference: Any) -> Any:
    """A reference as a JSON value: a string holding JSON is parsed; any other string is itself."""
    if not isinstance(reference, str):
        return reference
    try:
        return json.loads(reference)
    except (ValueError, RecursionError):
        return reference


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values: dict order aside, and 1 == 1.0, but true != 1 (Python's True == 1
    would let a model answer a count with a boolean)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same_json, a, b))
    return type(a) is type(b) and a == b


def _tool_calls(text: str) -> list[tuple[str, Any]] | None:
    """The (name, arguments) calls a text makes, in order, or None when it makes none we can read.

    Calls are its <tool_call>...</tool_call> blocks (Hermes/Qwen; each holds one call or a
    list), else the JSON value it gives (_json_value): one call or a list of calls. Any
    unreadable block or call makes the whole answer unreadable, as a runtime would refuse it.
    """
    blocks = _TOOL_CALL.findall(text)
    values = [_json_value(block) for block in blocks] if blocks else [_json_value(text)]
    if any(value is _NO_JSON for value in values):
        return None
    return _calls([item for value in values for item in (value if isinstance(value, list) else [value])])


def _calls(items: list | tuple) -> list[tuple[str, Any]] | None:
    calls = [_call(item) for item in items]
    return None if any(call is None for call in calls) else calls


def _call(item: Any) -> tuple[str, Any] | None:
    """One call as (name, arguments), from {"name", "arguments"}, {"name", "parameters"} or
    OpenAI's {"type": "function", "function": {"name", "arguments": "<JSON string>"}}."""
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):
        item = item["function"]
    name = item.get("name")
    arguments = item["arguments"] if "arguments" in item else item.get("parameters")
    if arguments is None:  # a call without arguments passes none
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    return (name, arguments) if isinstance(name, str) else None


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _dump_calls(calls: list[tuple[str, Any]]) -> str:
    return _dump([{"name": name, "arguments": arguments} for name, arguments in calls])
