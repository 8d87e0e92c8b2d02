"""Property tests of the streaming parser on valid V4 outputs and on generated malformed variants of them.

For any text (the tolerant parser accepts every text): split at every point, fed character by character and fed
token by token, the parser gives the same message, the same cut-off calls and the same problems as the whole-text
parse; no content or reasoning delta holds a DSML token, a special token or the remains of a DSML tag; every call that was not cut
off has JSON arguments (NaN and Infinity refused). The variants are what broken decoding produces: truncations,
dropped tokens, duplicated blocks, markup quoted in prose, and DSML pieces glued in.
"""

from __future__ import annotations

import json
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dsv4.chat import StreamParser, encode_messages, parse_completion
from dsv4.chat.parser import FORBIDDEN_IN_TEXT
from tests.chat.chat_fixtures import shared_tokenizer

DS = "｜DSML｜"
EOS = "<｜end▁of▁sentence｜>"
NAMES = ["get_weather", "search"]
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in NAMES]
# No fullwidth bar and no "<think>" in generated prose: every special token and DSML tag contains one of them.
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="｜"), max_size=16).filter(
    lambda t: "think>" not in t
)
KEYS = st.sampled_from(["a", "city", "n"])
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-99, 99), TEXT, st.lists(st.integers(0, 9), max_size=2))
CALLS = st.lists(st.tuples(st.sampled_from(NAMES), st.dictionaries(KEYS, VALUES, max_size=2)), max_size=2)
# DSML-ish pieces a broken model writes in the middle of anything
QUOTED = st.sampled_from([
    f"<{DS}tool_calls>", f"\n\n<{DS}tool_calls>\n", f"</{DS}tool_calls>", f'<{DS}invoke name="get_weather">\n',
    f'<{DS}invoke name="search"/>', f'<{DS}invoke name="other">', f"</{DS}invoke>", f'<{DS}parameter name="a">',
    f'<{DS}parameter name="n" string="false">', f"</{DS}parameter>", f"<{DS}", DS, "<", "</", "\n", EOS, "</think>",
    '{"a": 1}', "NaN",
])
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def completion(mode: str, content: str, reasoning: str, calls: list) -> str:
    assistant = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        assistant["tool_calls"] = [
            {"type": "function", "function": {"name": n, "arguments": json.dumps(a)}} for n, a in calls
        ]
    prefix = encode_messages([{"role": "user", "content": "Q"}], mode)
    return encode_messages([{"role": "user", "content": "Q"}, assistant], mode)[len(prefix):]


@st.composite
def variants(draw) -> tuple[str, str]:
    mode = draw(st.sampled_from(["chat", "thinking"]))
    text = completion(mode, draw(TEXT), draw(TEXT), draw(CALLS))
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["truncate", "drop_token", "duplicate_block", "quote", "cut_piece"]))
        if kind == "truncate":
            text = text[: draw(st.integers(0, len(text)))]
        elif kind in ("drop_token", "cut_piece"):  # whole tokens: a model never writes half a special token
            ids = shared_tokenizer().encode(text)
            if ids:
                at = draw(st.integers(0, len(ids) - 1))
                del ids[at: at + (1 if kind == "drop_token" else draw(st.integers(2, 6)))]
            text = shared_tokenizer().decode(ids)
        elif kind == "duplicate_block" and f"\n\n<{DS}tool_calls>" in text and f"</{DS}tool_calls>" in text:
            start = text.index(f"\n\n<{DS}tool_calls>")
            end = text.index(f"</{DS}tool_calls>") + len(f"</{DS}tool_calls>")
            text = text[:end] + text[start:end] + text[end:]
        elif kind == "quote":  # markup quoted into the prose, or anywhere else
            at = draw(st.integers(0, len(text)))
            text = text[:at] + draw(QUOTED) + text[at:]
    return text, mode


def feed(text_pieces: list[str], mode: str) -> tuple[StreamParser, list]:
    parser, deltas = StreamParser(mode, tools=TOOLS), []
    for piece in text_pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return parser, deltas


def residue(text: str) -> str:
    """The input without its DSML tags and special tokens: only what is here may show in content or reasoning."""
    for token in FORBIDDEN_IN_TEXT:  # (a placeholder, so that no token forms where one was cut out)
        text = text.replace(token, "\x00") if token != DS else text
    return re.sub(rf"(\n*</?|/)?{DS}[^<>｜]*>?", "", text)


def check(parser: StreamParser, deltas: list, text: str, whole: StreamParser) -> None:
    assert parser.message() == whole.message(), text
    assert parser.truncated == whole.truncated and parser.problems == whole.problems, text
    plain = residue(text)
    for d in deltas:
        if d.kind in ("content", "reasoning"):
            assert not any(token in d.text for token in FORBIDDEN_IN_TEXT), (d, text)
            for probe in ('name="', 'string="', "<invoke", "<parameter", "tool_calls", "</"):
                assert probe not in d.text or probe in plain, (probe, d, text)
    message = parser.message()
    assert "".join(d.text for d in deltas if d.kind == "content") == message["content"]
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == message["reasoning_content"]
    for i, call in enumerate(message["tool_calls"]):
        mine = [d for d in deltas if d.kind == "tool_call" and d.index == i]
        assert mine[0].name == call["function"]["name"] in NAMES
        assert "".join(d.text for d in mine) == call["function"]["arguments"]
        if i not in parser.truncated:
            json.loads(call["function"]["arguments"], parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


# found by hypothesis: a closing tag that carries the opener's attributes (its name="..." must not reach content)
DAMAGED_CLOSER = (f'\n\n<{DS}<{DS}tool_calls>tool_calls>\n<{DS}invoke name="get_weather">\n<{DS}parameter name="a" '
                  f'string="false">null</{DS}parameter>\n</{DS}invoke name="get_weather">\n\n</{DS}invoke>\n'
                  f"</{DS}tool_calls>{EOS}")


@SETTINGS
@given(variant=variants())
@example(variant=(DAMAGED_CLOSER, "chat"))
@example(variant=(DAMAGED_CLOSER.replace("invoke name", "tool_calls name", 2)[:-len(EOS)], "thinking"))
def test_every_split_and_char_by_char_equals_the_whole_text(variant: tuple[str, str]) -> None:
    text, mode = variant
    whole, deltas = feed([text], mode)
    check(whole, deltas, text, whole)
    tolerant = parse_completion(text, mode, strict=False, tools=TOOLS)
    assert {k: v for k, v in tolerant.items() if k != "errors"} == whole.message()
    for cut in range(len(text) + 1):
        parser, deltas = feed([text[:cut], text[cut:]], mode)
        check(parser, deltas, text, whole)
    parser, deltas = feed(list(text), mode)
    check(parser, deltas, text, whole)


@SETTINGS
@given(variant=variants())
def test_token_by_token_equals_the_whole_text(variant: tuple[str, str]) -> None:
    text, mode = variant
    tok = shared_tokenizer()
    whole, _ = feed([text], mode)
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in tok.encode(text)] + [detok.finish()]
    assert "".join(pieces) == text
    parser, deltas = feed(pieces, mode)
    check(parser, deltas, text, whole)


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(["chat", "thinking"]), content=TEXT, reasoning=TEXT, calls=CALLS)
def test_valid_output_streams_to_the_strict_parse_without_problems(mode: str, content: str, reasoning: str,
                                                                   calls: list) -> None:
    text = completion(mode, content, reasoning, calls)
    strict = parse_completion(text, mode)
    for cut in range(0, len(text) + 1, 3):
        parser, _ = feed([text[:cut], text[cut:]], mode)
        assert parser.message() == strict and parser.problems == [] and parser.truncated == []
