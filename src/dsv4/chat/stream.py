"""Streaming parser: completion text deltas in, reasoning / content / tool-call deltas out.

Feed the detokenized text as it arrives (`feed(delta)`, any split, typically one token at a time) and call
`finish()` at the end. Deltas come out as soon as they are certain: text that might be the start of a marker
(`</think>`, `\\n\\n<｜DSML｜tool_calls`, a special token, `</｜DSML｜parameter>`) is held back until the next delta
decides, so DSML markup and special tokens never reach content or reasoning.

A tool call streams as one `Delta(kind="tool_call", index=i, name=...)` with the tool name, then argument fragments
`Delta(kind="tool_call", index=i, text=...)` whose concatenation is the call's JSON arguments string: string values
stream as they are written (JSON-escaped), non-string values come whole once their parameter closes, because their
JSON has to be checked first.

On well-formed output the concatenated deltas equal the strict parser's message (parser.py), however the text is
split. On malformed output the parser never raises; it recovers and records each problem in `errors`:

* thinking mode without `</think>`: text stays reasoning; a tool-call block in it is still parsed (the failure
  other servers have, where such calls are lost);
* a tool-call block not preceded by a blank line, or one that is cut off: parsed as far as it goes; an open call is
  closed so its arguments are valid JSON, and the error says it was cut off;
* a non-string parameter whose value is not JSON: passed on as a JSON string;
* a call to a tool that was not offered (`tools=` given): dropped; a repeated parameter: the repeat is dropped;
* special tokens inside content or reasoning: dropped; text after the end of the message: ignored.

Deliberately not here: ids for tool calls (the server names them) and schema validation of arguments (the
constraint in constraint.py makes the model produce valid ones; the server may validate again).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

from .encoding import TOOL_CALLS_START, to_json
from .parser import (
    FORBIDDEN_IN_TEXT,
    INVOKE_END,
    INVOKE_HEADER,
    INVOKE_START,
    PARAM_START,
    PARAM_STOP,
    TOOL_CALLS_END,
)
from .tokenizer import DSML, EOS, THINK_END

# The model sometimes starts the block without the blank line; recognising it keeps the markup out of the content.
TOOL_CALLS_START_LENIENT = f"<{DSML}tool_calls"
PARAM_END = "<" + PARAM_STOP
PARAM_HEADER = re.compile(r' name="(.*?)" string="(true|false)">', re.DOTALL)
INVOKE_HEADER_LENIENT = re.compile(r'\s*name\s*=\s*"(.*?)"\s*>\s*', re.DOTALL)

REASONING, CONTENT, BLOCK, INVOKE_HEAD, PARAM_HEAD, PARAM_VALUE, PARAM_CLOSE, AFTER_BLOCK, DONE = range(9)

_TEXT_MARKERS = {
    REASONING: (THINK_END, TOOL_CALLS_START, TOOL_CALLS_START_LENIENT, EOS, *FORBIDDEN_IN_TEXT),
    CONTENT: (EOS, TOOL_CALLS_START, TOOL_CALLS_START_LENIENT, *FORBIDDEN_IN_TEXT),
}


@dataclass(frozen=True)
class Delta:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    index: int = -1  # tool call index (tool_call deltas only)
    name: str | None = None  # set on the first delta of a tool call


def _find_first(buf: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """Earliest marker in buf (the longest one on a tie, so "\\n\\n<｜DSML｜tool_calls" beats its tail)."""
    best, found = -1, None
    for marker in markers:
        pos = buf.find(marker)
        if pos != -1 and (found is None or pos < best or (pos == best and len(marker) > len(found))):
            best, found = pos, marker
    return best, found


@functools.cache
def _proper_prefixes(markers: tuple[str, ...]) -> tuple[frozenset[str], int]:
    prefixes = frozenset(m[:k] for m in markers for k in range(1, len(m)))
    return prefixes, max(len(m) for m in markers) - 1


def _held(buf: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of buf that could still grow into a marker."""
    prefixes, longest = _proper_prefixes(markers)
    for k in range(min(len(buf), longest), 0, -1):
        if buf[-k:] in prefixes:
            return k
    return 0


def _escape(fragment: str) -> str:
    # json.dumps escapes character by character, so escaped fragments concatenate to the escaped whole.
    return to_json(fragment)[1:-1]


class StreamParser:
    def __init__(self, thinking_mode: str = "chat", tools: list[dict[str, Any]] | None = None, expect_eos: bool = True):
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self.thinking_mode = thinking_mode
        self.tool_names = None if tools is None else {(t.get("function") or t).get("name") for t in tools}
        self.expect_eos = expect_eos
        self.errors: list[str] = []
        # text pieces, joined on demand: repeated `str +=` on an attribute copies the whole text every time
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self.calls: list[dict[str, Any]] = []  # {"name": str, "arguments": list of JSON fragments}
        self.saw_eos = False
        self._state = REASONING if thinking_mode == "thinking" else CONTENT
        self._buf = ""
        self._out: list[Delta] = []
        self._call: dict[str, Any] | None = None  # the open call (None: none open, or the open one is skipped)
        self._in_invoke = False
        self._args_open = False
        self._keys: set[str] = set()
        self._key = ""
        self._is_str = False
        self._skip_param = False
        self._value = ""  # the part of a non-string value read so far

    # -- public -----------------------------------------------------------------------------------------------------

    def feed(self, text: str) -> list[Delta]:
        if self._state == DONE:
            if text.strip():
                self._error_once(f"text after the end of the message ignored: {text[:100]!r}")
            return []
        self._buf += text
        while self._step():
            pass
        return self._flush()

    def finish(self) -> list[Delta]:
        """End of output: release held-back text, close what is open, record what was missing."""
        state, buf = self._state, self._buf
        self._buf = ""
        if state in (REASONING, CONTENT):
            if "｜" in buf:  # a cut-off special token or tool-call start: markup, not text
                self.errors.append(f"output ends inside a special token or tool-call tag: {buf!r} dropped")
            else:
                self._text(state, buf)
            if state == REASONING:
                self.errors.append("thinking-mode output has no </think>; everything was taken as reasoning")
            if self.expect_eos:
                self.errors.append("output does not end with <｜end▁of▁sentence｜> (cut off by a length limit?)")
        elif state == AFTER_BLOCK:
            if buf.strip():
                self.errors.append(f"text after the tool-call block ignored: {buf[:200]!r}")
        elif state != DONE:
            self._cut_off(buf)
        self._state = DONE
        return self._flush()

    @property
    def reasoning(self) -> str:
        return "".join(self._reasoning)

    @property
    def content(self) -> str:
        return "".join(self._content)

    def message(self) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": self.content,
            "reasoning_content": self.reasoning,
            "tool_calls": [
                {"type": "function", "function": {"name": c["name"], "arguments": "".join(c["arguments"])}}
                for c in self.calls
            ],
        }

    # -- internals --------------------------------------------------------------------------------------------------

    def _flush(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _error_once(self, message: str) -> None:
        if message not in self.errors:
            self.errors.append(message)

    def _text(self, state: int, text: str) -> None:
        if not text:
            return
        if state == REASONING:
            self._reasoning.append(text)
            self._out.append(Delta("reasoning", text))
        else:
            self._content.append(text)
            self._out.append(Delta("content", text))

    def _args(self, fragment: str) -> None:
        if self._call is not None and fragment:
            self._call["arguments"].append(fragment)
            self._out.append(Delta("tool_call", fragment, index=len(self.calls) - 1))

    def _step(self) -> bool:
        state = self._state
        if state in (REASONING, CONTENT):
            return self._step_text(state)
        if state == BLOCK:
            return self._step_block()
        if state == INVOKE_HEAD:
            return self._step_invoke_head()
        if state == PARAM_HEAD:
            return self._step_param_head()
        if state == PARAM_VALUE:
            return self._step_param_value()
        if state == PARAM_CLOSE:
            return self._step_param_close()
        if state == AFTER_BLOCK:
            pos = self._buf.find(EOS)
            if pos == -1:
                return False
            if self._buf[:pos].strip():
                self.errors.append(f"text after the tool-call block ignored: {self._buf[:pos][:200]!r}")
            self._end(self._buf[pos + len(EOS):])
            return False
        return False

    def _end(self, rest: str) -> None:
        self.saw_eos = True
        self._state = DONE
        self._buf = ""
        if rest.strip():
            self._error_once(f"text after the end of the message ignored: {rest[:100]!r}")

    def _step_text(self, state: int) -> bool:
        markers = _TEXT_MARKERS[state]
        buf = self._buf
        pos, marker = _find_first(buf, markers)
        start = len(buf) - _held(buf, markers)
        # A complete short marker inside a still-growing longer one ("｜DSML｜" in "\n\n<｜DSML｜tool_ca"): wait.
        if marker is None or start <= pos:
            self._text(state, buf[:start])
            self._buf = buf[start:]
            return False
        self._text(state, buf[:pos])
        rest = buf[pos + len(marker):]
        self._buf = rest
        where = "reasoning" if state == REASONING else "content"
        if marker == THINK_END and state == REASONING:
            self._state = CONTENT
        elif marker in (TOOL_CALLS_START, TOOL_CALLS_START_LENIENT):
            if state == REASONING:
                self.errors.append("no </think> before the tool-call block; the text before it was taken as reasoning")
            if marker == TOOL_CALLS_START_LENIENT:
                self.errors.append("the tool-call block was not preceded by a blank line")
            self._state = BLOCK
        elif marker == EOS:
            if state == REASONING:
                self.errors.append("thinking-mode output has no </think>; everything was taken as reasoning")
            self._end(rest)
            return False
        else:
            self.errors.append(f"special token {marker!r} dropped from the {where}")
        return True

    def _expect_separator(self, between: str, after: str) -> None:
        if between != ">\n":
            self.errors.append(f"malformed tool-call markup after {after}: expected '>\\n', got {between[:100]!r}")

    def _step_block(self) -> bool:
        pos, marker = _find_first(self._buf, (INVOKE_START, TOOL_CALLS_END, EOS))
        if marker is None:
            return False
        between, self._buf = self._buf[:pos], self._buf[pos + len(marker):]
        if marker == EOS:
            self._cut_off(between)
            self._end(self._buf)
            return False
        self._expect_separator(between, "a tool-call tag")
        self._state = INVOKE_HEAD if marker == INVOKE_START else AFTER_BLOCK
        return True

    def _step_invoke_head(self) -> bool:
        pos, marker = _find_first(self._buf, (PARAM_START, INVOKE_END, EOS))
        if marker is None:
            return False
        header, self._buf = self._buf[:pos], self._buf[pos + len(marker):]
        if marker == EOS:
            self._cut_off(header)
            self._end(self._buf)
            return False
        match = INVOKE_HEADER.fullmatch(header)
        if match is None:
            match = INVOKE_HEADER_LENIENT.fullmatch(header)
            if match is not None:
                self.errors.append(f"malformed <｜DSML｜invoke> header {header!r}; read the name anyway")
        self._open_call(match.group(1) if match else None, header)
        self._state = PARAM_HEAD if marker == PARAM_START else BLOCK
        if marker == INVOKE_END:
            self._close_call()
        return True

    def _open_call(self, name: str | None, header: str) -> None:
        self._in_invoke, self._args_open, self._keys, self._call = True, False, set(), None
        if name is None:
            self.errors.append(f"tool call without a readable name ({header[:100]!r}) dropped")
            return
        if self.tool_names is not None and name not in self.tool_names:
            offered = ", ".join(sorted(self.tool_names)) or "none"
            self.errors.append(f"call to unknown tool {name!r} dropped (tools offered: {offered})")
            return
        self._call = {"name": name, "arguments": []}
        self.calls.append(self._call)
        self._out.append(Delta("tool_call", index=len(self.calls) - 1, name=name))

    def _close_call(self) -> None:
        self._args("}" if self._args_open else "{}")
        self._in_invoke, self._call = False, None

    def _param_prefix(self, key: str) -> str:
        prefix = (", " if self._args_open else "{") + to_json(key) + ": "
        self._args_open = True
        return prefix

    def _step_param_head(self) -> bool:
        buf = self._buf
        match = PARAM_HEADER.match(buf)
        stop_pos, stop = _find_first(buf, (PARAM_STOP, EOS))
        if match is not None and (stop is None or match.end() <= stop_pos):
            self._key, self._is_str = match.group(1), match.group(2) == "true"
            self._buf = buf[match.end():]
            self._skip_param = self._key in self._keys or self._call is None
            if self._key in self._keys and self._call is not None:
                self.errors.append(f"tool call {self._call['name']!r} repeats parameter {self._key!r}; repeat dropped")
            self._keys.add(self._key)
            self._value = ""
            if self._is_str and not self._skip_param:
                self._args(self._param_prefix(self._key) + '"')
            self._state = PARAM_VALUE
            return True
        if stop is None:
            return False
        self._buf = buf[stop_pos + len(stop):]
        if stop == EOS:
            self._cut_off("")
            self._end(self._buf)
            return False
        self.errors.append(f"malformed <｜DSML｜parameter> {buf[:stop_pos][:100]!r} dropped")
        self._state = PARAM_CLOSE
        return True

    def _step_param_value(self) -> bool:
        buf = self._buf
        pos, marker = _find_first(buf, (PARAM_STOP, EOS))
        if marker is None:
            keep = _held(buf, (PARAM_END, PARAM_STOP, EOS))
            if self._is_str and not self._skip_param:
                self._args(_escape(buf[: len(buf) - keep]))
            else:
                # a non-string value is checked whole at its end; set the scanned part aside so that long values
                # are not searched again on every delta
                self._value += buf[: len(buf) - keep]
            self._buf = buf[len(buf) - keep:]
            return False
        value, self._buf = self._value + buf[:pos], buf[pos + len(marker):]
        self._value = ""
        if marker == EOS:
            self._cut_off(value)
            self._end(self._buf)
            return False
        if value.endswith("<"):
            value = value[:-1]
        else:
            self.errors.append(f"parameter {self._key!r} is not closed by </｜DSML｜parameter>")
        self._finish_param(value)
        self._state = PARAM_CLOSE
        return True

    def _finish_param(self, value: str) -> None:
        if self._skip_param:
            return
        if self._is_str:
            self._args(_escape(value) + '"')
            return
        try:
            json.loads(value)
            self._args(self._param_prefix(self._key) + value)
        except ValueError:
            name = self._call["name"] if self._call else "?"
            self.errors.append(
                f"tool call {name!r}: parameter {self._key!r} is marked string=\"false\" but {value[:100]!r} is not "
                "JSON; passed on as a string"
            )
            self._args(self._param_prefix(self._key) + to_json(value))

    def _step_param_close(self) -> bool:
        pos, marker = _find_first(self._buf, (PARAM_START, INVOKE_END, EOS))
        if marker is None:
            return False
        between, self._buf = self._buf[:pos], self._buf[pos + len(marker):]
        if marker == EOS:
            self._cut_off("")
            self._end(self._buf)
            return False
        self._expect_separator(between, "a parameter")
        if marker == PARAM_START:
            self._state = PARAM_HEAD
        else:
            self._close_call()
            self._state = BLOCK
        return True

    def _cut_off(self, pending: str) -> None:
        """The output ended (or hit EOS) inside the tool-call block: close what is open so arguments stay JSON."""
        name = self._call["name"] if self._call else None
        if self._state == PARAM_VALUE and not self._skip_param:
            if self._is_str:
                keep = _held(pending, (PARAM_END, PARAM_STOP))
                self._args(_escape(pending[: len(pending) - keep]) + '"')
            # a half-written non-string value cannot be trusted: it is dropped
        if self._in_invoke:
            if name is not None:
                self.errors.append(f"tool call {name!r} was cut off; its arguments may be incomplete")
            self._close_call()
        elif self._state == INVOKE_HEAD:
            self.errors.append("the tool-call block was cut off before a tool name was complete")
        else:
            self.errors.append("the tool-call block was not closed with </｜DSML｜tool_calls>")
