"""What clients see when the model's tool-call output is cut off or malformed: no invented arguments, finish reasons
as OpenAI and Anthropic clients expect them, every repair logged and counted; and the small request fixes
(`"arguments": null` in history, an unknown `reasoning_effort`)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from .test_app import MODEL, TOK, WEATHER, chat, make, messages, sse

DS = "｜DSML｜"
CALL = (f'\n\n<{DS}tool_calls>\n<{DS}invoke name="get_weather">\n<{DS}parameter name="city" string="true">Paris'
        f'</{DS}parameter>\n</{DS}invoke>\n</{DS}tool_calls>')
TOOL = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}


def _tokens_up_to(text: str, marker: str) -> int:
    """max_tokens that cuts `text` right after the first token containing the end of `marker`."""
    ids, end = TOK.encode(text), text.index(marker) + len(marker)
    for n in range(1, len(ids) + 1):
        if len(TOK.decode(ids[:n])) >= end:
            return n
    raise AssertionError(marker)


NO_THINK = {"thinking": {"type": "disabled"}}


def test_openai_call_cut_by_max_tokens_is_length_with_the_partial_arguments() -> None:
    client, _, _ = make(CALL)
    n = _tokens_up_to(CALL, "Par")
    choice = chat(client, tools=[WEATHER], max_tokens=n, **NO_THINK).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    (call,) = choice["message"]["tool_calls"]
    arguments = call["function"]["arguments"]
    assert arguments.startswith('{"city": "Par') and not arguments.endswith("}")
    with pytest.raises(ValueError):  # an SDK cannot run it with invented arguments
        json.loads(arguments)
    chunks = [c for c in sse(chat(client, tools=[WEATHER], max_tokens=n, stream=True, **NO_THINK))[:-1]
              if c["choices"]]
    streamed = "".join(tc["function"].get("arguments", "") for c in chunks
                       for tc in c["choices"][0]["delta"].get("tool_calls", []))
    assert streamed == arguments and chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_anthropic_call_cut_by_max_tokens_is_max_tokens_with_the_partial_text() -> None:
    client, _, _ = make(CALL)
    n = _tokens_up_to(CALL, "Par")
    body = messages(client, tools=[TOOL], max_tokens=n, thinking={"type": "disabled"}).json()
    assert body["stop_reason"] == "max_tokens"
    (use,) = [b for b in body["content"] if b["type"] == "tool_use"]
    # tool_use.input must be an object: the partial text is kept where unparsable arguments go
    assert set(use["input"]) == {"arguments"} and use["input"]["arguments"].startswith('{"city": "Par')
    r = messages(client, tools=[TOOL], max_tokens=n, thinking={"type": "disabled"}, stream=True)
    datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    partial = "".join(d["delta"]["partial_json"] for d in datas
                      if d["type"] == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert partial == use["input"]["arguments"]
    assert [d for d in datas if d["type"] == "message_delta"][0]["delta"]["stop_reason"] == "max_tokens"


def test_call_cut_by_a_stop_string_is_not_tool_calls() -> None:
    client, _, _ = make(CALL)
    choice = chat(client, tools=[WEATHER], stop=["ris"], **NO_THINK).json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # the call is cut off: nothing for the client to run


def test_repairs_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    bare = CALL.replace(f"\n\n<{DS}tool_calls>\n", "").replace(f"\n</{DS}tool_calls>", "")
    client, _, _ = make("Let me look." + bare)
    with caplog.at_level(logging.WARNING, logger="dsv4.serve"):
        choice = chat(client, tools=[WEATHER], **NO_THINK).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look."
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert any("without a block opener" in r.getMessage() for r in caplog.records)
    metrics = client.get("/metrics").text
    assert 'dsv4_output_parse_problems_total{kind="implicit_block"} 1.0' in metrics
    client, _, _ = make(CALL)
    chat(client, tools=[WEATHER], max_tokens=_tokens_up_to(CALL, "Par"), **NO_THINK)
    metrics = client.get("/metrics").text
    assert 'dsv4_output_parse_problems_total{kind="truncated_call"} 1.0' in metrics
    assert 'kind="no_eos"' not in metrics  # max_tokens is the client's limit: the finish reason says it


def test_history_call_with_null_arguments_is_an_empty_object() -> None:
    seen: list[str] = []
    client, _, _ = make(lambda ids, p: seen.append(TOK.decode(ids)) or "ok")
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": None}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": history, "tools": tools})
    assert r.status_code == 200, r.text
    assert f'<{DS}invoke name="get_time">\n\n</{DS}invoke>' in seen[0]  # rendered as a call without arguments


@pytest.mark.parametrize("effort", ["ultra", "HIGH", ""])
def test_unknown_reasoning_effort_is_accepted_at_the_default(effort: str, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    client, _, _ = make(lambda ids, p: seen.append(TOK.decode(ids)) or "x</think>y")
    with caplog.at_level(logging.WARNING, logger="dsv4.serve"):
        r = chat(client, reasoning_effort=effort)
    assert r.status_code == 200, r.text
    assert seen[0].endswith("<｜Assistant｜><think>") and "Reasoning Effort" not in seen[0]
    assert any("unknown reasoning effort" in rec.getMessage() for rec in caplog.records) == (effort == "ultra")
    r = messages(client, output_config={"effort": effort})
    assert r.status_code == 200, r.text


def test_auto_tool_choice_is_constrained_once_its_grammar_is_compiled() -> None:
    from dsv4.chat.constraint import wait_for_background_compiles

    seen: list[Any] = []
    client, _, core = make(lambda ids, p: seen.append(p.constraint) or "Paris.", real_chat=True)
    tools = [{"type": "function", "function": {"name": "auto_probe", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    core.auto_grammar_wait = 0.0
    first = chat(client, tools=tools, **NO_THINK)
    assert first.status_code == 200  # the grammar is still compiling: this turn runs unconstrained, without waiting
    wait_for_background_compiles(120)
    second = chat(client, tools=tools, **NO_THINK)
    assert second.json()["choices"][0]["message"]["content"] == "Paris."
    assert seen[0] is None and seen[1] is not None
    assert seen[1].is_finished()  # the engine walked "Paris." + EOS through the grammar
    # with a wait (auto_grammar_wait, 2 s by default; generous here for a slow CI machine) a first request gets the
    # grammar of a small tool set, compiled meanwhile
    core.auto_grammar_wait = 60.0
    tools[0]["function"]["name"] = "auto_probe_waits"
    third = chat(client, tools=tools, **NO_THINK)
    assert third.status_code == 200 and seen[2] is not None
