"""Row formats: detect which one a file uses and normalise rows to chat messages.

    alpaca        {"instruction", "input"?, "output", "system"?}
    sharegpt      {"conversations": [{"from": human|gpt|system|tool|function_call|observation, "value"}]}
    chatml        {"messages": [{"role", "content"}]}
    tool_calling  {"messages": [...], "tools"?: [...]}; assistant messages may carry
                  "tool_calls", and "role": "tool" messages hold the results
    plaintext     {<data.text_field>: "..."}
    prompt_completion
                  {"prompt": "...", "completion": "..."}, or a preference row {"prompt", "chosen", ...}
                  read as its chosen completion (the SFT stage of RLHF); plain text, no chat
                  template: BOS + prompt, then completion + EOS, as the preference tasks read it

Chat formats become a list of {"role", "content", ("tool_calls")} with roles
system/user/assistant/tool, the shape every chat template expects. Every row is
checked, not only the first, and a bad row names its file and line.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from soup.data.readers import Row, row_error

CHAT_FORMATS = ("alpaca", "sharegpt", "chatml", "tool_calling")
FORMATS = CHAT_FORMATS + ("plaintext", "prompt_completion")
ROLES = ("system", "user", "assistant", "tool")

# ShareGPT speaker names -> chat roles. function_call is the assistant calling a
# tool (its value is the call as JSON); observation is the tool's answer.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
}

_SET_FORMAT = "set data.format to the format of this file ({})".format(" | ".join(FORMATS))


def detect_format(rows: list[Row], text_field: str = "text") -> str:
    """The format of a file, from the keys of its first row.

    A `messages` file is tool_calling when any row has a top-level `tools` list, an
    assistant `tool_calls` or a `tool` message, so a file whose first tool call is on
    row 50 is still read as tool_calling.
    """
    first = rows[0]
    fmt = _format_of_keys(first.record, text_field)
    if fmt is None:
        keys = first.record.keys()
        if {"prompt", "chosen", "rejected"} <= keys or {"prompt", "completion", "label"} <= keys:
            paired = "chosen" in keys
            raise row_error(
                first, f"these are preference rows ({{{', '.join(sorted(keys))}}}), which this task does not read",
                fix="train them with task=dpo (or ipo, orpo, simpo, cpo, reward_model), or SFT on the chosen "
                    "completions with data.format=prompt_completion." if paired else
                "train them with task=kto (or bco).",
            )
        raise row_error(
            first,
            f"cannot tell the format from the keys {sorted(first.record)}",
            fix=f"use one of the documented layouts (messages / conversations / instruction+output / "
            f"{text_field}), or {_SET_FORMAT}.",
        )
    if fmt == "chatml" and any(_has_tool_use(row.record) for row in rows):
        return "tool_calling"
    return fmt


def _format_of_keys(record: dict[str, Any], text_field: str) -> Optional[str]:
    if "messages" in record:
        return "chatml"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if text_field in record:
        return "plaintext"
    if {"prompt", "completion"} <= record.keys() and "label" not in record:
        return "prompt_completion"
    return None


def _has_tool_use(record: dict[str, Any]) -> bool:
    if record.get("tools"):
        return True
    messages = record.get("messages")
    if not isinstance(messages, list):
        return False
    return any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool") for m in messages)


def to_messages(row: Row, fmt: str) -> list[dict[str, Any]]:
    """Normalise one row of a chat format to messages with at least one assistant turn.

    Returns [{"role": str, "content": str, ("tool_calls": [{"type": "function",
    "function": {"name": str, "arguments": dict}}])}, ...].
    """
    if fmt == "alpaca":
        messages = _alpaca(row)
    elif fmt == "sharegpt":
        messages = _sharegpt(row)
    elif fmt in ("chatml", "tool_calling"):
        messages = _chatml(row, allow_tools=fmt == "tool_calling")
    elif fmt == "plaintext":
        raise row_error(row, "plaintext rows have no messages", fix="plaintext data trains with task=pretrain.")
    else:
        raise ValueError(f"unknown chat format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise row_error(row, "the conversation has no assistant message, so nothing would be trained",
                        fix="add an assistant reply to the row, or remove the row.")
    return messages


def to_text(row: Row, text_field: str = "text") -> str:
    """The document of one plaintext row (the value of `text_field`, a non-empty string)."""
    value = _field(row, text_field, "plaintext")
    _expect_str(row, value, f"field '{text_field}'")
    if not value.strip():
        raise row_error(row, f"field '{text_field}' is empty", fix="remove the row or fill in the text.")
    return value


def prompt_and_completion(row: Row) -> tuple[str, str]:
    """The prompt and completion strings of a prompt_completion row (`chosen` stands in for a
    missing `completion`)."""
    prompt = _field(row, "prompt", "prompt_completion")
    key = "completion" if "completion" in row.record or "chosen" not in row.record else "chosen"
    completion = _field(row, key, "prompt_completion")
    for value, what in ((prompt, "field 'prompt'"), (completion, f"field '{key}'")):
        if not isinstance(value, str):
            raise row_error(row, f"{what} must be a string in prompt_completion rows, got {type(value).__name__}",
                            fix="write prompt and completion as text; conversations train as chatml (messages).")
    if not completion:
        raise row_error(row, f"field '{key}' is empty, so nothing would be trained", fix="remove the row.")
    return prompt, completion


def tools_of(row: Row, fmt: str) -> Optional[list[dict[str, Any]]]:
    """The row's top-level `tools` list (function schemas for the template), if any."""
    if fmt != "tool_calling" or row.record.get("tools") is None:
        return None
    tools = row.record["tools"]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise row_error(row, "'tools' must be a list of objects (JSON schemas of functions)",
                        fix='write tools as [{"type": "function", "function": {"name": ..., "parameters": {...}}}].')
    return tools


def _alpaca(row: Row) -> list[dict[str, Any]]:
    instruction = _field(row, "instruction", "alpaca")
    output = _field(row, "output", "alpaca")
    _expect_str(row, instruction, "field 'instruction'")
    _expect_str(row, output, "field 'output'")
    messages = []
    system = row.record.get("system")
    if system:
        _expect_str(row, system, "field 'system'")
        messages.append({"role": "system", "content": system})
    extra = row.record.get("input")
    if extra:
        _expect_str(row, extra, "field 'input'")
        # The original Alpaca prompt keeps instruction and input as separate paragraphs.
        instruction = f"{instruction}\n\n{extra}"
    messages.append({"role": "user", "content": instruction})
    messages.append({"role": "assistant", "content": output})
    return messages


def _sharegpt(row: Row) -> list[dict[str, Any]]:
    turns = _field(row, "conversations", "sharegpt")
    _expect_list(row, turns, "field 'conversations'")
    messages = []
    for index, turn in enumerate(turns):
        what = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise row_error(row, f"{what} is a {type(turn).__name__}, not an object",
                            fix='write each turn as {"from": "human", "value": "..."}.')
        speaker = _field(row, "from", "sharegpt", container=turn, what=what)
        value = _field(row, "value", "sharegpt", container=turn, what=what)
        _expect_str(row, value, f"{what}.value")
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise row_error(row, f"{what}.from is {speaker!r}",
                            fix=f"use one of {', '.join(SHAREGPT_ROLES)}.")
        if speaker == "function_call":
            call = _parse_json_value(row, value, f"{what}.value")
            messages.append({"role": "assistant", "content": "", "tool_calls": [_tool_call(row, call, what)]})
        else:
            messages.append({"role": role, "content": value})
    return messages


def _chatml(row: Row, allow_tools: bool) -> list[dict[str, Any]]:
    raw = _field(row, "messages", "tool_calling" if allow_tools else "chatml")
    _expect_list(row, raw, "field 'messages'")
    messages = []
    for index, message in enumerate(raw):
        what = f"messages[{index}]"
        if not isinstance(message, dict):
            raise row_error(row, f"{what} is a {type(message).__name__}, not an object",
                            fix='write each message as {"role": "user", "content": "..."}.')
        role = _field(row, "role", "chatml", container=message, what=what)
        if role not in ROLES:
            raise row_error(row, f"{what}.role is {role!r}", fix=f"use one of {', '.join(ROLES)}.")
        calls = message.get("tool_calls")
        if (calls or role == "tool") and not allow_tools:
            raise row_error(row, f"{what} is a tool call or tool result, which format chatml does not train",
                            fix="set data.format=tool_calling (or auto).")
        content = message.get("content")
        if content is None and calls:
            content = ""  # an assistant turn that only calls a tool
        elif "content" not in message:
            raise row_error(row, f"{what} has no field 'content'", fix='give every message a "content" string.')
        _expect_str(row, content, f"{what}.content")
        out: dict[str, Any] = {"role": role, "content": content}
        if calls:
            if role != "assistant":
                raise row_error(row, f"{what} has tool_calls but role {role!r}",
                                fix="only assistant messages may carry tool_calls.")
            _expect_list(row, calls, f"{what}.tool_calls")
            out["tool_calls"] = [_tool_call(row, call, f"{what}.tool_calls[{i}]") for i, call in enumerate(calls)]
        # Templates use these to pair a result with its call; keep them when given.
        for key in ("name", "tool_call_id"):
            if role == "tool" and key in message:
                out[key] = message[key]
        messages.append(out)
    return messages


def _tool_call(row: Row, call: Any, what: str) -> dict[str, Any]:
    """{"type": "function", "function": {"name", "arguments": dict}} from either the
    OpenAI shape ({"function": {...}}) or a bare {"name", "arguments"}."""
    if not isinstance(call, dict):
        raise row_error(row, f"{what} is a {type(call).__name__}, not an object",
                        fix='write a call as {"name": "...", "arguments": {...}}.')
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise row_error(row, f"{what} has no function name", fix='write a call as {"name": "...", "arguments": {...}}.')
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        # OpenAI exports keep arguments as a JSON string; templates expect an object,
        # and rendering a string would double-escape it.
        arguments = _parse_json_value(row, arguments, f"{what}.arguments")
    if not isinstance(arguments, dict):
        raise row_error(row, f"{what}.arguments is a {type(arguments).__name__}, not an object",
                        fix="write the arguments as a JSON object.")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def _parse_json_value(row: Row, text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise row_error(row, f"{what} is not valid JSON: {exc.msg}",
                        fix="write the tool call as a JSON object.") from exc


def _field(row: Row, key: str, fmt: str, container: Optional[dict] = None, what: Optional[str] = None) -> Any:
    container = row.record if container is None else container
    if key not in container:
        where = f"{what} has" if what else "the row has"
        guessed = _format_of_keys(row.record, "text")
        hint = f" (this row looks like {guessed})" if guessed and guessed != fmt and what is None else ""
        raise row_error(row, f"{where} no field '{key}', which format {fmt} needs{hint}",
                        fix=f"add '{key}' to the row, or {_SET_FORMAT}.")
    return container[key]


def _expect_str(row: Row, value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise row_error(row, f"{what} is a {type(value).__name__}, not a string", fix=f"make {what} a string.")


def _expect_list(row: Row, value: Any, what: str) -> None:
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        raise row_error(row, f"{what} is {kind}, not a non-empty list", fix=f"make {what} a list of objects.")

