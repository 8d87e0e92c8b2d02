"""End to end: a real `dsv4 serve` process on loopback with a tiny random V4 model, driven by the official `openai` and
`anthropic` SDKs (and raw HTTP for disconnects): streaming and not, thinking on and off, a forced tool call and a
json_schema answer that validate against their schemas, 64 concurrent streams, client disconnects, errors, and a
clean SIGINT shutdown.

The model is random, so tests check structure and invariants (greedy stream == greedy non-stream, schema validity
under constrained decoding, pages released), never particular words.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import openai
import pytest

from dsv4.serve.process import ServeProcess

from .tiny import build_tiny_checkpoint

KEY = "test-key"
MODEL = "tiny"
MAX_LEN = 1024


class Server(ServeProcess):
    """`dsv4 serve` in a subprocess on a free loopback port with the test key, its output in `log`; `args` are its
    options."""

    def __init__(self, log: Path, *args: str) -> None:
        super().__init__("--api-key", KEY, "--device", "cpu", "--log-level", "info", *args, log=log)

    def wait_ready(self, timeout: float = 180.0) -> None:
        super().wait_ready(timeout)

    def wait_idle(self, timeout: float = 60.0) -> dict:
        h = super().wait_idle(timeout)
        if (h["pages_used"], h["running"], h["waiting"], h["in_flight"]) != (0, 0, 0, 0):
            raise AssertionError(f"server still busy after {timeout}s: {h}")
        return h


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    build_tiny_checkpoint(root / "ckpt")
    srv = Server(root / "server.log", "--model", str(root / "ckpt"), "--served-model-name", MODEL,
                 "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--max-num-seqs", "64")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def oai(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


USER = [{"role": "user", "content": "What is the capital of France?"}]
OFF = {"thinking": {"type": "disabled"}}
GREEDY = {"temperature": 0}  # the current anthropic SDK has no temperature argument; the API still takes the field
# Finite value sets (enum, boolean): a random model under the grammar then finishes within a few tokens, where a free
# integer or string could run on until max_tokens.
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                                            "metric": {"type": "boolean"}},
           "required": ["city", "metric"], "additionalProperties": False}


def test_openai_chat_stream_equals_non_stream_and_thinking_switch(oai: openai.OpenAI) -> None:
    for extra in (OFF, {"thinking": {"type": "enabled"}}):
        full = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0, extra_body=extra)
        msg = full.choices[0].message
        reasoning = (msg.model_extra or {}).get("reasoning_content")
        if extra is OFF:
            assert reasoning is None
        else:  # a random model does not close </think> within 6 tokens: its text is reasoning
            assert reasoning
        assert full.choices[0].finish_reason in ("length", "stop")
        assert 0 < full.usage.completion_tokens <= 6 and full.usage.prompt_tokens > 0
        stream = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=6, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body=extra)
        content, streamed_reasoning, finish, usage = "", "", None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                content += c.delta.content or ""
                streamed_reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
                finish = c.finish_reason or finish
        assert (content, streamed_reasoning or None) == (msg.content or "", reasoning)
        assert finish == full.choices[0].finish_reason
        assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_openai_logprobs_n_and_seed(oai: openai.OpenAI) -> None:
    greedy = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body=OFF)
    lps = greedy.choices[0].logprobs.content
    assert len(lps) == greedy.usage.completion_tokens
    for lp in lps:  # greedy: the chosen token is the most likely one
        assert len(lp.top_logprobs) >= 2 and lp.logprob == max(t.logprob for t in lp.top_logprobs) <= 0
    kw = dict(model=MODEL, messages=USER, max_tokens=4, temperature=1.0, seed=7, n=2, extra_body=OFF)
    a, b = oai.chat.completions.create(**kw), oai.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: reproducible


def test_openai_forced_tool_call_is_schema_valid(oai: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                               "parameters": WEATHER}}]
    # one call (no parallel calls): the whole block is then < 300 bytes, so even a random model that spells it one
    # byte-token at a time finishes well within max_tokens
    resp = oai.chat.completions.create(model=MODEL, messages=USER, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=400, temperature=0.8, seed=3,
                                       extra_body=OFF)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)


def test_openai_json_schema_output_validates(oai: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    resp = oai.chat.completions.create(
        model=MODEL, messages=USER, max_tokens=400, temperature=0.8, seed=5, extra_body=OFF,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}})
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)


def test_anthropic_messages_stream_thinking_and_tools(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(model=MODEL, max_tokens=6, messages=USER, extra_body=GREEDY,
                                 thinking={"type": "enabled", "budget_tokens": 4})
    assert [b.type for b in msg.content][0] == "thinking" and msg.stop_reason in ("max_tokens", "end_turn")
    assert msg.usage.output_tokens <= 6
    with claude.messages.stream(model=MODEL, max_tokens=6, messages=USER, extra_body=GREEDY,
                                thinking={"type": "enabled", "budget_tokens": 4}) as stream:
        final = stream.get_final_message()
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in msg.content]
    # a random model would stay in reasoning for all 10 tokens; the budget forces </think> after 2, then it answers
    capped = claude.messages.create(model=MODEL, max_tokens=10, messages=USER, extra_body=GREEDY,
                                    thinking={"type": "enabled", "budget_tokens": 2})
    assert [b.type for b in capped.content][:2] == ["thinking", "text"], capped.content
    off = claude.messages.create(model=MODEL, max_tokens=6, messages=USER, extra_body=GREEDY,
                                 thinking={"type": "disabled"})
    assert all(b.type == "text" for b in off.content)
    tool = {"name": "get_weather", "description": "Weather forecast", "input_schema": WEATHER}
    used = claude.messages.create(model=MODEL, max_tokens=400, messages=USER, tools=[tool],
                                  tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                  thinking={"type": "disabled"})
    assert used.stop_reason == "tool_use"
    uses = [b for b in used.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    jsonschema.validate(uses[0].input, WEATHER)
    count = claude.messages.count_tokens(model=MODEL, messages=USER)
    assert count.input_tokens > 5


def test_prefix_cache_hits_are_reported(server: Server, oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    system = "You are a careful assistant. " * 60  # > 2 cache pages of 128 tokens, shared by both requests
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "Hi."}]
    first = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, extra_body=OFF)
    again = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, extra_body=OFF)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens > 256 and 128 <= cached <= again.usage.prompt_tokens
    reply = claude.messages.create(model=MODEL, max_tokens=2, system=system, messages=[msgs[1]],
                                   thinking={"type": "disabled"})
    assert reply.usage.cache_read_input_tokens >= 128
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == first.usage.prompt_tokens
    assert _metric(server, "dsv4_prefix_cache_hit_rate") > 0


def test_errors_through_the_sdks(server: Server, oai: openai.OpenAI) -> None:
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=USER)
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {MAX_LEN} tokens"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 2000}])
    assert [m.id for m in oai.models.list()] == [MODEL]
    claude = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    assert [(m.id, m.type) for m in claude.models.list()] == [(MODEL, "model")]
    assert claude.models.retrieve(MODEL).display_name == MODEL


def test_64_concurrent_streams_complete_and_release_pages(server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)

    async def one(i: int) -> tuple[str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=4, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body=OFF)
        finish, tokens = None, 0
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            for c in chunk.choices:
                finish = c.finish_reason or finish
        return finish, tokens

    async def main() -> list[tuple[str | None, int]]:
        try:
            return await asyncio.gather(*[one(i) for i in range(64)])
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 64 and all(f in ("stop", "length") and 0 < n <= 4 for f, n in results), results
    server.wait_idle(timeout=30)


def _metric(server: Server, name: str) -> float:
    # /metrics needs the key like the API (docs/security.md; --public-metrics opens it)
    assert httpx.get(f"{server.url}/metrics").status_code == 401
    for line in httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} missing from /metrics")


def test_client_disconnect_aborts_and_frees_pages(server: Server) -> None:
    aborted = _metric(server, "dsv4_requests_aborted_total")
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": USER, "max_tokens": 900, "stream": True, **OFF}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks, then hang up mid-stream
            assert any(line.startswith("data: ") for line in got)
    # non-streaming: the client gives up (timeout) while the server is still generating
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=1.5,
                   json={**body, "stream": False})
    # 900 tokens would take far longer than this on the tiny model: only an abort frees the pages this fast
    server.wait_idle(timeout=30)
    assert _metric(server, "dsv4_requests_aborted_total") >= aborted + 2


def test_metrics_and_clean_shutdown(server: Server, oai: openai.OpenAI) -> None:
    oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=3, extra_body=OFF)
    assert _metric(server, "dsv4_time_to_first_token_seconds_count") > 0
    assert _metric(server, "dsv4_generation_tokens_total") > 0
    assert f"listening on http://127.0.0.1:{server.port}" in server.log.read_text()
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=60) == 0
    log = server.log.read_text()
    assert "shutting down" in log and "Traceback" not in log, log[-3000:]
