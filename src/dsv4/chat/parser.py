"""Model output -> assistant message: the official strict parser, and a tolerant one for malformed output.

`parse_completion(text, thinking_mode)` reads the completion text that follows the prompt (generation prompt
excluded, final `<｜end▁of▁sentence｜>` included) the way `parse_message_from_completion_text` of the official
`encoding_dsv4.py` does (spec chat-encoding.md section 5):

    thinking mode:  {reasoning}</think>{content}[{block}]<｜end▁of▁sentence｜>
    chat mode:      {content}[{block}]<｜end▁of▁sentence｜>
    block:          \\n\\n<｜DSML｜tool_calls>\\n<｜DSML｜invoke name="f">\\n...</｜DSML｜tool_calls>

Tool-call arguments come back as a JSON object string: `string="true"` values JSON-quoted, others inserted as
written. Malformed output raises `ValueError` naming the problem. Differences from the official parser, all on
output it would either reject or turn into something a client cannot use: a non-string parameter whose value is not
JSON raises (the official parser returns invalid JSON arguments; NaN and Infinity count as not JSON, although
Python's `json.loads` takes them), a tool-call block or invoke that is not closed
raises (the official parser returns the cut-off call as if complete), and the role tokens `<｜User｜>`,
`<｜Assistant｜>`, `<｜latest_reminder｜>` are rejected in content and reasoning like the other special tokens.

`parse_completion(text, thinking_mode, strict=False, tools=...)` never raises: it runs the streaming parser
(stream.py) over the whole text and returns what it recovered plus `"errors"`, a list of plain-language problems
(missing `</think>`, a cut-off tool call, bad JSON in a non-string parameter, an unknown tool name, DSML outside a
block, ...). On well-formed output both modes return the same message and `errors == []`. A call the output cut off
(no EOS) keeps the partial arguments the model wrote, which are not valid JSON: it must not be run.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .encoding import TOOL_CALLS_START, to_json
from .tokenizer import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, THINK_END, THINK_START, USER

TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_START = f"<{DSML}invoke"
INVOKE_END = f"</{DSML}invoke"
PARAM_START = f"<{DSML}parameter"
# The official parser stops at "/｜DSML｜parameter" and requires the "<" before it as the end of the value.
PARAM_STOP = f"/{DSML}parameter"
# Never part of content or reasoning text.
FORBIDDEN_IN_TEXT = (BOS, EOS, THINK_START, THINK_END, DSML, USER, ASSISTANT, LATEST_REMINDER)

# The official regexes end in `$`, which also matches before one final "\n" (a call without parameters renders
# its header as ` name="f">\n\n`); the optional "\n" keeps that with fullmatch.
INVOKE_HEADER = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)
PARAM_BODY = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.DOTALL)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """`json.loads` that refuses NaN, Infinity and -Infinity: Python accepts them, no JSON parser of a client does.
    (An overflowing number such as 1e999 is valid JSON syntax and passes.)"""
    return json.loads(text, parse_constant=_no_constant)


def _read_until(text: str, index: int, stops: list[str]) -> tuple[int, str, str | None]:
    """(index after the earliest stop, text before it, the stop) or (len(text), rest, None) if none occurs."""
    best, found = len(text), None
    for stop in stops:
        pos = text.find(stop, index)
        if pos != -1 and pos < best:
            best, found = pos, stop
    if found is None:
        return len(text), text[index:], None
    return best + len(found), text[index:best], found


def arguments_json(params: list[tuple[str, str, bool]]) -> str:
    """DSML parameters (name, value text, is_string) -> the arguments JSON string, as the official decoder builds it."""
    return "{" + ", ".join(f"{to_json(k)}: {to_json(v) if s else v}" for k, v, s in params) + "}"


def _parse_tool_calls(text: str, index: int) -> tuple[int, str | None, list[dict[str, str]]]:
    calls: list[dict[str, str]] = []
    stop: str | None = None
    while index < len(text):
        index, between, stop = _read_until(text, index, [INVOKE_START, TOOL_CALLS_END])
        if between != ">\n":
            raise ValueError(f"malformed tool-call block: expected '>\\n' before the next tag, got {between!r}")
        if stop == TOOL_CALLS_END:
            break
        if stop is None:
            raise ValueError("tool-call block is not closed with </｜DSML｜tool_calls>")
        index, header, stop = _read_until(text, index, [PARAM_START, INVOKE_END])
        match = INVOKE_HEADER.fullmatch(header)
        if match is None:
            raise ValueError(f"malformed <｜DSML｜invoke> header {header!r}; expected ' name=\"TOOL\">\\n'")
        name = match.group(1)
        params: list[tuple[str, str, bool]] = []
        while stop == PARAM_START:
            index, body, stop = _read_until(text, index, [PARAM_STOP])
            match = PARAM_BODY.fullmatch(body)
            if match is None:
                raise ValueError(f"malformed <｜DSML｜parameter> in tool call {name!r}: {body[:200]!r}")
            key, flag, value = match.groups()
            if any(key == k for k, _, _ in params):
                raise ValueError(f"tool call {name!r} repeats parameter {key!r}")
            if flag == "false":
                try:
                    loads_strict(value)
                except ValueError as err:
                    raise ValueError(
                        f"tool call {name!r}: parameter {key!r} is marked string=\"false\" but {value[:200]!r} is not "
                        f"JSON ({err})"
                    ) from None
            params.append((key, value, flag == "true"))
            index, between, stop = _read_until(text, index, [PARAM_START, INVOKE_END])
            if between != ">\n":
                raise ValueError(f"malformed tool call {name!r}: expected '>\\n' after a parameter, got {between!r}")
        if stop is None:
            # NOTE: the official parser returns such a cut-off call as if complete; a client must not run it.
            raise ValueError(f"tool call {name!r} is not closed with </｜DSML｜invoke>")
        calls.append({"name": name, "arguments": arguments_json(params)})
    if stop != TOOL_CALLS_END:
        raise ValueError("tool-call block is not closed with </｜DSML｜tool_calls>")
    return index, stop, calls


def _openai_calls(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def parse_completion_strict(text: str, thinking_mode: str) -> dict[str, Any]:
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    index, reasoning, calls = 0, "", []
    if thinking_mode == "thinking":
        index, reasoning, stop = _read_until(text, index, [THINK_END, TOOL_CALLS_START])
        if stop != THINK_END:
            raise ValueError("thinking-mode output has no </think>: the reasoning was never closed")
    index, content, stop = _read_until(text, index, [EOS, TOOL_CALLS_START])
    if stop == TOOL_CALLS_START:
        index, stop, calls = _parse_tool_calls(text, index)
        index, trailing, stop = _read_until(text, index, [EOS])
        if trailing:
            raise ValueError(f"unexpected text after the tool-call block: {trailing[:200]!r}")
    elif stop != EOS:
        raise ValueError("output does not end with <｜end▁of▁sentence｜> (cut off by a length limit?)")
    if index != len(text):
        raise ValueError(f"unexpected text after <｜end▁of▁sentence｜>: {text[index:index + 200]!r}")
    for token in FORBIDDEN_IN_TEXT:
        for field, value in (("content", content), ("reasoning", reasoning)):
            if token in value:
                raise ValueError(f"special token {token!r} inside the {field}")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": _openai_calls(calls)}


def parse_completion(
    text: str, thinking_mode: str = "chat", strict: bool = True, tools: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """`{"role", "content", "reasoning_content", "tool_calls"}` (+ `"errors"` when `strict=False`).

    `tools` (OpenAI tool dicts) is used only by the tolerant mode, to drop calls to tools that were not offered.
    """
    if strict:
        return parse_completion_strict(text, thinking_mode)
    from .stream import StreamParser

    parser = StreamParser(thinking_mode, tools=tools)
    parser.feed(text)
    parser.finish()
    return {**parser.message(), "errors": list(parser.errors)}
