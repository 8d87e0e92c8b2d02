"""Bad input gets a 400 in its API's own format naming the field (serve/validate.py), oversized input is refused by
the cheapest measure first (serve/limits.py), and the key guards everything but /health unless opened. A property
test then throws malformed unicode, schemas and message orders at every endpoint and expects no 5xx."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv4.chat import load_tokenizer
from dsv4.serve import limits
from dsv4.serve.app import create_app
from dsv4.serve.core import ServeError, ServingCore

from .fakes import FakeChat, FakeEngine

TOK = load_tokenizer(None)
MODEL = "tiny"
USER = [{"role": "user", "content": "hi"}]


def make(max_model_len: int = 4096, **app_kw: Any) -> tuple[TestClient, FakeEngine, ServingCore]:
    engine = FakeEngine(TOK, lambda ids, params: "ok")
    core = ServingCore(engine, TOK, model_names=[MODEL], max_model_len=max_model_len, chat=FakeChat())
    return TestClient(create_app(core, **app_kw), raise_server_exceptions=False), engine, core


CLIENT, ENGINE, CORE = make()


def post(path: str, body: dict[str, Any] | str) -> Any:
    raw = body if isinstance(body, str) else json.dumps(body)  # json.dumps writes "\ud800" as its escape
    return CLIENT.post(path, content=raw.encode(), headers={"content-type": "application/json"})


def openai_400(r: Any, param: str, *words: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    for w in words:
        assert w in err["message"], err["message"]


def anthropic_400(r: Any, *words: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    for w in words:
        assert w in body["error"]["message"], body["error"]["message"]


# ---- lone surrogates -------------------------------------------------------------------------------------------
def test_lone_surrogates_are_400_naming_the_field() -> None:
    bad = "a\ud800b"
    openai_400(post("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": bad}]}),
               "messages[0].content", "surrogate", "U+D800")
    openai_400(post("/v1/chat/completions", {"model": bad, "messages": USER}), "model", "surrogate")
    openai_400(post("/v1/completions", {"model": MODEL, "prompt": bad}), "prompt", "surrogate")
    openai_400(post("/v1/completions", {"model": MODEL, "prompt": ["ok", "\udfff"]}), "prompt[1]", "U+DFFF")
    anthropic_400(post("/v1/messages", {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": bad}]}]}), "messages[0].content[0].text")
    anthropic_400(post("/v1/messages/count_tokens", {"model": MODEL, "messages": USER, "system": bad}), "system")
    # a surrogate in a field name, and a well-formed pair (one astral character) which is fine
    openai_400(post("/v1/chat/completions", {"model": MODEL, "messages": USER, "x\udc00": 1}), "body", "field name")
    assert post("/v1/chat/completions", {"model": MODEL, "messages": [
        {"role": "user", "content": "\ud83d\ude00"}]}).status_code == 200
    assert ENGINE.live == set()


def test_deeply_nested_body_is_a_400_that_says_so() -> None:
    deep = '{"model": "tiny", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    openai_400(post("/v1/chat/completions", deep), "body", "too deeply")
    # nesting the parser accepts is walked without recursion by the text check
    nested = {"model": MODEL, "messages": USER, "x": json.loads('{"a":' * 800 + '"\\ud800"' + "}" * 800)}
    openai_400(post("/v1/chat/completions", nested), "x" + ".a" * 800, "surrogate")


def test_error_naming_an_unknown_model_with_odd_text_still_answers() -> None:
    r = CLIENT.get("/v1/models/%ED%A0%80")  # invalid UTF-8 in the path
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# ---- schemas ---------------------------------------------------------------------------------------------------
def tool(parameters: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


def test_invalid_tool_schemas_are_400_naming_the_part() -> None:
    base = {"model": MODEL, "messages": USER}
    bad_type = {"type": "object", "properties": {"city": {"type": "strin"}}}
    openai_400(post("/v1/chat/completions", {**base, "tools": tool(bad_type)}),
               "tools[0].function.parameters.properties.city.type", "invalid JSON Schema")
    openai_400(post("/v1/chat/completions", {**base, "tools": tool({"type": "object", "required": "city"})}),
               "tools[0].function.parameters.required", "not of type 'array'")
    openai_400(post("/v1/chat/completions", {**base, "tools": tool({"type": "string"})}),
               "tools[0].function.parameters.type", '"object"')
    r = post("/v1/messages", {**base, "max_tokens": 4, "tools": [
        {"name": "f", "input_schema": {"type": "object", "properties": {"n": {"minimum": "zero"}}}}]})
    anthropic_400(r, "tools[0].input_schema.properties.n.minimum", "invalid JSON Schema")
    r = post("/v1/messages/count_tokens", {**base, "tools": [{"name": "f", "input_schema": {"type": "array"}}]})
    anthropic_400(r, "tools[0].input_schema.type")
    ok = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris"]}}, "required": ["city"]}
    assert post("/v1/chat/completions", {**base, "tools": tool(ok)}).status_code == 200
    assert post("/v1/chat/completions", {**base, "tools": tool({})}).status_code == 200  # no parameters: fine


def test_invalid_response_format_schema_names_the_part() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"items": {"type": "array", "items": {"type": 5}}}}}}
    openai_400(post("/v1/chat/completions", {"model": MODEL, "messages": USER, "response_format": fmt}),
               "response_format.json_schema.schema.properties.items.items.type", "invalid JSON Schema")

    def schema_400(schema: dict[str, Any], param: str, *words: str) -> None:
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        r = post("/v1/chat/completions", {"model": MODEL, "messages": USER, "response_format": fmt})
        openai_400(r, "response_format.json_schema.schema." + param, *words)

    schema_400({"$schema": 5, "type": "object"}, "$schema", "not a metaschema URI")
    schema_400({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "properties.a.$ref",
               "points to nothing")
    schema_400({"properties": {"a": {"$ref": "https://example.com/s.json"}}}, "properties.a.$ref", "not a local")
    ok = {"$defs": {"c": {"type": "string"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/c"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": ok}}
    assert post("/v1/chat/completions", {"model": MODEL, "messages": USER, "response_format": fmt}).status_code == 200


# ---- message order ---------------------------------------------------------------------------------------------
CALL = {"role": "assistant", "content": None,
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def test_tool_messages_must_answer_a_preceding_call() -> None:
    base = {"model": MODEL, "tools": tool({"type": "object"})}
    first = [{"role": "tool", "tool_call_id": "call_1", "content": "42"}, *USER]
    openai_400(post("/v1/chat/completions", {**base, "messages": first}), "messages[0].tool_call_id",
               "must follow the assistant turn")
    stray = [*USER, {"role": "assistant", "content": "plain"}, {"role": "tool", "tool_call_id": "c", "content": "1"}]
    openai_400(post("/v1/chat/completions", {**base, "messages": stray}), "messages[2].tool_call_id")
    wrong = [*USER, CALL, {"role": "tool", "tool_call_id": "call_9", "content": "42"}]
    openai_400(post("/v1/chat/completions", {**base, "messages": wrong}), "messages[2].tool_call_id",
               "'call_9' matches no tool call", "'call_1'")
    late = [*USER, CALL, {"role": "tool", "tool_call_id": "call_1", "content": "42"}, *USER,
            {"role": "tool", "tool_call_id": "call_1", "content": "again"}]
    openai_400(post("/v1/chat/completions", {**base, "messages": late}), "messages[4].tool_call_id")
    good = [*USER, CALL, {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    assert post("/v1/chat/completions", {**base, "messages": good}).status_code == 200


def test_anthropic_tool_result_needs_the_tool_use_before_it() -> None:
    def result(i: str) -> dict[str, Any]:
        return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": i, "content": "42"}]}

    use = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}
    base = {"model": MODEL, "max_tokens": 4, "tools": [{"name": "f", "input_schema": {"type": "object"}}]}
    anthropic_400(post("/v1/messages", {**base, "messages": [result("toolu_1")]}),
                  "messages[0].content[0].tool_use_id", "must follow")
    anthropic_400(post("/v1/messages", {**base, "messages": [*USER, use, result("toolu_2")]}),
                  "messages[2].content[0].tool_use_id", "'toolu_2' matches no tool call")
    anthropic_400(post("/v1/messages/count_tokens", {"model": MODEL, "messages": [result("x")]}), "tool_use_id")
    assert post("/v1/messages", {**base, "messages": [*USER, use, result("toolu_1")]}).status_code == 200


# ---- size before work ------------------------------------------------------------------------------------------
def test_default_body_limit_follows_the_context() -> None:
    assert CORE.token_bytes == 128  # the V4 vocabulary's longest tokens: 128 dots / spaces
    assert limits.default_body_limit(1024, 128) == (1 << 20) + 6 * 128 * 1024
    assert limits.default_body_limit(1 << 20, 128) == 64 << 20  # capped
    client, _, _ = make(max_model_len=256)
    limit = limits.default_body_limit(256, 128)
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": "x" * (limit + 10)}]})
    assert r.status_code == 413 and str(limit) in r.json()["error"]["message"]


def test_oversized_text_is_refused_before_rendering_or_tokenizing() -> None:
    client, engine, core = make(max_model_len=256, max_body_bytes=64 << 20)
    calls: list[int] = []
    encode = core.tokenizer.encode
    core.tokenizer = type("Counting", (), {"encode": lambda self, t: calls.append(len(t)) or encode(t),
                                           "decode": TOK.decode, "token_id": TOK.token_id})()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2_000_000}]}  # 10 MB
    t = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"], r.text
    assert calls == [] and time.perf_counter() - t < 5
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = client.post(path, json={**body, "max_tokens": 4})
        anthropic_400(r, "maximum context length is 256")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 2_000_000})
    openai_400(r, "prompt", "characters")
    assert calls == [] and engine.live == set()


def test_token_count_stops_at_the_limit() -> None:
    """Text under the character bound (runs that make short tokens) is counted slice by slice: tokenization stops
    once the count proves the prompt too long, after about one context's worth, not the whole text."""
    calls: list[int] = []

    def encode(text: str) -> list[int]:
        calls.append(len(text))
        return TOK.encode(text)

    text = "a, " * 40_000  # 120K characters, ~80K tokens
    with pytest.raises(ServeError) as e:
        limits.encode_within(encode, text, 1000, "prompt", "prompt", 1001)
    assert "more than" in e.value.message and e.value.param == "prompt"
    assert sum(calls) <= 2 * limits.SLICE_CHARS  # stopped after the first slices, never the whole text
    calls.clear()
    ok = "a, " * 10_000  # 30K characters, ~20K tokens: counted in slices, then encoded whole, exactly
    assert limits.encode_within(encode, ok, 100_000, "prompt", "prompt", 100_001) == TOK.encode(ok)
    assert calls[-1] == len(ok)


def test_prompt_near_the_limit_is_not_refused_by_the_slices() -> None:
    text = ("The quick brown fox jumps over the lazy dog.\n" * 1200)
    n = len(TOK.encode(text))
    assert limits.encode_within(TOK.encode, text, n, "prompt", "prompt", n + 1) == TOK.encode(text)


# ---- the key guards the rest -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models", "/nope"])
def test_api_key_guards_metrics_and_docs_unless_opened(path: str) -> None:
    closed, _, _ = make(api_key="k")
    assert closed.get("/health").status_code == 200
    assert closed.get(path).status_code == 401
    assert closed.get(path, headers={"Authorization": "Bearer k"}).status_code in (200, 404)
    opened, _, _ = make(api_key="k", public_metrics=True, public_docs=True)
    if path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        assert opened.get(path).status_code == 200
    else:
        assert opened.get(path).status_code == 401


# ---- property test: malformed input never gets a 5xx -----------------------------------------------------------
# Text with lone surrogates, controls and astral characters; schemas of any JSON shape; roles in any order.
_chars = st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
_text = st.text(_chars, max_size=12) | st.sampled_from(["\ud800", "a\udfffb", "\ud83d\ude00", "", "<｜User｜>"])
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_text, kids, max_size=3),
                     max_leaves=8)
_schema = st.dictionaries(st.sampled_from(["type", "properties", "required", "items", "enum", "minimum", "$ref",
                                           "additionalProperties", "anyOf", "$schema", "$defs", "pattern", "format"]),
                          _json, max_size=4) | _json
_call = st.fixed_dictionaries({"id": st.sampled_from(["c1", "c2"]), "type": st.just("function"),
                               "function": st.fixed_dictionaries({"name": st.just("f"), "arguments": _text})})
_oai_msg = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": _text}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none(),
                           "tool_calls": st.lists(_call, min_size=1, max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.sampled_from(["c1", "c2", "x"]),
                           "content": _text}),
)
_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.sampled_from(["t1", "t2"]), "name": st.just("f"),
                           "input": st.dictionaries(_text, _json, max_size=2)}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.sampled_from(["t1", "t2", "x"]),
                           "content": _text}),
)
_ant_msg = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                  "content": _text | st.lists(_block, min_size=1, max_size=3)})


@st.composite
def _requests(draw: Any) -> tuple[str, dict[str, Any]]:
    kind = draw(st.sampled_from(["chat", "completions", "messages", "count_tokens"]))
    model = draw(st.sampled_from([MODEL, MODEL, "\ud800", "x"]))
    if kind == "chat":
        body: dict[str, Any] = {"model": model, "messages": draw(st.lists(_oai_msg, min_size=1, max_size=4)),
                                "max_tokens": 4}
        if draw(st.booleans()):
            body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": draw(_schema)}}]
        if draw(st.booleans()):
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema": draw(_schema)}}
        return "/v1/chat/completions", body
    if kind == "completions":
        return "/v1/completions", {"model": model, "prompt": draw(_text | st.lists(_text, min_size=1, max_size=2)),
                                   "max_tokens": 4}
    body = {"model": model, "messages": draw(st.lists(_ant_msg, min_size=1, max_size=4))}
    if draw(st.booleans()):
        body["tools"] = [{"name": "f", "input_schema": draw(_schema)}]
    if draw(st.booleans()):
        body["system"] = draw(_text)
    if kind == "messages":
        return "/v1/messages", {**body, "max_tokens": 4}
    return "/v1/messages/count_tokens", body


@given(_requests())
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_malformed_unicode_schemas_and_orders_never_5xx(req: tuple[str, dict[str, Any]]) -> None:
    path, body = req
    r = post(path, json.dumps(body))
    assert r.status_code < 500, (path, body, r.text[:500])
    r.json()  # always a JSON error body in the API's format (never a dropped connection)
    assert ENGINE.live == set()


def test_browsers_on_other_origins_cannot_drive_generation() -> None:
    """No CORS headers, preflight refused, and the bodies a page may send without preflight are not JSON objects."""
    hdr = {"origin": "http://elsewhere.example"}
    body = json.dumps({"model": MODEL, "messages": USER})
    r = CLIENT.options("/v1/chat/completions", headers={**hdr, "access-control-request-method": "POST"})
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    for kind in ("text/plain", "application/x-www-form-urlencoded"):
        r = CLIENT.post("/v1/chat/completions", content=body, headers={**hdr, "content-type": kind})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


_GRAMMAR_ENGINE = FakeEngine(TOK, lambda ids, params: "ok")
_GRAMMAR_CLIENT = TestClient(create_app(ServingCore(_GRAMMAR_ENGINE, TOK, model_names=[MODEL], max_model_len=4096)),
                             raise_server_exceptions=False)


@given(_schema, st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_any_schema_through_the_real_grammar_compiler_never_5xx(schema: Any, as_tool: bool) -> None:
    """The same schemas as a forced tool's parameters or a json_schema answer, compiled by the real xgrammar."""
    body: dict[str, Any] = {"model": MODEL, "messages": USER, "max_tokens": 4}
    if as_tool:
        body.update(tool_choice="required", tools=[{"type": "function", "function": {"name": "f",
                                                                                      "parameters": schema}}])
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    r = _GRAMMAR_CLIENT.post("/v1/chat/completions", content=json.dumps(body).encode(),
                             headers={"content-type": "application/json"})
    assert r.status_code < 500, (schema, r.text[:500])
    if r.status_code == 400:
        assert r.json()["error"]["param"], r.text  # the error names where the schema went wrong
    assert _GRAMMAR_ENGINE.live == set()



def test_responses_api_gets_the_same_checks() -> None:
    """The Responses API refuses what chat completions refuses: bad text, bad tool schemas, orphan tool results."""
    openai_400(post("/v1/responses", {"model": MODEL, "input": "hi \ud800"}), "input", "surrogate")
    tool = {"type": "function", "name": "f",
            "parameters": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}
    openai_400(post("/v1/responses", {"model": MODEL, "input": "hi", "tools": [tool]}),
               "tools[0].parameters.properties.a.type", "invalid JSON Schema")
    r = post("/v1/responses", {"model": MODEL, "input": [
        {"type": "message", "role": "user", "content": "hi"},
        {"type": "function_call_output", "call_id": "c1", "output": "x"}]})
    assert r.status_code == 400 and "tool result must follow" in r.json()["error"]["message"], r.text
    assert ENGINE.live == set()
