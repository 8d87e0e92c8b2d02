"""The tool-call / JSON constraint on token sequences: official renderings pass, schema violations are refused."""

from __future__ import annotations

import json

import pytest
import torch

from dsv4.chat import encode_messages, parse_completion
from dsv4.chat.constraint import allocate_bitmask, apply_bitmask, build_constraint
from tests.chat.chat_fixtures import tok  # noqa: F401  (fixture)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "hours": {"type": "array", "items": {"type": "integer"}},
            },
            "required": ["location", "days"],
        },
    },
}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, PING]


def _completion(mode: str, calls: list[tuple[str, dict]], content: str = "", reasoning: str = "r") -> str:
    """What the model writes for this assistant turn, rendered by the encoder (the official format)."""
    msg = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        msg["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls]
    user = [{"role": "user", "content": "Q"}]
    return encode_messages(user + [msg], mode)[len(encode_messages(user, mode)):]


def _accepts(tok, constraint, text: str) -> bool:
    return all(constraint.accept(t) for t in tok.encode(text))


GOOD_CALLS = [
    [("get_weather", {"location": "Paris", "days": 3})],
    [("get_weather", {"location": "Rio de Janeiro", "unit": "celsius", "days": 14, "hours": [1, 2]})],
    [("ping", {}), ("get_weather", {"location": "Oslo", "days": 1})],
]


@pytest.mark.parametrize("mode", ["chat", "thinking"])
@pytest.mark.parametrize("tool_choice", ["auto", "required"])
@pytest.mark.parametrize("calls", GOOD_CALLS)
def test_official_renderings_are_accepted(tok, mode: str, tool_choice: str, calls) -> None:
    text = _completion(mode, calls)
    c = build_constraint(tok, tools=TOOLS, tool_choice=tool_choice, thinking_mode=mode)
    assert _accepts(tok, c, text) and c.is_finished()
    parse_completion(text, mode)  # and the strict parser reads it


@pytest.mark.parametrize(
    ("calls", "why"),
    [
        ([("get_weather", {"location": "Paris"})], "missing required days"),
        ([("get_weather", {"location": "Paris", "days": 30})], "days above maximum"),
        ([("get_weather", {"location": "Paris", "unit": "kelvin", "days": 3})], "unit not in enum"),
        ([("get_weather", {"location": "Paris", "days": "3"})], "days as a string"),
        ([("get_weather", {"location": 7, "days": 3})], "location not a string"),
        ([("get_weather", {"days": 3, "location": "Paris"})], "parameters out of declared order"),
        ([("get_time", {})], "unknown tool"),
    ],
)
@pytest.mark.parametrize("tool_choice", ["required", "auto"])
def test_schema_violations_are_refused(tok, calls, why: str, tool_choice: str) -> None:
    # "auto" holds an opened block to the same schemas as "required"
    c = build_constraint(tok, tools=TOOLS, tool_choice=tool_choice)
    text = _completion("chat", calls, content="Checking." if tool_choice == "auto" else "")
    assert not (_accepts(tok, c, text) and c.is_finished()), why


def test_auto_keeps_dsml_out_of_the_content(tok) -> None:
    # The malformed forms the parser has to recover (a bare invoke, an opener without the blank line) cannot be
    # written under the "auto" grammar: DSML starts only with the official opener.
    for bad in ['Sure.<｜DSML｜invoke name="ping">', "Sure.<｜DSML｜tool_calls>\n", 'Sure.\n<｜DSML｜invoke name="ping">']:
        c = build_constraint(tok, tools=TOOLS, tool_choice="auto")
        assert not _accepts(tok, c, bad), bad
    # prose keeps the fullwidth bar; a special token spelled out of ordinary tokens is refused
    c = build_constraint(tok, tools=TOOLS, tool_choice="auto")
    assert _accepts(tok, c, "a ｜ b, 表｜格")
    spelled = tok.encode("<") + tok.encode("｜User｜>")
    assert tok.token_id("<｜User｜>") not in spelled and not all(c.accept(t) for t in spelled)


def test_required_allows_only_the_block_and_named_only_that_tool(tok) -> None:
    c = build_constraint(tok, tools=TOOLS, tool_choice="required")
    allowed = c.allowed_mask().nonzero().flatten().tolist()
    assert {tok.decode([t]) for t in allowed} <= {"\n", "\n\n"} and tok.eos_id not in allowed
    named = {"type": "function", "function": {"name": "ping"}}
    c = build_constraint(tok, tools=TOOLS, tool_choice=named)
    assert _accepts(tok, c, _completion("chat", [("ping", {})])) and c.is_finished()
    c = build_constraint(tok, tools=TOOLS, tool_choice=named)
    assert not _accepts(tok, c, _completion("chat", [("get_weather", {"location": "x", "days": 1})]))


def test_auto_allows_plain_content_but_no_special_tokens(tok) -> None:
    c = build_constraint(tok, tools=TOOLS, tool_choice="auto")
    assert _accepts(tok, c, "It is sunny.") and c.can_finish()
    assert c.accept(tok.eos_id) and c.is_finished()
    c = build_constraint(tok, tools=TOOLS)
    assert _accepts(tok, c, "Let me check.") and not c.accept(tok.token_id("<｜User｜>"))
    c = build_constraint(tok, tools=TOOLS)
    text = _completion("chat", [("ping", {})], content="Let me check.")
    assert _accepts(tok, c, text) and c.is_finished()


def test_thinking_keeps_reasoning_free_until_think_end(tok) -> None:
    c = build_constraint(tok, tools=TOOLS, tool_choice="required", thinking_mode="thinking")
    assert c.allowed_mask().sum() > 120000  # reasoning: nearly every token
    assert _accepts(tok, c, "I will look it up, carefully.") and not c.can_finish()
    assert c.accept(tok.token_id("</think>"))
    assert c.allowed_mask().sum() <= 2  # now only the block may start
    assert _accepts(tok, c, _completion("chat", [("ping", {})])) and c.is_finished()


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}, "n": {"type": "integer"}},
    "required": ["city", "n"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_response_format_json_schema(tok, mode: str) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    prefix = "ok</think>" if mode == "thinking" else ""
    c = build_constraint(tok, response_format=rf, thinking_mode=mode)
    assert _accepts(tok, c, prefix + '{"city": "Oslo", "n": 2}<｜end▁of▁sentence｜>') and c.is_finished()
    for bad in ['{"city": "Rome", "n": 2}', '{"city": "Oslo"}', '{"city": "Oslo", "n": 2, "x": 1}', "Sure!"]:
        c = build_constraint(tok, response_format=rf, thinking_mode=mode)
        assert not (_accepts(tok, c, prefix + bad + "<｜end▁of▁sentence｜>") and c.is_finished()), bad
    c = build_constraint(tok, response_format={"type": "json_object"})
    assert _accepts(tok, c, '{"a": [1, {"b": null}]}<｜end▁of▁sentence｜>') and c.is_finished()
    assert build_constraint(tok, response_format={"type": "text"}) is None
    assert build_constraint(tok, tools=TOOLS, tool_choice="none") is None


def test_auto_with_response_format_is_json_or_tool_calls(tok) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    c = build_constraint(tok, tools=TOOLS, response_format=rf)
    assert _accepts(tok, c, '{"city": "Paris", "n": 1}<｜end▁of▁sentence｜>') and c.is_finished()
    c = build_constraint(tok, tools=TOOLS, response_format=rf)
    assert _accepts(tok, c, _completion("chat", [("ping", {})])) and c.is_finished()
    c = build_constraint(tok, tools=TOOLS, response_format=rf)
    assert not _accepts(tok, c, "Plain text")


def test_bitmask_and_bool_mask_agree(tok) -> None:
    c = build_constraint(tok, tools=TOOLS, tool_choice="required")
    _accepts(tok, c, '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="location"')
    mask = c.allowed_mask(tok.vocab_size + 64)  # a model vocabulary padded past the tokenizer's
    assert mask.shape == (tok.vocab_size + 64,) and not mask[tok.vocab_size:].any()
    bitmask = allocate_bitmask(1, tok.vocab_size)
    c.fill_bitmask(bitmask)
    logits = torch.zeros(1, tok.vocab_size)
    apply_bitmask(logits, bitmask)
    assert torch.equal(torch.isfinite(logits[0]), mask[: tok.vocab_size])
    applied = c.apply(torch.zeros(tok.vocab_size))
    assert torch.equal(torch.isfinite(applied), mask[: tok.vocab_size])
    forked = c.fork()
    assert forked.accept(tok.encode(' string="true">')[0]) and torch.equal(c.allowed_mask(), mask[: tok.vocab_size])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
        ({"tool_choice": "required"}, "at least one tool"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"response_format": {"type": "xml"}}, "response_format type"),
        ({"tools": [{"name": "flat"}]}, "tools\\[0\\]"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"required": ["x"]}}}]}, "required"),
    ],
)
def test_bad_requests_say_what_is_wrong(tok, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_constraint(tok, **kwargs)


def test_added_tokens_other_than_the_format_never_come_out(tok) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object", "properties": {
        "s": {"type": "string"}}, "required": ["s"]}}}
    c = build_constraint(tok, response_format=rf)
    assert _accepts(tok, c, '{"s": "inside a JSON string')
    mask = c.allowed_mask()
    added = tok.backend.get_added_tokens_decoder()
    allowed_added = {i for i in added if mask[i]}
    assert allowed_added == set()  # no role/task/placeholder token as string text (EOS only once JSON is complete)
    assert mask[tok.encode("abc")[0]]
    bitmask = allocate_bitmask(2, tok.vocab_size)
    c.fill_bitmask(bitmask, 1)
    logits = torch.zeros(2, tok.vocab_size)
    apply_bitmask(logits, bitmask)
    assert torch.equal(torch.isfinite(logits[1]), mask)
    c = build_constraint(tok, tools=TOOLS, tool_choice="required", thinking_mode="thinking")
    mask = c.allowed_mask()
    assert {i for i in added if mask[i]} == {tok.token_id("</think>")}  # reasoning may close, nothing else
    assert c.accept(tok.token_id("</think>")) and _accepts(tok, c, "\n\n<")
    assert {i for i in added if c.allowed_mask()[i]} == {tok.token_id("｜DSML｜")}


def test_background_compile_returns_none_until_the_grammar_is_ready(tok) -> None:
    from dsv4.chat.constraint import wait_for_background_compiles

    # a tool set no other test compiled, so the first call finds nothing ready
    tools = [{"type": "function", "function": {"name": f"bg_{id(tok)}", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}, "required": ["q"]}}}]
    first = build_constraint(tok, tools=tools, tool_choice="auto", background=True)
    wait_for_background_compiles(120)
    ready = build_constraint(tok, tools=tools, tool_choice="auto", background=True)
    assert first is None and ready is not None
    assert ready.accept_text(f'ok\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="bg_{id(tok)}">\n')
    assert not ready.accept_text('<｜DSML｜parameter name="n" string="false">')  # "q" is required first
