"""The tolerant/streaming parser on malformed model output: every failure class of issue 13, and the V4 DSML cases
that vLLM, SGLang and llama.cpp wrote tests for.

Every case is parsed whole, split at every point and fed character by character: the message must be the same and
no content or reasoning delta may hold a DSML token or the remains of a tag. Where a peer's expectation contradicts
the official encoder/parser, the official behaviour wins and the test says so.
"""

from __future__ import annotations

import json

import pytest

from dsv4.chat import StreamParser, parse_completion
from dsv4.chat.stream import Delta

EOS = "<｜end▁of▁sentence｜>"
DS = "｜DSML｜"
TOOLS = [
    {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
    for n in ("get_weather", "search", "get_time", "exec")
]
# remains of a DSML tag that must never reach content or reasoning
LEAKS = (DS, "｜", "<invoke", "<parameter", "</invoke", "</parameter", "tool_calls>", "invoke name=", 'string="')


def run(text: str, mode: str = "chat", tools: list | None = TOOLS, pieces: list[str] | None = None):
    parser, deltas = StreamParser(mode, tools=tools), []
    for piece in pieces if pieces is not None else [text]:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return parser, deltas


def parse_every_way(text: str, mode: str = "chat", tools: list | None = TOOLS) -> StreamParser:
    """The whole-text parse, after checking that every split and char-by-char feeding give the same result."""
    whole, deltas = run(text, mode, tools)
    ways = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
    for pieces in ways:
        parser, got = run(text, mode, tools, pieces)
        assert parser.message() == whole.message(), pieces
        assert parser.truncated == whole.truncated and parser.errors == whole.errors, pieces
        check_deltas(got, parser)
    check_deltas(deltas, whole)
    return whole


def check_deltas(deltas: list[Delta], parser: StreamParser) -> None:
    message = parser.message()
    for d in deltas:
        if d.kind in ("content", "reasoning"):
            assert not any(leak in d.text for leak in LEAKS), d
    assert "".join(d.text for d in deltas if d.kind == "content") == message["content"]
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == message["reasoning_content"]
    for i, call in enumerate(message["tool_calls"]):
        mine = [d for d in deltas if d.kind == "tool_call" and d.index == i]
        assert mine[0].name == call["function"]["name"]
        assert "".join(d.text for d in mine) == call["function"]["arguments"]


def calls(parser: StreamParser) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parser.message()["tool_calls"]]


def block(*invokes: str, opener: str = "\n\n") -> str:
    return f"{opener}<{DS}tool_calls>\n" + "\n".join(invokes) + f"\n</{DS}tool_calls>"


def invoke(name: str, *params: tuple[str, str, str | None]) -> str:
    body = "".join(
        f'<{DS}parameter name="{k}"' + (f' string="{s}"' if s is not None else "") + f">{v}</{DS}parameter>\n"
        for k, v, s in params
    )
    return f'<{DS}invoke name="{name}">\n{body}</{DS}invoke>'


WEATHER = invoke("get_weather", ("location", "Paris", "true"), ("days", "3", "false"))


# -- class 1: NaN / Infinity -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "[1, NaN]", '{"x": Infinity}'])
def test_nan_and_infinity_never_reach_the_arguments_as_non_json(value: str) -> None:
    text = block(invoke("get_weather", ("x", value, "false"))) + EOS
    parser = parse_every_way(text)
    # json.loads accepts the constants; a strict parse is what a client's JSON parser does
    arguments = parser.message()["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments, parse_constant=lambda c: pytest.fail(f"{c} in {arguments}")) == {"x": value}
    assert any("not JSON" in e for e in parser.errors)
    with pytest.raises(ValueError, match="not JSON"):
        parse_completion(text, "chat")


def test_overflowing_number_is_json_and_stays_as_written() -> None:
    parser = parse_every_way(block(invoke("get_weather", ("x", "1e999", "false"))) + EOS)
    assert parser.message()["tool_calls"][0]["function"]["arguments"] == '{"x": 1e999}' and parser.errors == []


# -- class 2: DSML outside a block ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_bare_invoke_without_block_opener_is_a_call(mode: str) -> None:
    think = "Need weather.</think>" if mode == "thinking" else ""
    parser = parse_every_way(f"{think}Let me check.\n{WEATHER}{EOS}", mode)
    assert parser.message()["content"] == "Let me check."  # the newline before the tag is markup
    assert calls(parser) == [("get_weather", {"location": "Paris", "days": 3})]
    assert any("without a block opener" in e for e in parser.errors)


def test_bare_invoke_in_reasoning_is_a_call_and_the_reasoning_goes_on() -> None:
    parser = parse_every_way(f"I will call it: {WEATHER} and then answer.</think>Done.{EOS}", "thinking")
    msg = parser.message()
    assert msg["reasoning_content"] == "I will call it: and then answer." and msg["content"] == "Done."
    assert calls(parser) == [("get_weather", {"location": "Paris", "days": 3})]


def test_bare_invoke_of_an_undeclared_tool_is_dropped_markup_not_a_call() -> None:
    parser = parse_every_way(f"See {invoke('rm_rf')} here.{EOS}")
    assert parser.message()["tool_calls"] == [] and parser.message()["content"] == "See \n here."
    assert any("stray DSML tag" in e for e in parser.errors)


@pytest.mark.parametrize("opener", [f"<{DS}tool_call>", f"<{DS}toolcalls>", f"<{DS}tool_calls", f"<{DS}>"])
def test_damaged_block_opener_is_dropped_whole_and_the_call_kept(opener: str) -> None:
    text = "Prose." + f"\n{opener}\n" + WEATHER + f"\n</{DS}tool_calls>{EOS}"
    parser = parse_every_way(text)
    assert parser.message()["content"].strip() == "Prose."
    assert calls(parser) == [("get_weather", {"location": "Paris", "days": 3})]


@pytest.mark.parametrize("tail", [f"<{DS}in", f"<{DS}", "<", f"<{DS}invoke name=\"get_wea", f"\n\n<{DS}tool_calls>\n"])
def test_output_cut_inside_an_opener_leaks_nothing(tail: str) -> None:
    parser = parse_every_way("Prose.\n" + tail)
    assert parser.message()["content"].rstrip("\n<") == "Prose." and parser.message()["tool_calls"] == []
    assert parser.truncated == []


def test_stray_closers_and_tags_in_content_are_dropped_whole() -> None:
    parser = parse_every_way(f"a</{DS}invoke>b<{DS}parameter name=\"x\" string=\"true\">c</{DS}tool_calls>d{EOS}")
    assert parser.message()["content"] == "abcd" and parser.message()["tool_calls"] == []


# -- class 3: missing string= ---------------------------------------------------------------------------------------


def test_parameter_without_string_attribute_is_inferred() -> None:
    text = block(invoke("get_weather", ("location", "Paris", None), ("days", "3", None), ("opts", '{"a": [1]}', None)))
    parser = parse_every_way(text + EOS)
    assert calls(parser) == [("get_weather", {"location": "Paris", "days": 3, "opts": {"a": [1]}})]
    assert any("no string=" in e for e in parser.errors)
    assert [k for k, _ in parser.problems].count("missing_string_attr") == 3


def test_missing_string_attribute_follows_a_string_schema() -> None:
    tools = [{"type": "function", "function": {"name": "mail", "parameters": {"type": "object", "properties": {
        "zip": {"type": "string"}, "code": {"type": "string"}, "count": {"type": "integer"}}}}}]
    text = block(invoke("mail", ("zip", "02134", None), ("code", "123", None), ("count", "4", None))) + EOS
    parser = parse_every_way(text, tools=tools)
    assert calls(parser) == [("mail", {"zip": "02134", "code": "123", "count": 4})]


# -- class 4: a second block -----------------------------------------------------------------------------------------


def test_second_block_calls_are_kept() -> None:
    text = "Both." + block(WEATHER) + block(invoke("search", ("q", "x", "true"))) + EOS
    parser = parse_every_way(text)
    assert calls(parser) == [("get_weather", {"location": "Paris", "days": 3}), ("search", {"q": "x"})]
    assert parser.message()["content"] == "Both." and any("second tool-call block" in e for e in parser.errors)


def test_text_after_a_block_is_content() -> None:
    parser = parse_every_way("A." + block(WEATHER) + "\nMore words." + EOS)
    assert parser.message()["content"] == "A.More words." and len(calls(parser)) == 1


# -- class 5: unclosed string parameter -----------------------------------------------------------------------------


def test_unclosed_string_value_ends_at_the_invoke_closer() -> None:
    text = (f'\n\n<{DS}tool_calls>\n<{DS}invoke name="get_weather">\n<{DS}parameter name="location" string="true">'
            f"Paris\n</{DS}invoke>\n</{DS}tool_calls>{EOS}")
    parser = parse_every_way(text)
    assert calls(parser) == [("get_weather", {"location": "Paris"})]
    assert any("not closed by </｜DSML｜parameter>" in e for e in parser.errors)


def test_unclosed_string_value_ends_at_the_next_parameter() -> None:
    text = (f'\n\n<{DS}tool_calls>\n<{DS}invoke name="get_weather">\n<{DS}parameter name="location" string="true">'
            f'Paris<{DS}parameter name="days" string="false">3</{DS}parameter>\n</{DS}invoke>\n</{DS}tool_calls>{EOS}')
    assert calls(parse_every_way(text)) == [("get_weather", {"location": "Paris", "days": 3})]


def test_closer_without_its_dsml_token_closes_the_value() -> None:
    # a text-mode proxy's test: the model wrote </parameter> without the DSML token, then the next tag
    text = (f'<{DS}tool_calls>\n<{DS}invoke name="exec">\n<{DS}parameter name="path">/tmp/a.txt</parameter>\n'
            f'<{DS}parameter name="content">line 1\nline 2</parameter>\n</{DS}invoke>\n</{DS}tool_calls>{EOS}')
    assert calls(parse_every_way(text)) == [("exec", {"path": "/tmp/a.txt", "content": "line 1\nline 2"})]
    # without a DSML tag after it, "</parameter>" is text of the value (XML in a file being written)
    value = "<a><parameter>x</parameter></a>"
    assert calls(parse_every_way(block(invoke("exec", ("content", value, "true"))) + EOS)) == [("exec", {"content": value})]


def test_string_value_with_markup_like_text_streams_whole() -> None:
    value = 'if a < b and c </ d: print("<x>")\n'
    parser = parse_every_way(block(invoke("exec", ("command", value, "true"))) + EOS)
    assert calls(parser) == [("exec", {"command": value})] and parser.errors == []


def test_no_partial_closer_is_streamed_into_a_string_value() -> None:
    text = block(invoke("exec", ("command", "ls", "true"))) + EOS
    for cut in range(len(text)):
        parser = StreamParser("chat", tools=TOOLS)
        deltas = parser.feed(text[:cut])
        args = "".join(d.text for d in deltas if d.kind == "tool_call")
        assert "｜" not in args and "<" not in args and not args.endswith("\\n"), (cut, args)


# -- class 6: an opener quoted in the reasoning ----------------------------------------------------------------------


@pytest.mark.parametrize("opener", [f"\n\n<{DS}tool_calls>", f"<{DS}tool_calls>", f"<{DS}function_calls>"])
def test_quoted_opener_not_followed_by_an_invoke_does_not_swallow_the_answer(opener: str) -> None:
    text = f"I could write a {opener} block, but no.</think>The answer is 4.{EOS}"
    parser = parse_every_way(text, "thinking")
    msg = parser.message()
    assert msg["content"] == "The answer is 4." and msg["tool_calls"] == []
    assert msg["reasoning_content"].replace("\n", "") == "I could write a  block, but no."
    assert any("not followed by an invoke" in e for e in parser.errors)


# -- class 7: V3.2 JSON body and self-closing invoke -----------------------------------------------------------------


def test_v32_json_body_is_read() -> None:
    # SGLang's MTP streaming test writes this V3.2 form inside a function_calls block
    text = (f'\n\n<{DS}function_calls>\n<{DS}invoke name="get_weather">{{"location": "杭州"}}</{DS}invoke>\n'
            f"</{DS}function_calls>{EOS}")
    parser = parse_every_way(text)
    assert calls(parser) == [("get_weather", {"location": "杭州"})]
    assert any("V3.2" in e for e in parser.errors)


def test_json_body_that_is_not_an_object_keeps_its_text() -> None:
    text = block(f'<{DS}invoke name="get_weather">{{"location": </{DS}invoke>') + EOS
    assert calls(parse_every_way(text)) == [("get_weather", {"arguments": '{"location":'})]


def test_self_closing_invoke_is_a_call_without_arguments() -> None:
    text = block(f'<{DS}invoke name="get_time"/>', WEATHER) + EOS
    parser = parse_every_way(text)
    assert calls(parser) == [("get_time", {}), ("get_weather", {"location": "Paris", "days": 3})]


# -- class 8: cut by max_tokens -------------------------------------------------------------------------------------


def test_call_cut_inside_a_string_value_is_not_a_valid_call() -> None:
    text = "Checking." + block(WEATHER)
    cut = text.index("Paris") + 3
    parser = parse_every_way(text[:cut])
    assert parser.truncated == [0]
    arguments = parser.message()["tool_calls"][0]["function"]["arguments"]
    assert arguments == '{"location": "Par'
    with pytest.raises(ValueError):
        json.loads(arguments)
    assert any("cut off" in e for e in parser.errors)


def test_call_cut_inside_a_non_string_value_keeps_the_partial_text() -> None:
    text = block(invoke("get_weather", ("location", "Paris", "true"), ("opts", '{"a": [1, 2]}', "false")))
    cut = text.index("[1,") + 3
    parser = parse_every_way(text[:cut])
    assert parser.message()["tool_calls"][0]["function"]["arguments"] == '{"location": "Paris", "opts": {"a": [1,'
    assert parser.truncated == [0]


def test_eos_inside_a_call_closes_it() -> None:
    # The model chose to stop: what it wrote is complete, only the closers are missing.
    text = f'\n\n<{DS}tool_calls>\n<{DS}invoke name="search">\n<{DS}parameter name="q" string="true">abc{EOS}'
    parser = parse_every_way(text)
    assert calls(parser) == [("search", {"q": "abc"})] and parser.truncated == []


# -- peers' V4 cases --------------------------------------------------------------------------------------------------


def test_vllm_v4_cases() -> None:
    # vllm tests/tool_parsers/test_deepseekv4_tool_parser.py: content before the block, params, chunked streaming
    text = "Let me check. " + block(invoke("get_weather", ("location", "Beijing", "true"), ("unit", "celsius", "true")),
                                    opener="")
    parser = parse_every_way(text + EOS)
    assert parser.message()["content"] == "Let me check. "
    assert calls(parser) == [("get_weather", {"location": "Beijing", "unit": "celsius"})]
    # vLLM expects a `function_calls` block to be left as content, markup and all. The official parser puts
    # nothing of DSML in the content (it rejects special tokens there), and DSML never reaches a client here: the
    # V3.2 block is read as a block.
    v32 = block(invoke("search", ("query", "vllm", "true")), opener="").replace("tool_calls", "function_calls")
    assert calls(parse_every_way(v32 + EOS)) == [("search", {"query": "vllm"})]


def test_vllm_v32_cases_that_follow_the_official_decoder() -> None:
    # vllm test_deepseekv32_tool_parser.py: no params, several invokes, typed values.
    text = block(f'<{DS}invoke name="get_time">\n</{DS}invoke>',
                 invoke("search", ("count", "42", "false"), ("flag", "true", "false"), ("x", "null", "false")))
    assert calls(parse_every_way(text + EOS)) == [("get_time", {}), ("search", {"count": 42, "flag": True, "x": None})]
    # vLLM coerces string="true" "42" to 42 by the tool schema; the official decoder keeps string="true" values
    # strings, and so does dsv4.
    assert calls(parse_every_way(block(invoke("search", ("value", "42", "true"))) + EOS)) == [("search", {"value": "42"})]
    # vLLM turns string="false" `hello` into "hello"; dsv4 too (passed on as a string, with an error)
    parser = parse_every_way(block(invoke("search", ("label", "hello", "false"))) + EOS)
    assert calls(parser) == [("search", {"label": "hello"})] and parser.errors


def test_text_mode_proxy_bare_invokes() -> None:
    # cases from agent proxies' parser tests: bare invokes, parameters without string=, no newlines, no block
    text = (f'<{DS}invoke name="exec">\n<{DS}parameter name="command">grep foo .</{DS}parameter>\n</{DS}invoke>'
            f"{EOS}")
    parser = parse_every_way(text)
    assert calls(parser) == [("exec", {"command": "grep foo ."})] and parser.message()["content"] == ""
    text = f'<{DS}invoke name="search"><{DS}parameter name="sql">SELECT 1;</{DS}parameter></{DS}invoke>{EOS}'
    assert calls(parse_every_way(text)) == [("search", {"sql": "SELECT 1;"})]


def test_think_end_and_block_in_one_chunk() -> None:
    # SGLang's MTP case: "</think>" and the whole block arrive in one delta
    text = "Think." + "</think>" + block(WEATHER) + EOS
    parser, _ = run(text, "thinking", pieces=["Think.", text[len("Think."):]])
    assert calls(parser) == [("get_weather", {"location": "Paris", "days": 3})] and parser.errors == []


def test_sglang_v4_cases() -> None:
    # sglang test_deepseekv4_detector streaming tests: prose before a bare invoke, two tool_calls sections without
    # a blank line, a JSON body between newlines, a partial non-string value that still names the call
    weather = lambda city: block(invoke("get_weather", ("city", city, "true")), opener="")  # noqa: E731
    parser = parse_every_way("Checking.\n" + invoke("get_weather", ("city", "SF", "true")))
    # no EOS, but the invoke is closed: a complete call
    assert parser.message()["content"] == "Checking." and calls(parser) == [("get_weather", {"city": "SF"})]
    parser = parse_every_way(weather("SF") + "\n" + weather("NY") + EOS)
    assert calls(parser) == [("get_weather", {"city": "SF"}), ("get_weather", {"city": "NY"})]
    body = block(f'<{DS}invoke name="search">\n{{"command": "ls"}}\n</{DS}invoke>') + EOS
    assert calls(parse_every_way(body)) == [("search", {"command": "ls"})]
    cut = f'<{DS}tool_calls>\n<{DS}invoke name="get_weather">\n<{DS}parameter name="city" string="false">{{"a"'
    parser = parse_every_way(cut)
    assert parser.message()["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": {"a"'}
    assert parser.truncated == [0]
    # SGLang unwraps a spurious {"arguments": {...}} wrapper by the tool schema. The official decoder returns the
    # parameters the model wrote, and so does dsv4 (guessing by schema could drop a real parameter).
    wrapped = block(invoke("search", ("arguments", '{"path": "/x"}', "false"))) + EOS
    assert calls(parse_every_way(wrapped)) == [("search", {"arguments": {"path": "/x"}})]
