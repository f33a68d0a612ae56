import pytest

from soup.data.formats import detect_format, prompt_and_completion, to_messages, to_text, tools_of
from soup.data.readers import Row
from soup.errors import DataError


def rows_of(*records, path="d.jsonl"):
    return [Row(record=r, path=path, line=i) for i, r in enumerate(records, start=1)]


CHATML_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
ALPACA_ROW = {"instruction": "Add 1 and 2.", "output": "3"}
SHAREGPT_ROW = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
TOOL_ROW = {
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
    "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "-3 C, snow", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is -3 C and snowing."},
    ],
}


@pytest.mark.parametrize("record, expected", [
    (CHATML_ROW, "chatml"),
    (ALPACA_ROW, "alpaca"),
    (SHAREGPT_ROW, "sharegpt"),
    ({"text": "a document"}, "plaintext"),
    (TOOL_ROW, "tool_calling"),
    ({"prompt": "Q:", "completion": " A"}, "prompt_completion"),
])
def test_detect_format_from_the_first_rows_keys(record, expected):
    assert detect_format(rows_of(record)) == expected


def test_plaintext_detection_uses_the_configured_text_field():
    assert detect_format(rows_of({"body": "doc"}), text_field="body") == "plaintext"


def test_a_messages_file_whose_tool_use_starts_later_is_tool_calling():
    later = {"messages": [TOOL_ROW["messages"][0], TOOL_ROW["messages"][1], TOOL_ROW["messages"][3]]}
    assert detect_format(rows_of(CHATML_ROW, CHATML_ROW, later)) == "tool_calling"


def test_undetectable_keys_are_named_with_the_fix():
    with pytest.raises(DataError, match=r"d\.jsonl:1: cannot tell the format from the keys \['prompt', 'reply'\]") as info:
        detect_format(rows_of({"prompt": "a", "reply": "b"}))
    assert "data.format" in str(info.value)


def test_chatml_rows_pass_through():
    assert to_messages(rows_of(CHATML_ROW)[0], "chatml") == CHATML_ROW["messages"]


def test_alpaca_joins_instruction_and_input_and_adds_the_system_prompt():
    row = rows_of({"instruction": "Translate.", "input": "bonjour", "output": "hello", "system": "Be brief."})[0]
    assert to_messages(row, "alpaca") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate.\n\nbonjour"},
        {"role": "assistant", "content": "hello"},
    ]


def test_alpaca_with_an_empty_input_is_just_the_instruction():
    row = rows_of({"instruction": "Add 1 and 2.", "input": "", "output": "3"})[0]
    assert to_messages(row, "alpaca") == [{"role": "user", "content": "Add 1 and 2."},
                                          {"role": "assistant", "content": "3"}]


def test_sharegpt_speakers_map_to_roles_and_function_calls_become_tool_calls():
    row = rows_of({"conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Weather?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
        {"from": "observation", "value": "snow"},
        {"from": "gpt", "value": "Snow."},
    ]})[0]
    assert to_messages(row, "sharegpt") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "snow"},
        {"role": "assistant", "content": "Snow."},
    ]


def test_tool_calling_parses_string_arguments_and_keeps_the_tool_call_id():
    row = rows_of(TOOL_ROW)[0]
    messages = to_messages(row, "tool_calling")
    assert messages[1] == {"role": "assistant", "content": "",
                           "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}
    assert messages[2] == {"role": "tool", "content": "-3 C, snow", "tool_call_id": "c1"}
    assert tools_of(row, "tool_calling") == TOOL_ROW["tools"]


def test_plaintext_gives_the_text_field():
    assert to_text(rows_of({"body": "doc"})[0], "body") == "doc"


def test_chatml_format_refuses_tool_calls_and_points_at_tool_calling():
    with pytest.raises(DataError, match=r"(?s)d\.jsonl:1: messages\[1\] is a tool call .* data\.format=tool_calling"):
        to_messages(rows_of(TOOL_ROW)[0], "chatml")


def test_row_missing_a_field_names_the_field_and_the_line():
    rows = rows_of(ALPACA_ROW, {"instruction": "Add 2 and 2."})
    with pytest.raises(DataError, match=r"(?s)d\.jsonl:2: the row has no field 'output', which format alpaca needs") as info:
        to_messages(rows[1], "alpaca")
    assert info.value.line == 2


def test_a_row_in_another_format_names_the_line_the_field_and_data_format():
    rows = rows_of(CHATML_ROW, ALPACA_ROW)
    fmt = detect_format(rows)
    to_messages(rows[0], fmt)
    with pytest.raises(DataError, match=r"(?s)d\.jsonl:2: the row has no field 'messages'.*looks like alpaca") as info:
        to_messages(rows[1], fmt)
    assert "set data.format" in str(info.value)


def test_content_that_is_not_a_string_names_the_message_and_line():
    bad = {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=r"d\.jsonl:1: messages\[0\]\.content is a list, not a string"):
        to_messages(rows_of(bad)[0], "chatml")


def test_unknown_role_is_refused():
    bad = {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    with pytest.raises(DataError, match=r"messages\[0\]\.role is 'human'"):
        to_messages(rows_of(bad)[0], "chatml")


def test_unknown_sharegpt_speaker_is_refused():
    bad = {"conversations": [{"from": "bot", "value": "hi"}]}
    with pytest.raises(DataError, match=r"conversations\[0\]\.from is 'bot'"):
        to_messages(rows_of(bad)[0], "sharegpt")


def test_a_conversation_without_an_assistant_message_is_refused():
    bad = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match=r"d\.jsonl:1: the conversation has no assistant message"):
        to_messages(rows_of(bad)[0], "chatml")


def test_empty_messages_list_is_refused():
    with pytest.raises(DataError, match=r"field 'messages' is an empty list"):
        to_messages(rows_of({"messages": []})[0], "chatml")


def test_tool_call_with_unparseable_arguments_is_refused():
    bad = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "",
            "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]}
    with pytest.raises(DataError, match=r"tool_calls\[0\]\.arguments is not valid JSON"):
        to_messages(rows_of(bad)[0], "tool_calling")


def test_item_rows_are_located_as_items():
    row = Row(record={"instruction": "x"}, path="d.json", line=4, unit="item")
    with pytest.raises(DataError, match=r"d\.json: item 4: the row has no field 'output'"):
        to_messages(row, "alpaca")


@pytest.mark.parametrize("record, task", [({"prompt": "Q", "chosen": "a", "rejected": "b"}, "task=dpo"),
                                          ({"prompt": "Q", "completion": "a", "label": True}, "task=kto")])
def test_preference_rows_given_to_sft_name_the_task_that_reads_them(record, task):
    with pytest.raises(DataError, match="these are preference rows") as info:
        detect_format(rows_of(record))
    assert task in str(info.value)


def test_prompt_completion_rows_and_preference_rows_read_as_their_chosen_reply():
    assert prompt_and_completion(rows_of({"prompt": "Q:", "completion": " A"})[0]) == ("Q:", " A")
    assert prompt_and_completion(rows_of({"prompt": "Q:", "chosen": " yes", "rejected": " no"})[0]) == ("Q:", " yes")


@pytest.mark.parametrize("record, says", [
    ({"prompt": "Q:", "completion": ["a"]}, "field 'completion' must be a string"),
    ({"prompt": "Q:", "completion": ""}, "field 'completion' is empty"),
    ({"prompt": "Q:"}, "completion"),
])
def test_a_bad_prompt_completion_row_names_its_line(record, says):
    with pytest.raises(DataError, match="d.jsonl:2") as info:
        prompt_and_completion(rows_of({"prompt": "ok", "completion": "ok"}, record)[1])
    assert says in str(info.value)
