"""The Responses API against the scripted engine, through the official openai SDK (its `responses.create` /
`responses.stream` parse every event and check item identities): input items -> the V4 prompt (compared with the
encoder's own rendering), output items, the event sequence, tool calls with namespaces, the reasoning round trip,
stored responses, and Codex CLI's real request body."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from dsv4.chat.encoding import encode_messages
from dsv4.serve.responses import open_reasoning, seal_reasoning

from .test_app import DSML_CALL, MODEL, TOK, make

CLIENTS = Path(__file__).parent / "clients"  # real request bodies, copied from the clients


def sdk(client: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="k", http_client=client, max_retries=0)


def recording(script: str) -> tuple[Any, list[str]]:
    prompts: list[str] = []

    def fn(ids: list[int], params: Any) -> str:
        prompts.append(TOK.decode(ids))
        return script

    return fn, prompts


def events(resp: Any) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in resp.text.splitlines() if line.startswith("data: ")]


def test_text_turn_streamed_and_not_through_the_sdk() -> None:
    fn, prompts = recording("Because.</think>Paris.")
    client, engine, _ = make(fn)
    oai = sdk(client)
    r = oai.responses.create(model=MODEL, input="Capital of France?", instructions="Be brief.")
    assert r.status == "completed" and r.output_text == "Paris."
    assert [o.type for o in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == "Because." and r.output[0].summary == []
    assert r.output[0].encrypted_content is None  # only with include=["reasoning.encrypted_content"]
    expected = encode_messages([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Capital of France?"}], thinking_mode="thinking")
    assert prompts[-1] == expected
    completion = len(TOK.encode("Because.</think>Paris.")) + 1
    assert r.usage.input_tokens == len(TOK.encode(expected)) and r.usage.output_tokens == completion
    assert r.usage.input_tokens_details.cached_tokens == 3
    assert r.usage.output_tokens_details.reasoning_tokens == len(TOK.encode("Because."))

    with oai.responses.stream(model=MODEL, input="Capital of France?", instructions="Be brief.") as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_response()
    assert final.output_text == "Paris." and final.usage.output_tokens == completion
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.reasoning_text.delta"]
    assert "response.output_text.delta" in kinds and kinds.count("response.output_item.done") == 2
    seqs = [e["sequence_number"] for e in events(client.post("/v1/responses", json={
        "model": MODEL, "input": "Capital of France?", "stream": True}))]
    assert seqs == list(range(len(seqs)))
    assert engine.live == set() and engine.aborted == []


def test_thinking_off_with_effort_none_and_max_output_tokens_incomplete() -> None:
    fn, prompts = recording("Paris is the capital.")
    client, _, _ = make(fn)
    oai = sdk(client)
    r = oai.responses.create(model=MODEL, input="Capital?", reasoning={"effort": "none"})
    assert prompts[-1].endswith("<｜Assistant｜></think>") and r.output_text == "Paris is the capital."
    r = oai.responses.create(model=MODEL, input="Capital?", reasoning={"effort": "none"}, max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2


WEATHER = {"type": "function", "name": "get_weather", "description": "Weather.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}
NS_CALL = DSML_CALL.replace('name="get_weather"', 'name="geo.get_weather"')


def test_function_call_items_stream_and_round_trip_with_reasoning() -> None:
    fn, prompts = recording(DSML_CALL)
    client, _, _ = make(fn)
    oai = sdk(client)
    tools = [WEATHER, {"type": "web_search", "external_web_access": False}]
    r = oai.responses.create(model=MODEL, input="Weather in Paris?", tools=tools,
                             include=["reasoning.encrypted_content"], store=False)
    assert [o.type for o in r.output] == ["reasoning", "function_call"]
    call = r.output[1]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.namespace is None
    assert json.loads(call.arguments) == {"city": "Paris", "days": 3}
    sealed = r.output[0].encrypted_content
    assert open_reasoning(sealed, "x") == "Need the weather."
    # the hosted web_search tool is dropped: only the function reaches the prompt
    assert '"name": "get_weather"' in prompts[-1] and "web_search" not in prompts[-1]

    with oai.responses.stream(model=MODEL, input="Weather in Paris?", tools=[WEATHER]) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert json.loads(final.output[1].arguments) == {"city": "Paris", "days": 3}

    # the client sends everything back, store=false style: reasoning only as its opaque value
    history = [{"type": "message", "role": "developer", "content": "Use tools."},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
               {"type": "reasoning", "id": r.output[0].id, "summary": [], "encrypted_content": sealed},
               {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    oai.responses.create(model=MODEL, input=history, tools=[WEATHER], store=False)
    expected = encode_messages([
        {"role": "system", "content": "Use tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the weather.",
         "tool_calls": [{"id": call.call_id, "type": "function",
                         "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}],
        thinking_mode="thinking", tools=[{"type": "function", "function": {
            "name": "get_weather", "description": "Weather.", "parameters": WEATHER["parameters"]}}])
    assert prompts[-1] == expected


def test_namespace_tools_are_flattened_and_come_back_with_their_namespace() -> None:
    fn, prompts = recording(NS_CALL)
    client, _, _ = make(fn)
    ns = {"type": "namespace", "name": "geo", "description": "Geography tools.",
          "tools": [{k: v for k, v in WEATHER.items()}]}
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Weather?", "tools": [ns]}).json()
    call = r["output"][1]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["namespace"] == "geo"
    assert '"name": "geo.get_weather"' in prompts[-1] and "(geo: Geography tools.) Weather." in prompts[-1]
    # passed back with its namespace, the call renders under the flattened name
    r2 = client.post("/v1/responses", json={"model": MODEL, "tools": [ns], "input": [
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "namespace": "geo", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"}]})
    assert r2.status_code == 200, r2.text
    assert 'invoke name="geo.get_weather"' in prompts[-1]


def test_custom_tool_call() -> None:
    script = DSML_CALL.replace('name="get_weather"', 'name="apply_patch"').replace(
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n',
        '<｜DSML｜parameter name="input" string="true">*** Begin Patch</｜DSML｜parameter>\n')
    client, _, _ = make(script)
    tool = {"type": "custom", "name": "apply_patch", "description": "Edit files."}
    r = client.post("/v1/responses", json={"model": MODEL, "input": "Patch it", "tools": [tool]}).json()
    call = r["output"][1]
    assert call == {"id": call["id"], "type": "custom_tool_call", "call_id": call["call_id"], "name": "apply_patch",
                    "input": "*** Begin Patch", "status": "completed"}
    evs = events(client.post("/v1/responses", json={"model": MODEL, "input": "Patch it", "tools": [tool],
                                                    "stream": True}))
    assert [e["input"] for e in evs if e["type"] == "response.custom_tool_call_input.done"] == ["*** Begin Patch"]


def test_stored_responses_previous_response_id_get_delete() -> None:
    fn, prompts = recording("Because.</think>Paris.")
    client, _, _ = make(fn)
    oai = sdk(client)
    first = oai.responses.create(model=MODEL, input="Capital of France?")
    second = oai.responses.create(model=MODEL, input="And of Peru?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    expected = encode_messages([{"role": "user", "content": "Capital of France?"},
                                {"role": "assistant", "content": "Paris.", "reasoning_content": "Because."},
                                {"role": "user", "content": "And of Peru?"}], thinking_mode="thinking")
    assert prompts[-1] == expected
    assert oai.responses.retrieve(first.id).output_text == "Paris."
    oai.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(first.id)
    unstored = oai.responses.create(model=MODEL, input="Hi", store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as e:
        oai.responses.create(model=MODEL, input="x", previous_response_id=unstored.id)
    assert "store=false" in e.value.message


def test_json_schema_text_format_reaches_the_prompt() -> None:
    fn, prompts = recording('{"city": "Paris"}')
    client, _, _ = make(fn)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = client.post("/v1/responses", json={"model": MODEL, "input": "City?", "reasoning": {"effort": "none"},
                                           "text": {"format": {"type": "json_schema", "name": "c",
                                                               "schema": schema}}})
    assert r.status_code == 200, r.text
    assert r.json()["text"]["format"]["type"] == "json_schema"
    assert prompts[-1] == encode_messages([{"role": "user", "content": "City?"}], response_format=schema)


@pytest.mark.parametrize("body, needle", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input_image"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "web_search"}}, "hosted tool"),
    ({"input": "x", "tool_choice": "required"}, "needs function tools"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAAA"}, {"role": "user", "content": "x"}]},
     "not produced by this server"),
    ({"input": [{"type": "computer_call", "call_id": "c"}, {"role": "user", "content": "x"}]}, "computer_call"),
    ({"input": "x", "background": True}, "background"),
])
def test_bad_requests_are_400_saying_what_to_do(body: dict[str, Any], needle: str) -> None:
    client, _, _ = make()
    r = client.post("/v1/responses", json={"model": MODEL, **body})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_codex_cli_request_body_replays() -> None:
    """Codex 0.171's first request of a session (developer messages, namespace tools, web_search, store=false,
    include encrypted reasoning, streaming): the events Codex reads, in order, with the items it needs."""
    body = json.loads((CLIENTS / "codex-0.171.0-responses.json").read_text())
    fn, prompts = recording(NS_CALL.replace("geo.get_weather", "multi_agent_v1.wait_agent").replace(
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n', ""))
    client, _, _ = make(fn, max_model_len=65536)
    r = client.post("/v1/responses", json={**body, "model": MODEL})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    evs = events(r)
    kinds = [e["type"] for e in evs]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    done = [e["item"] for e in evs if e["type"] == "response.output_item.done"]
    assert [d["type"] for d in done] == ["reasoning", "function_call"]
    assert done[0]["encrypted_content"].startswith("dsv4r1.")
    assert done[1]["name"] == "wait_agent" and done[1]["namespace"] == "multi_agent_v1"
    assert evs[-1]["response"]["usage"]["input_tokens"] > 5000
    # the two developer messages are one system prompt ahead of the tools; the namespace's tools are flattened
    prompt = prompts[-1]
    assert prompt.startswith("<｜begin▁of▁sentence｜>You are a coding agent running in the Codex CLI")
    assert '"name": "multi_agent_v1.wait_agent"' in prompt and '"name": "exec_command"' in prompt
    assert "web_search" not in prompt.split("### Available Tool Schemas")[1]
    assert prompt.endswith("<｜Assistant｜><think>")
    assert client.get(f"/v1/responses/{evs[-1]['response']['id']}").status_code == 404  # store=false


def test_opaque_reasoning_round_trips_any_text() -> None:
    for text in ["", "plain", "ünïcødé 🚀\n</think>", "x" * 10000]:
        assert open_reasoning(seal_reasoning(text), "w") == text


@pytest.mark.parametrize("path, body, opening, ping", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, b'"role":"assistant"',
     b": keep-alive\n\n"),
    # thinking: the thinking block opens at once, and empty thinking deltas keep it alive (Claude Code's watchdog
    # ignores pings, which the Anthropic SDK drops)
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
     b'"content_block":{"type":"thinking"', b'{"type":"thinking_delta","thinking":""}'),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                      "thinking": {"type": "disabled"}}, b"event: message_start",
     b'event: ping\ndata: {"type": "ping"}\n\n'),
    ("/v1/responses", {"input": "hi"}, b"event: response.created", b": keep-alive\n\n"),
])
def test_streams_start_at_admission_and_ping_while_prefilling(path: str, body: dict[str, Any], opening: bytes,
                                                               ping: bytes) -> None:
    from dsv4.serve.app import create_app
    from dsv4.serve.core import ServingCore

    from .fakes import FakeChat, FakeEngine

    engine = FakeEngine(TOK, lambda ids, p: "Because.</think>Paris.", first_delay=1.0)  # a slow "prefill"
    core = ServingCore(engine, TOK, model_names=[MODEL], max_model_len=4096, chat=FakeChat())
    core.ping_interval = 0.2
    from fastapi.testclient import TestClient

    client = TestClient(create_app(core))
    r = client.post(path, json={"model": MODEL, "stream": True, **body})
    assert r.status_code == 200
    # pings come only after 0.2 s of silence: the opening event, then at least two pings, then the first token
    # means the opening went out at least 0.4 s before the first token
    head = r.content.split(b"Because" if "disabled" not in str(body) else b"Paris", 1)[0]
    assert head.index(opening) < head.index(ping) and head.count(ping) >= 2, head
    if path == "/v1/messages":  # the keep-alives change nothing in the message the SDK puts together
        import anthropic

        claude = anthropic.Anthropic(base_url="http://testserver", api_key="k", http_client=client, max_retries=0)
        with claude.messages.stream(model=MODEL, max_tokens=20, messages=body["messages"],
                                    **({"thinking": body["thinking"]} if "thinking" in body else {})) as s:
            msg = s.get_final_message()
        kinds = [b.type for b in msg.content]
        assert kinds == (["text"] if "thinking" in body else ["thinking", "text"])
        assert msg.content[-1].text == ("Because.Paris." if "thinking" in body else "Paris.")  # chat: no </think>
    assert engine.live == set() and engine.aborted == []


def test_additional_tools_items_join_the_tools() -> None:
    """Codex 0.171 with its own default model sends an `additional_tools` item first (seen running it)."""
    fn, prompts = recording(DSML_CALL)
    client, _, _ = make(fn)
    r = client.post("/v1/responses", json={"model": MODEL, "input": [
        {"type": "additional_tools", "role": "developer", "tools": [WEATHER]},
        {"role": "user", "content": "Weather?"}]})
    assert r.status_code == 200, r.text
    assert r.json()["output"][1]["name"] == "get_weather" and '"name": "get_weather"' in prompts[-1]
