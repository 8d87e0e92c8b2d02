"""HTTP-layer tests against a scripted engine (tests/serve/fakes.py): request translation, response and SSE shapes,
errors in each API's format, auth, overload, metrics. The real model and server process are in test_server.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from dsv4.chat import load_tokenizer
from dsv4.chat.encoding import encode_messages
from dsv4.serve.app import create_app
from dsv4.serve.core import ServingCore

from .fakes import FakeChat, FakeEngine

TOK = load_tokenizer(None)
MODEL = "tiny"


def make(script: Any = "Because.</think>Paris.", *, api_key: str | None = None, max_model_len: int = 4096,
         max_concurrency: int = 8, real_chat: bool = False) -> tuple[TestClient, FakeEngine, ServingCore]:
    fn = script if callable(script) else (lambda ids, params: script)
    engine = FakeEngine(TOK, fn)
    core = ServingCore(engine, TOK, model_names=[MODEL], max_model_len=max_model_len,
                       max_concurrency=max_concurrency, chat=None if real_chat else FakeChat())
    return TestClient(create_app(core, api_key=api_key), raise_server_exceptions=False), engine, core


def sse(resp: Any) -> list[Any]:
    out = []
    for line in resp.text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat(client: TestClient, **kw: Any) -> Any:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], **kw}
    return client.post("/v1/chat/completions", json=body)


# ---- OpenAI chat --------------------------------------------------------------------------------------------------
def test_chat_thinking_splits_reasoning_and_counts_tokens() -> None:
    client, engine, _ = make()
    r = chat(client)
    assert r.status_code == 200, r.text
    body = r.json()
    msg = body["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "Paris.", "reasoning_content": "Because."}
    assert body["choices"][0]["finish_reason"] == "stop"
    prompt = encode_messages([{"role": "user", "content": "Capital of France?"}], thinking_mode="thinking")
    completion = len(TOK.encode("Because.</think>Paris.")) + 1  # + EOS
    assert body["usage"] == {"prompt_tokens": len(TOK.encode(prompt)), "completion_tokens": completion,
                             "total_tokens": len(TOK.encode(prompt)) + completion,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    assert engine.live == set() and engine.aborted == []


@pytest.mark.parametrize("extra", [{"thinking": {"type": "disabled"}}, {"reasoning_effort": "none"}])
def test_chat_thinking_off_uses_chat_prompt(extra: dict[str, Any]) -> None:
    seen: list[str] = []
    client, _, _ = make(lambda ids, p: seen.append(TOK.decode(ids)) or "Paris.")
    r = chat(client, **extra)
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert seen[0].endswith("<｜Assistant｜></think>")


def test_reasoning_effort_max_reaches_prompt() -> None:
    seen: list[str] = []
    client, _, _ = make(lambda ids, p: seen.append(TOK.decode(ids)) or "x</think>y")
    assert chat(client, reasoning_effort="xhigh").status_code == 200
    assert chat(client, reasoning_effort="low").status_code == 200
    assert "Reasoning Effort: Absolute maximum" in seen[0] and "Reasoning Effort" not in seen[1]


def test_chat_stream_chunks_and_usage() -> None:
    client, engine, _ = make()
    r = chat(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c["choices"])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert (reasoning, content) == ("Because.", "Paris.")
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert engine.live == set()


def test_stop_max_tokens_n_and_logprobs() -> None:
    client, _, _ = make("hello STOP world")
    r = chat(client, thinking={"type": "disabled"}, stop="STOP", n=2)
    body = r.json()
    assert [c["message"]["content"] for c in body["choices"]] == ["hello ", "hello "]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]
    r = chat(client, thinking={"type": "disabled"}, max_tokens=2, logprobs=True, top_logprobs=1)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    lps = choice["logprobs"]["content"]
    assert len(lps) == 2 and lps[0]["logprob"] == -0.5 and lps[0]["token"] == TOK.decode(TOK.encode("hello")[:1])


def test_openai_history_translation_matches_encoder() -> None:
    seen: list[list[int]] = []
    client, _, core = make(lambda ids, p: seen.append(ids) or "ok")
    params = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": params}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
         "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"t\": 21}"},
    ]
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "tools": tools})
    assert r.status_code == 200, r.text
    expected = encode_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
          "tool_calls": [call]},
         {"role": "tool", "tool_call_id": "c1", "content": "{\"t\": 21}"}],
        thinking_mode="thinking", tools=tools)
    assert TOK.decode(seen[0]) == expected
    assert "<tool_result>" in expected and "Need the tool.</think>" in expected


# ---- Anthropic ----------------------------------------------------------------------------------------------------
def messages(client: TestClient, **kw: Any) -> Any:
    body = {"model": MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": "Capital of France?"}], **kw}
    return client.post("/v1/messages", json=body)


def test_messages_blocks_and_usage() -> None:
    client, _, _ = make()
    body = messages(client, thinking={"type": "enabled", "budget_tokens": 16}).json()
    assert body["type"] == "message" and body["role"] == "assistant" and body["id"].startswith("msg_")
    assert body["content"] == [{"type": "thinking", "thinking": "Because.", "signature": ""},
                               {"type": "text", "text": "Paris."}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    u = body["usage"]
    assert u["cache_read_input_tokens"] == 3 and u["input_tokens"] + 3 == len(TOK.encode(encode_messages(
        [{"role": "user", "content": "Capital of France?"}], thinking_mode="thinking")))


def test_messages_stream_event_sequence() -> None:
    client, _, _ = make()
    r = messages(client, stream=True)
    names = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert [d["type"] for d in datas] == names
    starts = [d["content_block"]["type"] for d in datas if d["type"] == "content_block_start"]
    assert starts == ["thinking", "text"]
    thinking = "".join(d["delta"].get("thinking", "") for d in datas if d["type"] == "content_block_delta")
    text = "".join(d["delta"].get("text", "") for d in datas if d["type"] == "content_block_delta")
    assert (thinking, text) == ("Because.", "Paris.")
    # every started block is stopped before the next starts, in index order
    opened = [d["index"] for d in datas if d["type"] == "content_block_start"]
    closed = [d["index"] for d in datas if d["type"] == "content_block_stop"]
    assert opened == closed == [0, 1]
    assert datas[-2]["delta"]["stop_reason"] == "end_turn"


def test_messages_stop_sequence_and_max_tokens() -> None:
    client, _, _ = make("hello STOP world")
    body = messages(client, thinking={"type": "disabled"}, stop_sequences=["STOP"]).json()
    assert body["content"] == [{"type": "text", "text": "hello "}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "STOP")
    body = messages(client, thinking={"type": "disabled"}, max_tokens=1).json()
    assert body["stop_reason"] == "max_tokens"


def test_anthropic_translation_matches_encoder_and_count_tokens() -> None:
    seen: list[list[int]] = []
    client, _, _ = make(lambda ids, p: seen.append(ids) or "ok")
    req = {
        "model": MODEL, "max_tokens": 32, "system": [{"type": "text", "text": "Be brief."}],
        "tools": [{"name": "get_weather", "description": "Weather",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Need the tool.", "signature": "x"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"},
                                         {"type": "text", "text": "And tomorrow?"}]},
        ],
    }
    assert client.post("/v1/messages", json=req).status_code == 200
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": req["tools"][0]["input_schema"],
                                               "description": "Weather"}}]
    expected = encode_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
          "tool_calls": [{"id": "toolu_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
         {"role": "tool", "tool_call_id": "toolu_1", "content": "21C"}, {"role": "user", "content": "And tomorrow?"}],
        thinking_mode="thinking", tools=tools)
    assert TOK.decode(seen[0]) == expected
    del req["max_tokens"]
    r = client.post("/v1/messages/count_tokens", json=req)
    assert r.json() == {"input_tokens": len(seen[0])}


# ---- errors -------------------------------------------------------------------------------------------------------
def test_openai_errors() -> None:
    client, _, _ = make(max_model_len=64)
    r = chat(client, model="gpt-9")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = chat(client, temperature="hot")
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = chat(client, max_tokens=60)
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "maximum context length is 64 tokens" in msg and "60 in the completion" in msg
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 500}]})
    assert r.status_code == 400 and "64" in r.json()["error"]["message"]
    r = chat(client, tool_choice="required")
    assert r.status_code == 400 and "tools" in r.json()["error"]["message"]
    r = chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
    r = client.get("/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    metrics = client.get("/metrics").text
    assert 'dsv4_requests_total{endpoint="chat",status="404"} 1.0' in metrics
    assert 'dsv4_requests_total{endpoint="chat",status="400"}' in metrics


def test_anthropic_errors() -> None:
    client, _, _ = make()
    r = messages(client, model="claude-9")
    assert r.status_code == 404 and r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"
    r = client.post("/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]
    r = messages(client, thinking={"type": "enabled", "budget_tokens": 300})
    assert r.status_code == 400 and "budget_tokens" in r.json()["error"]["message"]


def test_api_key() -> None:
    client, _, _ = make(api_key="sekret")
    r = chat(client)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    # the key is checked before the body is read: no key and a broken body is still 401
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401
    r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer wrong"},
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and "Incorrect" in r.json()["error"]["message"]
    r = messages(client)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/messages", headers={"x-api-key": "sekret"},
                    json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).json()["data"][0]["id"] == MODEL
    assert client.get("/health").status_code == 200  # probes need no key
    assert client.get("/version").status_code == 200  # nor does vLLM's version probe
    assert client.post("/tokenize", json={"model": MODEL, "prompt": "hi"}).status_code == 401  # but the model does


def test_overload_is_503_with_retry_after() -> None:
    client, _, _ = make(max_concurrency=0)
    r = chat(client, stream=True)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    r = messages(client)
    assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"


def test_engine_failure_mid_stream_is_an_error_event_and_server_survives() -> None:
    def script(ids: list[int], params: Any) -> str:
        return "a long enough answer to still be running at step two"

    client, engine, _ = make(script)
    original = engine.stream

    async def broken(prompt_ids: list[int], params: Any, request_id: str) -> Any:
        n = 0
        async for out in original(prompt_ids, params, request_id):
            n += 1
            if n == 2:
                raise RuntimeError("device fell over")
            yield out

    engine.stream = broken  # type: ignore[method-assign]
    events = sse(chat(client, stream=True, thinking={"type": "disabled"}))
    assert any(isinstance(e, dict) and "device fell over" in e.get("error", {}).get("message", "") for e in events)
    engine.stream = original  # type: ignore[method-assign]
    assert chat(client).status_code == 200
    assert engine.live == set() and len(engine.aborted) == 1  # the failed request was aborted, freeing its page


# ---- plain endpoints ------------------------------------------------------------------------------------------------
def test_completions_models_health_metrics() -> None:
    client, _, _ = make("world")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["Hello", "Bye"], "echo": True, "n": 2})
    body = r.json()
    assert [c["text"] for c in body["choices"]] == ["Helloworld"] * 2 + ["Byeworld"] * 2
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    events = sse(client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "world" and events[-1] == "[DONE]"
    events = sse(client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "stream": True,
                                                      "echo": True}))
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "Helloworld"
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get("/v1/models/tiny").json()["id"] == MODEL
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["pages_used"] == 0 and health["pages_total"] == 64
    text = client.get("/metrics").text
    for name in ("dsv4_requests_total", "dsv4_generation_tokens_total", "dsv4_time_to_first_token_seconds_bucket",
                 "dsv4_time_per_output_token_seconds_bucket", "dsv4_kv_cache_usage_ratio",
                 "dsv4_prefix_cache_hit_rate"):
        assert name in text
    assert 'dsv4_requests_total{endpoint="completions",status="200"} 3.0' in text


# ---- tool calls (DSML in the completion, parsed by dsv4.chat.StreamParser) ----------------------------------------
DSML_CALL = ('Need the weather.</think>\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
             '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
             '</｜DSML｜tool_calls>')
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}


def test_openai_tool_call_response_and_stream() -> None:
    client, _, _ = make(DSML_CALL)
    body = chat(client, tools=[WEATHER]).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    msg = choice["message"]
    assert msg["reasoning_content"] == "Need the weather." and msg["content"] is None
    (call,) = msg["tool_calls"]
    assert call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}
    chunks = [c for c in sse(chat(client, tools=[WEATHER], stream=True))[:-1] if c["choices"]]
    calls = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all(tc["index"] == 0 for tc in calls) and all("id" not in tc for tc in calls[1:])
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls)) == {"city": "Paris", "days": 3}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # with tool_choice "none" the tools are left out of the prompt, and an unoffered call is dropped by the parser
    body = chat(client, tools=[WEATHER], tool_choice="none").json()
    assert "tool_calls" not in body["choices"][0]["message"]


def test_anthropic_tool_use_response_and_stream() -> None:
    client, _, _ = make(DSML_CALL)
    tool = {"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}
    body = messages(client, tools=[tool]).json()
    assert body["stop_reason"] == "tool_use"
    assert [b["type"] for b in body["content"]] == ["thinking", "tool_use"]
    use = body["content"][1]
    assert use["id"].startswith("toolu_") and use["input"] == {"city": "Paris", "days": 3}
    r = messages(client, tools=[tool], stream=True)
    datas = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    starts = [d["content_block"] for d in datas if d["type"] == "content_block_start"]
    assert [s["type"] for s in starts] == ["thinking", "tool_use"] and starts[1]["name"] == "get_weather"
    partial = "".join(d["delta"]["partial_json"] for d in datas
                      if d["type"] == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris", "days": 3}
    assert datas[-2]["delta"]["stop_reason"] == "tool_use"


def test_cli_defaults_bind_loopback() -> None:
    from dsv4.serve.app import build_parser

    args = build_parser().parse_args([])
    assert (args.host, args.port, args.api_key, args.model, args.served_model_name) == ("127.0.0.1", 8000, None,
                                                                                         None, None)
    args = build_parser().parse_args(["--served-model-name", "a", "b", "--api-key", "k"])
    assert args.served_model_name == ["a", "b"] and args.api_key == "k"


def test_prefill_is_continued_in_both_apis() -> None:
    seen: list[str] = []
    client, _, _ = make(lambda ids, p: seen.append(TOK.decode(ids)) or " Paris.")
    prefill = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "It is"}]
    body = chat(client, messages=prefill, **{"thinking": {"type": "disabled"}}).json()
    assert body["choices"][0]["message"]["content"] == " Paris."  # only the continuation, as DeepSeek's prefix mode
    assert seen[-1].endswith("<｜User｜>Capital of France?<｜Assistant｜></think>It is")
    chat(client, messages=prefill)  # thinking on: a content prefill closes an empty reasoning first
    assert seen[-1].endswith("<｜Assistant｜><think></think>It is")
    reasoning_prefill = [prefill[0], {"role": "assistant", "content": "", "reasoning_content": "Hmm,"}]
    body = chat(client, messages=reasoning_prefill).json()  # ... and a reasoning-only prefill continues the reasoning
    assert seen[-1].endswith("<｜Assistant｜><think>Hmm,")
    assert body["choices"][0]["message"]["reasoning_content"] == " Paris."
    body = messages(client, messages=prefill, thinking={"type": "disabled"}).json()
    assert body["content"] == [{"type": "text", "text": " Paris."}]
    assert seen[-1].endswith("<｜Assistant｜></think>It is")
    r = chat(client, messages=[prefill[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}])
    assert r.status_code == 400 and "prefill" in r.json()["error"]["message"]


def test_prefill_must_fit_the_grammar() -> None:
    client, _, _ = make('"a": 1}', real_chat=True)
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    ok = chat(client, messages=[{"role": "user", "content": "json"}, {"role": "assistant", "content": "{"}],
              response_format=fmt, thinking={"type": "disabled"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == '"a": 1}'
    bad = chat(client, messages=[{"role": "user", "content": "json"}, {"role": "assistant", "content": "hello"}],
               response_format=fmt, thinking={"type": "disabled"})
    assert bad.status_code == 400 and "prefill" in bad.json()["error"]["message"]


def test_oversized_body_is_413() -> None:
    engine = FakeEngine(TOK, lambda ids, p: "ok")
    core = ServingCore(engine, TOK, model_names=[MODEL], max_model_len=4096, chat=FakeChat())
    client = TestClient(create_app(core, max_body_bytes=1000), raise_server_exceptions=False)
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "limit of 1000 bytes" in r.json()["error"]["message"]
    r = client.post("/v1/messages", json={**big, "max_tokens": 4})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

    def chunks() -> Any:  # no Content-Length: counted while it arrives
        yield json.dumps(big).encode()

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert chat(client).status_code == 200 and engine.live == set()


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_before_first_token_aborts(stream: bool) -> None:
    """A client that hangs up while its request is still queued is noticed at once, not at the first token."""
    import asyncio

    engine = FakeEngine(TOK, lambda ids, p: "late", first_delay=30.0)
    core = ServingCore(engine, TOK, model_names=[MODEL], max_model_len=4096, chat=FakeChat())
    app = create_app(core)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        inbox = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if inbox:
                return inbox.pop(0)
            await asyncio.sleep(0.2)  # then the client is gone
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await asyncio.wait_for(app(scope, receive, send), timeout=10)

    asyncio.run(main())
    # a stream has started at admission (200 + the role chunk); a unary request answers into the void (499)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == (200 if stream else 499)
    assert engine.live == set() and len(engine.aborted) == 1 and core.in_flight == 0


def test_large_bodies_parse_in_the_worker_process_with_the_same_answers() -> None:
    """Bodies over the parser's threshold (1 MiB; 64 bytes here) are parsed in its worker process (bodyparse.py):
    the same answer as parsing in place, and the same 400s for bodies that are not JSON."""
    client, _, core = make()
    try:
        small = chat(client).json()
        core.bodies.threshold = 64
        assert core.bodies._pool is None
        big = chat(client).json()
        assert core.bodies._pool is not None  # it went through the worker
        assert big["choices"] == small["choices"] and big["usage"] == small["usage"]
        pad = b" " * 100
        as_json = {"content-type": "application/json"}
        r = client.post("/v1/chat/completions", content=b"{not json" + pad, headers=as_json)
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        deep = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = client.post("/v1/chat/completions", content=deep, headers=as_json)
        assert r.status_code == 400 and "too deeply" in r.json()["error"]["message"]
        r = client.post("/v1/messages", content=b'{"model": "\xff\xfe"}' + pad, headers=as_json)
        assert r.status_code == 400 and "not UTF-8" in r.json()["error"]["message"]
        core.bodies.threshold = 1 << 20  # the same body parsed in place by FastAPI: the same answer
        small_bad = client.post("/v1/messages", content=b'{"model": "\xff\xfe"}' + pad, headers=as_json)
        assert small_bad.status_code == 400 and small_bad.json()["error"]["message"] == r.json()["error"]["message"]
        core.bodies.threshold = 64
        r = client.post("/v1/chat/completions", content=json.dumps({"model": MODEL}).encode() + pad, headers=as_json)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"  # validation as before
    finally:
        core.bodies.shutdown()
