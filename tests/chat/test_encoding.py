"""Chat encoding against the official golden cases and the encoder's documented rules (spec chat-encoding.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4.chat import encode_messages
from dsv4.chat.encoding import REASONING_EFFORT_MAX, TOOLS_TEMPLATE

FIXTURES = Path(__file__).parent / "fixtures"
B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


def _case(n: int) -> list[dict]:
    data = json.loads((FIXTURES / f"test_input_{n}.json").read_text())
    if isinstance(data, dict):  # case 1 keeps its tools beside the messages
        data["messages"][0]["tools"] = data["tools"]
        data = data["messages"]
    return data


@pytest.mark.parametrize(("n", "mode"), [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")])
def test_golden_case_byte_for_byte(n: int, mode: str) -> None:
    gold = (FIXTURES / f"test_output_{n}.txt").read_text()
    assert encode_messages(_case(n), thinking_mode=mode) == gold


def test_golden_inputs_are_not_mutated() -> None:
    messages = _case(1)
    before = json.dumps(messages)
    encode_messages(messages, thinking_mode="thinking")
    assert json.dumps(messages) == before


def test_generation_prompt_per_mode() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert encode_messages(msgs, "chat") == f"{B}S{U}Q{A}</think>"
    assert encode_messages(msgs, "thinking") == f"{B}S{U}Q{A}<think>"
    assert encode_messages(msgs, "thinking", add_default_bos_token=False) == f"S{U}Q{A}<think>"


def test_reasoning_effort_max_prefixes_the_first_message_in_thinking_mode_only() -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert encode_messages(msgs, "thinking", reasoning_effort="max") == f"{B}{REASONING_EFFORT_MAX}S{U}Q{A}<think>"
    assert REASONING_EFFORT_MAX.endswith("unchecked.\n\n")
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == encode_messages(msgs, "thinking")
    assert encode_messages(msgs, "chat", reasoning_effort="max") == encode_messages(msgs, "chat")
    # Without a system message the prompt lands before the first user turn.
    assert encode_messages(msgs[1:], "thinking", reasoning_effort="max") == f"{B}{REASONING_EFFORT_MAX}{U}Q{A}<think>"


def _two_turns(tools: list | None = None) -> list[dict]:
    system = {"role": "system", "content": "S"}
    if tools:
        system["tools"] = tools
    return [
        system,
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "First answer.", "reasoning_content": "First reasoning."},
        {"role": "user", "content": "Two"},
    ]


ECHO = {"type": "function", "function": {"name": "echo", "description": "Echo.", "parameters": {"type": "object"}}}


def test_drop_thinking_and_its_automatic_disabling_with_tools() -> None:
    dropped = encode_messages(_two_turns(), "thinking")
    assert dropped == f"{B}S{U}One{A}</think>First answer.{E}{U}Two{A}<think>"
    kept = encode_messages(_two_turns(), "thinking", drop_thinking=False)
    assert kept == f"{B}S{U}One{A}<think>First reasoning.</think>First answer.{E}{U}Two{A}<think>"
    with_tools = encode_messages(_two_turns([ECHO]), "thinking")
    tools_block = "\n\n" + TOOLS_TEMPLATE.format(
        dsml="｜DSML｜", think_start="<think>", think_end="</think>", schemas=json.dumps(ECHO["function"])
    )
    assert with_tools == (
        f"{B}S{tools_block}{U}One{A}<think>First reasoning.</think>First answer.{E}{U}Two{A}<think>"
    )
    # chat mode never renders reasoning
    assert encode_messages(_two_turns(), "chat") == f"{B}S{U}One{A}</think>First answer.{E}{U}Two{A}</think>"


def test_developer_messages_before_the_last_user_turn_are_dropped() -> None:
    msgs = [
        {"role": "developer", "content": "D1"},
        {"role": "assistant", "content": "a", "reasoning_content": "r"},
        {"role": "user", "content": "Q"},
    ]
    assert encode_messages(msgs, "thinking") == f"{B}a{E}{U}Q{A}<think>"
    assert encode_messages(msgs, "chat") == f"{B}{U}D1{A}</think>a{E}{U}Q{A}</think>"


def test_developer_with_tools_and_response_format() -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    msgs = [{"role": "developer", "content": "D", "response_format": rf}]
    assert encode_messages(msgs, "chat") == (
        f"{B}{U}D\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
        f"{json.dumps(rf)}{A}</think>"
    )
    with pytest.raises(ValueError, match="non-empty content"):
        encode_messages([{"role": "developer", "content": ""}], "chat")


def test_response_format_after_the_tools_block_and_keyword_attachment() -> None:
    rf = {"type": "json_object", "path": "a/b"}
    msgs = [{"role": "system", "content": "S", "response_format": rf}, {"role": "user", "content": "Q"}]
    expected = (
        f'{B}S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n'
        f'{{"type": "json_object", "path": "a/b"}}{U}Q{A}</think>'
    )
    assert encode_messages(msgs, "chat") == expected
    plain = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert encode_messages(plain, "chat", response_format=rf) == expected
    # tools= inserts a system message when there is none
    out = encode_messages([{"role": "user", "content": "Q"}], "chat", tools=[ECHO])
    assert out.startswith(B + "\n\n## Tools\n\n") and out.endswith(f"invoke tool calls.\n{U}Q{A}</think>")


def test_latest_reminder_and_quick_instruction_tasks() -> None:
    msgs = [{"role": "latest_reminder", "content": "2026-01-01"}, {"role": "user", "content": "Q", "task": "query"}]
    assert encode_messages(msgs, "thinking") == f"{B}<｜latest_reminder｜>2026-01-01{U}Q<｜query｜>"
    msgs = [{"role": "user", "content": "Q", "task": "action"}]
    assert encode_messages(msgs, "thinking") == f"{B}{U}Q{A}<think><｜action｜>"
    assert encode_messages(msgs, "chat") == f"{B}{U}Q{A}</think><｜action｜>"
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "task": "title"}]
    assert encode_messages(msgs, "chat") == f"{B}{U}Q{A}</think>A{E}<｜title｜>"
    # the task output turn is rendered without thinking, even in thinking mode
    msgs = [{"role": "user", "content": "Q", "task": "domain"}, {"role": "assistant", "content": "d.com"}]
    assert encode_messages(msgs, "thinking") == f"{B}{U}Q<｜domain｜>d.com{E}"
    with pytest.raises(ValueError, match="unknown task"):
        encode_messages([{"role": "user", "content": "Q", "task": "extracted_url"}], "chat")


def test_tool_results_merge_and_follow_the_call_order() -> None:
    calls = [
        {"id": "call_A", "type": "function", "function": {"name": "alpha", "arguments": '{"n": "1"}'}},
        {"id": "call_B", "type": "function", "function": {"name": "beta", "arguments": '{"n": 2}'}},
    ]
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "reasoning_content": "R", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_B", "content": "B result"},
        {"role": "tool", "tool_call_id": "call_A", "content": [{"type": "text", "text": "A"}, {"type": "image"}]},
        {"role": "user", "content": "And now this."},
    ]
    assert encode_messages(msgs, "thinking") == (
        f"{B}S{U}Q{A}</think>\n\n<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="alpha">\n<｜DSML｜parameter name="n" string="true">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="beta">\n<｜DSML｜parameter name="n" string="false">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        f"</｜DSML｜tool_calls>{E}{U}<tool_result>A\n\n[Unsupported image]</tool_result>\n\n"
        f"<tool_result>B result</tool_result>\n\nAnd now this.{A}<think>"
    )
    with pytest.raises(ValueError, match="merged"):
        from dsv4.chat.encoding import render_message

        render_message(0, [{"role": "tool", "content": "x"}], "chat", True, None)


def test_tool_call_arguments_rendering() -> None:
    args = '{"name": "a/b", "count": 7, "flag": false, "list": [1, "two"], "nested": {"k": -1}, "nothing": null}'
    msgs = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "mixed", "arguments": args}}]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "broken", "arguments": "not json"}}]},
    ]
    out = encode_messages(msgs, "chat")
    p = "<｜DSML｜parameter name="
    assert (
        f'{p}"name" string="true">a/b</｜DSML｜parameter>\n{p}"count" string="false">7</｜DSML｜parameter>\n'
        f'{p}"flag" string="false">false</｜DSML｜parameter>\n{p}"list" string="false">[1, "two"]</｜DSML｜parameter>\n'
        f'{p}"nested" string="false">{{"k": -1}}</｜DSML｜parameter>\n{p}"nothing" string="false">null</｜DSML｜parameter>'
    ) in out
    assert f'{p}"arguments" string="true">not json</｜DSML｜parameter>' in out


def test_context_prefix_is_not_rendered_again() -> None:
    context = [{"role": "system", "content": "S"}, {"role": "user", "content": "One"}]
    rest = [{"role": "assistant", "content": "A1", "reasoning_content": "R1"}, {"role": "user", "content": "Two"}]
    full = encode_messages(context + rest, "thinking", drop_thinking=False)
    head = encode_messages(context, "thinking", drop_thinking=False)
    tail = encode_messages(rest, "thinking", drop_thinking=False, context=context)
    assert full == head + tail
    assert not tail.startswith(B)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"thinking_mode": "reasoning"}, "thinking_mode"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
    ],
)
def test_bad_arguments_say_what_is_wrong(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode_messages([{"role": "user", "content": "Q"}], **kwargs)


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown role"):
        encode_messages([{"role": "robot", "content": "Q"}])


# Outputs of the official encoding_dsv4.py (DeepSeek-V4-Flash @ 60d8d70) for small conversations, as transcribed in
# the public osaurus-ai DeepseekV4ChatEncoder tests ("rendered by running that Python file"); not produced by dsv4.
def _call(call_id: str, name: str, args: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


_DSML_HEAD = f"{A}</think>\n\n<｜DSML｜tool_calls>\n"
_ALPHA = '<｜DSML｜invoke name="alpha">\n<｜DSML｜parameter name="n" string="true">1</｜DSML｜parameter>\n</｜DSML｜invoke>'
_BETA = '<｜DSML｜invoke name="beta">\n<｜DSML｜parameter name="n" string="true">2</｜DSML｜parameter>\n</｜DSML｜invoke>'
OFFICIAL_SMALL_CASES = [
    (
        "tool results follow the call order, not the return order",
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "", "reasoning_content": "R",
             "tool_calls": [_call("call_A", "alpha", '{"n": "1"}'), _call("call_B", "beta", '{"n": "2"}')]},
            {"role": "tool", "tool_call_id": "call_B", "content": "B result"},
            {"role": "tool", "tool_call_id": "call_A", "content": "A result"},
        ],
        f"{B}S{U}Q{_DSML_HEAD}{_ALPHA}\n{_BETA}\n</｜DSML｜tool_calls>{E}"
        f"{U}<tool_result>A result</tool_result>\n\n<tool_result>B result</tool_result>{A}<think>",
    ),
    (
        "a text block follows a tool result after a blank line",
        [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "", "reasoning_content": "R",
             "tool_calls": [_call("call_1", "alpha", '{"n": "1"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": "result"},
            {"role": "user", "content": "And now this."},
        ],
        f"{B}{U}Q{_DSML_HEAD}{_ALPHA}\n</｜DSML｜tool_calls>{E}{U}<tool_result>result</tool_result>\n\nAnd now this.{A}<think>",
    ),
]


@pytest.mark.parametrize(("why", "messages", "expected"), OFFICIAL_SMALL_CASES, ids=[c[0] for c in OFFICIAL_SMALL_CASES])
def test_transcribed_official_outputs(why: str, messages: list[dict], expected: str) -> None:
    assert encode_messages(messages, "thinking") == expected, why
