"""Strict parsing (official semantics), streaming == strict at every split, round trips, and the tolerant mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dsv4.chat import StreamParser, encode_messages, parse_completion
from tests.chat.chat_fixtures import tok  # noqa: F401  (fixture)

FIXTURES = Path(__file__).parent / "fixtures"
EOS = "<｜end▁of▁sentence｜>"
DS = "｜DSML｜"


def _turns_of_golden(n: int, mode: str) -> list[str]:
    """Each assistant turn of golden case n, as the completion text the model wrote."""
    gold = (FIXTURES / f"test_output_{n}.txt").read_text()
    marker = "<｜Assistant｜>" + ("<think>" if mode == "thinking" else "</think>")
    turns = []
    for chunk in gold.split(marker)[1:]:
        chunk = chunk.removeprefix("<｜action｜>")  # the task token belongs to the prompt
        turns.append(chunk[: chunk.index(EOS) + len(EOS)])
    return turns


def test_strict_parse_of_golden_case_1() -> None:
    first, last = _turns_of_golden(1, "thinking")
    msg = parse_completion(first, "thinking")
    assert msg["reasoning_content"] == "The user wants to know the weather in Beijing. I should use the get_weather tool."
    assert msg["content"] == ""
    assert msg["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Beijing", "unit": "celsius"}'}}
    ]
    final = parse_completion(last, "thinking")
    assert final["reasoning_content"] == "Got the weather data. Let me format a nice response."
    assert "22°C" in final["content"] and final["tool_calls"] == []


def test_strict_parse_of_golden_case_2_and_3() -> None:
    last = _turns_of_golden(2, "thinking")[-1]
    assert parse_completion(last, "thinking") == {
        "role": "assistant",
        "content": "The capital of France is Paris.",
        "reasoning_content": "The user asks about the capital of France. It is Paris.",
        "tool_calls": [],
    }
    first = _turns_of_golden(3, "thinking")[0]
    call = parse_completion(first, "thinking")["tool_calls"][0]["function"]
    assert call == {"name": "search", "arguments": '{"queries": "小柴胡冲剂 布洛芬 相互作用 一起吃"}'}


@pytest.mark.parametrize(
    ("text", "mode", "problem"),
    [
        ("abc" + EOS, "thinking", "no </think>"),
        ("abc", "chat", "does not end with"),
        ("a" + EOS + "b", "chat", "after <｜end▁of▁sentence｜>"),
        ("a<think>b" + EOS, "chat", "special token"),
        (f"\n\n<{DS}tool_calls>\n<{DS}invoke name=\"f\">\n<{DS}parameter name=\"x\" string=\"false\">{{bad</{DS}parameter>\n"
         f"</{DS}invoke>\n</{DS}tool_calls>{EOS}", "chat", "not JSON"),
        (f"\n\n<{DS}tool_calls>\n<{DS}invoke name=\"f\">\n", "chat", "not closed"),
        (f"\n\n<{DS}tool_calls>\n<{DS}invoke name=\"f\">\n<{DS}parameter name=\"x\" string=\"true\">1</{DS}parameter>\n"
         f"<{DS}parameter name=\"x\" string=\"true\">2</{DS}parameter>\n</{DS}invoke>\n</{DS}tool_calls>{EOS}",
         "chat", "repeats parameter"),
    ],
)
def test_strict_parse_rejects_malformed_output(text: str, mode: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_completion(text, mode)
    # the tolerant mode recovers instead and names a problem
    assert parse_completion(text, mode, strict=False)["errors"]


# -- round trips --------------------------------------------------------------------------------------------------

# No fullwidth bar: every special token and DSML tag contains "｜", so none can appear by chance.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="｜"), max_size=40)
KEYS = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
SCALARS = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False) | TEXT
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
                      max_leaves=6)
CALLS = st.lists(
    st.tuples(st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_.-]{0,12}", fullmatch=True), st.dictionaries(KEYS, VALUES, max_size=4)),
    max_size=3,
)


def _completion(mode: str, content: str, reasoning: str, calls: list) -> tuple[dict, str]:
    assistant = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        assistant["tool_calls"] = [
            {"type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls
        ]
    prefix = encode_messages([{"role": "user", "content": "Q"}], mode)
    full = encode_messages([{"role": "user", "content": "Q"}, assistant], mode)
    assert full.startswith(prefix)
    return assistant, full[len(prefix):]


def _check_same(parsed: dict, mode: str, content: str, reasoning: str, calls: list) -> None:
    assert parsed["content"] == content
    assert parsed["reasoning_content"] == (reasoning if mode == "thinking" else "")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed["tool_calls"]] == calls


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["chat", "thinking"]), content=TEXT, reasoning=TEXT, calls=CALLS, data=st.data())
def test_round_trip_and_streaming_equals_strict(mode: str, content: str, reasoning: str, calls: list, data) -> None:
    assume("<think>" not in content + reasoning and "</think>" not in content + reasoning)
    _, text = _completion(mode, content, reasoning, calls)
    strict = parse_completion(text, mode)
    _check_same(strict, mode, content, reasoning, calls)
    assert parse_completion(text, mode, strict=False) == {**strict, "errors": []}
    # streamed in random pieces: same message, and the deltas concatenate to it
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=12)))
    parser, deltas, last = StreamParser(mode), [], 0
    for cut in [*cuts, len(text)]:
        deltas += parser.feed(text[last:cut])
        last = cut
    deltas += parser.finish()
    assert parser.errors == [] and parser.message() == strict
    assert "".join(d.text for d in deltas if d.kind == "content") == strict["content"]
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == strict["reasoning_content"]
    for i, call in enumerate(strict["tool_calls"]):
        mine = [d for d in deltas if d.kind == "tool_call" and d.index == i]
        assert mine[0].name == call["function"]["name"] and all(d.name is None for d in mine[1:])
        assert "".join(d.text for d in mine) == call["function"]["arguments"]


def _fixed_texts() -> list[tuple[str, str]]:
    texts = [(t, "thinking") for n in (1, 2, 3) for t in _turns_of_golden(n, "thinking")]
    texts += [(t, "chat") for t in _turns_of_golden(4, "chat")]
    _, mixed = _completion(
        "chat", "Let me check.\n\n", "", [("f", {"a": "x</y>\n\"q\"", "n": [1, {"k": None}]}), ("g", {})]
    )
    return [*texts, (mixed, "chat")]


@pytest.mark.parametrize(("text", "mode"), _fixed_texts(), ids=lambda v: str(len(v)) if len(v) > 9 else v)
def test_streaming_equals_strict_at_every_split(text: str, mode: str) -> None:
    strict = parse_completion(text, mode)
    for cut in range(len(text) + 1):
        parser = StreamParser(mode)
        parser.feed(text[:cut])
        parser.feed(text[cut:])
        parser.finish()
        assert parser.message() == strict and parser.errors == [], cut


@pytest.mark.parametrize(("text", "mode"), _fixed_texts(), ids=lambda v: str(len(v)) if len(v) > 9 else v)
def test_streaming_token_by_token(text: str, mode: str, tok) -> None:
    ids = tok.encode(text)
    detok, parser, deltas = tok.detokenizer(), StreamParser(mode), []
    for token_id in ids:
        piece = detok.add(token_id)
        deltas += parser.feed(piece)
        for d in deltas:
            if d.kind in ("content", "reasoning"):
                assert "｜" not in d.text and "<think>" not in d.text and "</think>" not in d.text
    deltas += parser.feed(detok.finish()) + parser.finish()
    assert parser.message() == parse_completion(text, mode) and parser.errors == []


# -- tolerant mode ------------------------------------------------------------------------------------------------

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
BLOCK = (
    f"\n\n<{DS}tool_calls>\n<{DS}invoke name=\"get_weather\">\n"
    f"<{DS}parameter name=\"location\" string=\"true\">Paris</{DS}parameter>\n"
    f"<{DS}parameter name=\"days\" string=\"false\">3</{DS}parameter>\n</{DS}invoke>\n</{DS}tool_calls>"
)
ARGS = '{"location": "Paris", "days": 3}'


def test_tolerant_missing_think_end_keeps_the_tool_calls() -> None:
    out = parse_completion("I should call the tool." + BLOCK + EOS, "thinking", strict=False)
    assert out["reasoning_content"] == "I should call the tool." and out["content"] == ""
    assert out["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ARGS}
    assert any("</think>" in e for e in out["errors"])


def test_tolerant_missing_think_end_without_tools() -> None:
    out = parse_completion("just thinking" + EOS, "thinking", strict=False)
    assert out["reasoning_content"] == "just thinking" and out["content"] == ""
    assert any("</think>" in e for e in out["errors"])


def test_tolerant_block_without_blank_line_keeps_markup_out_of_content() -> None:
    out = parse_completion("Sure." + BLOCK.lstrip("\n") + EOS, "chat", strict=False)
    assert out["content"] == "Sure." and out["tool_calls"][0]["function"]["arguments"] == ARGS
    assert any("blank line" in e for e in out["errors"])


@pytest.mark.parametrize("cut", range(len("Hi." + BLOCK) - 60, len("Hi." + BLOCK), 7))
def test_tolerant_truncated_call_is_never_a_valid_call(cut: int) -> None:
    # Cut by max_tokens (no EOS): a call still open keeps the partial JSON the model wrote, which no client can
    # parse, so an agent cannot run the tool with invented arguments; a call already closed stays valid.
    text = ("Hi." + BLOCK)[:cut]
    parser = StreamParser("chat")
    parser.feed(text)
    parser.finish()
    out = parser.message()
    assert out["content"] == "Hi." and parser.errors
    invoke_closed = text.count(f"</{DS}invoke>") == 1
    assert parser.truncated == ([] if invoke_closed else [0])
    for i, call in enumerate(out["tool_calls"]):
        if i in parser.truncated:
            assert '"Paris' not in call["function"]["arguments"] or call["function"]["arguments"].startswith("{")
            with pytest.raises(ValueError):
                json.loads(call["function"]["arguments"])
        else:
            assert json.loads(call["function"]["arguments"]) == json.loads(ARGS)
    assert all("｜" not in out[k] for k in ("content", "reasoning_content"))


def test_tolerant_truncated_string_value_keeps_the_prefix() -> None:
    text = f"\n\n<{DS}tool_calls>\n<{DS}invoke name=\"get_weather\">\n<{DS}parameter name=\"location\" string=\"true\">Par"
    out = parse_completion(text, "chat", strict=False)
    assert out["tool_calls"][0]["function"]["arguments"] == '{"location": "Par'
    assert any("cut off" in e for e in out["errors"])


def test_tolerant_bad_json_becomes_a_string() -> None:
    text = BLOCK.replace(">3<", ">three days<") + EOS
    out = parse_completion(text, "chat", strict=False)
    assert json.loads(out["tool_calls"][0]["function"]["arguments"]) == {"location": "Paris", "days": "three days"}
    assert any("not JSON" in e for e in out["errors"])


def test_tolerant_unknown_tool_is_dropped() -> None:
    text = BLOCK.replace("get_weather", "launch_rockets") + EOS
    out = parse_completion(text, "chat", strict=False, tools=WEATHER)
    assert out["tool_calls"] == [] and any("launch_rockets" in e and "get_weather" in e for e in out["errors"])
    ok = parse_completion(BLOCK + EOS, "chat", strict=False, tools=WEATHER)
    assert ok["errors"] == [] and len(ok["tool_calls"]) == 1


def test_tolerant_drops_special_tokens_from_content() -> None:
    out = parse_completion("a<｜User｜>b</think>c" + EOS + "junk", "chat", strict=False)
    assert out["content"] == "abc"
    assert len(out["errors"]) == 3


# Pieces of V4 output, well-formed or not, glued in any order: what a weak or cut-off model can produce.
PIECES = st.sampled_from([
    "</think>", "<think>", EOS, "<｜begin▁of▁sentence｜>", "<｜User｜>", "\n\n", "\n", ">", "<", "/", '"', "｜", DS,
    f"\n\n<{DS}tool_calls>\n", f"<{DS}tool_calls>", f"</{DS}tool_calls>", f'<{DS}invoke name="get_weather">\n',
    f'<{DS}invoke name="other">\n', f"</{DS}invoke>\n", f"</{DS}invoke>", f'<{DS}parameter name="a" string="true">',
    f'<{DS}parameter name="b" string="false">', f"</{DS}parameter>\n", f"</{DS}parameter>", "[1, 2]", "{bad", "text",
])


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.one_of(PIECES, TEXT), max_size=25), mode=st.sampled_from(["chat", "thinking"]),
       cuts=st.lists(st.integers(0, 400), max_size=8))
def test_tolerant_parser_never_raises_or_leaks_markup(pieces: list[str], mode: str, cuts: list[int]) -> None:
    text = "".join(pieces)
    parser, last = StreamParser(mode, tools=WEATHER), 0
    deltas = []
    for cut in sorted(c for c in cuts if c <= len(text)) + [len(text)]:
        deltas += parser.feed(text[last:cut])
        last = cut
    deltas += parser.finish()
    message = parser.message()
    for key in ("content", "reasoning_content"):
        for token in ("<think>", "</think>", EOS, "<｜begin▁of▁sentence｜>", "<｜User｜>", DS):
            assert token not in message[key], (key, token, message[key])
    for i, call in enumerate(message["tool_calls"]):
        assert call["function"]["name"] == "get_weather"
        if i not in parser.truncated:
            json.loads(call["function"]["arguments"])
    # the deltas carry exactly the message
    assert "".join(d.text for d in deltas if d.kind == "content") == message["content"]
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == message["reasoning_content"]
    whole = parse_completion(text, mode, strict=False, tools=WEATHER)
    assert {k: v for k, v in whole.items() if k != "errors"} == message
