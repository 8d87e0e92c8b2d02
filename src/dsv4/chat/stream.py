"""Streaming parser: completion text deltas in, reasoning / content / tool-call deltas out.

Feed the detokenized text as it arrives (`feed(delta)`, any split, typically one token at a time) and call
`finish()` at the end. Deltas come out as soon as they are certain: text that might be the start of a marker
(`</think>`, a special token, a `<｜DSML｜...>` tag, a closer inside a string value) is held back until the next
delta decides, so DSML markup and special tokens never reach content or reasoning, and no partial tag is streamed.

A tool call streams as one `Delta(kind="tool_call", index=i, name=...)` with the tool name, then argument fragments
`Delta(kind="tool_call", index=i, text=...)` whose concatenation is the call's JSON arguments string: string values
stream as they are written (JSON-escaped), other values come whole once their parameter closes, because their JSON
has to be checked first.

On well-formed output the concatenated deltas equal the strict parser's message (parser.py), however the text is
split, and `errors == []`. On malformed output the parser never raises; it recovers and records each problem in
`problems` (kind, message) and `errors` (the messages). Whatever the split, the result is the one of the whole text.

* thinking mode without `</think>`: text stays reasoning; a tool-call block in it is still parsed;
* a block opener without the blank line, or the V3.2 `function_calls` opener: read as the opener; an opener that
  no `<｜DSML｜invoke` follows (markup quoted in prose): dropped, the text around it stays text;
* `<｜DSML｜invoke name="f">` with no block opener before it, in content or reasoning: an implicit block when `f` is
  a declared tool (any name when `tools` is not given), the text after it continues as before;
* any other DSML tag in content or reasoning (a damaged opener, a stray closer): the whole tag is dropped;
* a second tool-call block, or text after the block: its calls are parsed too, the text is content;
* a parameter without `string=`: a string if the tool's schema declares it one, else JSON if its value parses as
  JSON, else a string; `string="false"` with a value that is not JSON (NaN and Infinity included): passed on as a
  JSON string, so `arguments` is always JSON;
* a parameter, invoke or block that is not closed before the next tag: closed there (also a parameter closed by
  `</parameter>` without its DSML token, when a DSML tag follows);
* an invoke with a JSON-object body (the V3.2 form) or a self-closing `<｜DSML｜invoke name="f"/>`: read;
* a call to a tool that was not offered (`tools=` given): dropped; a repeated parameter: the repeat is dropped;
* special tokens inside content or reasoning: dropped; text after the end of the message: ignored.

Never invented: when the text ends without `<｜end▁of▁sentence｜>` (max_tokens, a stop string) inside an open call,
that call is cut off: its arguments stay the partial JSON the model wrote (never closed, so never valid JSON) and its
index is in `truncated`. A message that ends with EOS inside a call closes it: the model chose to stop.

Deliberately not here: ids for tool calls (the server names them) and schema validation of arguments (the
constraint in constraint.py makes the model produce valid ones; the server may validate again).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from .encoding import to_json
from .parser import FORBIDDEN_IN_TEXT, INVOKE_START, loads_strict
from .tokenizer import DSML, EOS, THINK_END

PARAM_START = f"<{DSML}parameter"
INVOKE_END = f"</{DSML}invoke"
BLOCK_ENDS = (f"</{DSML}tool_calls", f"</{DSML}function_calls")
OPENER_NAMES = ("tool_calls", "function_calls")  # function_calls: the V3.2 block name

REASONING, CONTENT, TAG, OPENER, BLOCK, INVOKE_HEAD, INVOKE_BODY, JSON_BODY, PARAM_HEAD, PARAM_VALUE, AFTER_BLOCK, \
    DONE = range(12)
OPEN_CALL_STATES = (INVOKE_BODY, JSON_BODY, PARAM_HEAD, PARAM_VALUE)

# The DSML token with what may stand before it; the leading newlines belong to a block opener.
_DSML_MARKERS = (f"\n\n<{DSML}", f"\n<{DSML}", f"<{DSML}", f"</{DSML}", f"/{DSML}", DSML)
_SPECIAL = tuple(t for t in FORBIDDEN_IN_TEXT if t != DSML)
_TEXT_MARKERS = {
    REASONING: (THINK_END, EOS, *_SPECIAL, *_DSML_MARKERS),
    CONTENT: (EOS, *_SPECIAL, *_DSML_MARKERS),
}
# Inside a value: what could still turn into the DSML tag that ends it (a repaired end drops one "\n", and a
# closer whose DSML token the model left out, `</parameter>`, when a DSML tag follows it).
PLAIN_CLOSER = "</parameter>"
_VALUE_MARKERS = (
    f"\n</{DSML}", f"\n<{DSML}", f"</{DSML}", f"<{DSML}", f"/{DSML}", DSML, EOS,
    *(PLAIN_CLOSER + sep + tag for sep in ("", "\n") for tag in (f"<{DSML}", f"</{DSML}")),
)
# A tag's attributes: no "<", ">" or "｜" (every special token has one); bounded so junk cannot stall the stream.
_TAG_LIMIT = 300
_TAG_BODY = re.compile(r"[^<>｜]*")
_TAG_NAME = re.compile(r"[A-Za-z_]*")
_INVOKE_ATTRS = re.compile(r'\s*name\s*=\s*"([^">]*)"\s*(/?)\s*', re.DOTALL)
_OFFICIAL_INVOKE = re.compile(r'\s*name="[^"]*"')  # what the official header regex reads
_PARAM_ATTRS = re.compile(r'\s*name\s*=\s*"([^">]*)"(?:\s*string\s*=\s*"([^">]*)")?\s*', re.DOTALL)


@dataclass(frozen=True)
class Delta:
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    index: int = -1  # tool call index (tool_call deltas only)
    name: str | None = None  # set on the first delta of a tool call


def _find_first(buf: str, markers: tuple[str, ...]) -> tuple[int, str | None]:
    """Earliest marker in buf (the longest one on a tie, so "\\n\\n<｜DSML｜" beats its tail)."""
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


def _starts(s: str, tags: tuple[str, ...]) -> tuple[str | None, bool]:
    """(the tag s starts with, False) or (None, True) while s is still a proper prefix of one, else (None, False)."""
    for tag in tags:
        if s.startswith(tag):
            return tag, False
    return None, any(tag.startswith(s) for tag in tags)


def _escape(fragment: str) -> str:
    # json.dumps escapes character by character, so escaped fragments concatenate to the escaped whole.
    return to_json(fragment)[1:-1]


class StreamParser:
    def __init__(self, thinking_mode: str = "chat", tools: list[dict[str, Any]] | None = None, expect_eos: bool = True):
        if thinking_mode not in ("chat", "thinking"):
            raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
        self.thinking_mode = thinking_mode
        self.tool_names = None if tools is None else {(t.get("function") or t).get("name") for t in tools}
        # per tool, the parameters its schema declares as strings: what a value without string= is read as
        self._string_params: dict[str, set[str]] = {}
        for tool in tools or []:
            function = tool.get("function") or tool
            props = (function.get("parameters") or {}).get("properties") or {}
            self._string_params[function.get("name")] = {
                k for k, v in props.items() if isinstance(v, dict) and v.get("type") == "string"
            }
        self.expect_eos = expect_eos
        self.problems: list[tuple[str, str]] = []  # (kind, plain-language message), in order
        # text pieces, joined on demand: repeated `str +=` on an attribute copies the whole text every time
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self.calls: list[dict[str, Any]] = []  # {"name": str, "arguments": list of JSON fragments}
        self.truncated: list[int] = []  # indices of calls the output cut off (arguments left partial)
        self.saw_eos = False
        self._state = REASONING if thinking_mode == "thinking" else CONTENT
        self._text_state = self._state  # where text goes after a tag or a block
        self._buf = ""
        self._out: list[Delta] = []
        self._lead = ""  # newlines before the DSML tag being read (text again if the tag is dropped)
        self._closing = False  # the DSML tag being read is a closer ("</")
        self._implicit = False  # the open block had no opener: the first text after an invoke ends it
        self._call: dict[str, Any] | None = None  # the open call (None: none open, or the open one is skipped)
        self._args_open = False  # "{" written
        self._args_done = False  # a JSON body wrote the whole object
        self._body_ok = False  # a JSON body may still come (nothing but the header read in this invoke)
        self._params = 0
        self._keys: set[str] = set()
        self._key = ""
        self._kind = "string"  # of the open parameter: "string" | "json" | "infer"
        self._skip_param = False
        self._value = ""  # the part of a buffered (non-string) value read so far

    # -- public -----------------------------------------------------------------------------------------------------

    @property
    def errors(self) -> list[str]:
        return [message for _, message in self.problems]

    def feed(self, text: str) -> list[Delta]:
        if self._state == DONE:
            if text.strip():
                self._problem("trailing_text", "text after the end of the message ignored")
            return []
        self._buf += text
        while self._step():
            pass
        return self._flush()

    def finish(self) -> list[Delta]:
        """End of output: release held-back text, close what is complete, record what was missing or cut off."""
        state, buf = self._state, self._buf
        self._buf = ""
        if state in (REASONING, CONTENT):
            if "｜" in buf:  # a cut-off special token or DSML tag: markup, not text
                self._problem("cut_off_tag", "output ends inside a special token or DSML tag; it was dropped")
            else:
                self._text(state, buf)
        elif state in (TAG, OPENER):
            self._problem("cut_off_tag", "output ends inside a DSML tag or right after a block opener; it was dropped")
            self._text(self._text_state, self._lead + (buf if state == OPENER and "｜" not in buf else ""))
        elif state == INVOKE_HEAD:
            self._problem("truncated_call", "output ends inside a tool-call header; no call was made")
        elif state in OPEN_CALL_STATES:
            self._truncate(buf)
        elif state == BLOCK and not self._implicit:
            self._problem("unclosed_block", "the tool-call block was not closed with </｜DSML｜tool_calls>")
        if state != DONE:
            if self._text_state == REASONING:
                self._problem("no_think_end", "thinking-mode output has no </think>; everything was taken as reasoning")
            if self.expect_eos:
                self._problem("no_eos", "output does not end with <｜end▁of▁sentence｜> (cut off by a length limit?)")
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

    # -- output -----------------------------------------------------------------------------------------------------

    def _flush(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def _problem(self, kind: str, message: str) -> None:
        # once per message: the same problem repeated (e.g. junk dropped piece by piece) is one problem
        if (kind, message) not in self.problems:
            self.problems.append((kind, message))

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

    def _end(self, rest: str) -> None:
        self.saw_eos = True
        self._state = DONE
        self._buf = ""
        if self._text_state == REASONING:
            self._problem("no_think_end", "thinking-mode output has no </think>; everything was taken as reasoning")
        if rest.strip():
            self._problem("trailing_text", "text after the end of the message ignored")

    # -- the state machine ------------------------------------------------------------------------------------------

    def _step(self) -> bool:
        """Advance as far as the buffer decides; False when more text is needed (or the message ended)."""
        state = self._state
        if state in (REASONING, CONTENT):
            return self._step_text(state)
        return {
            TAG: self._step_tag, OPENER: self._step_opener, BLOCK: self._step_block,
            INVOKE_HEAD: self._step_invoke_head, INVOKE_BODY: self._step_invoke_body, JSON_BODY: self._step_json_body,
            PARAM_HEAD: self._step_param_head, PARAM_VALUE: self._step_param_value, AFTER_BLOCK: self._step_after,
        }.get(state, lambda: False)()

    def _step_text(self, state: int) -> bool:
        markers = _TEXT_MARKERS[state]
        buf = self._buf
        pos, marker = _find_first(buf, markers)
        start = len(buf) - _held(buf, markers)
        # A complete short marker inside a still-growing longer one ("<｜DSML｜" in "\n\n<｜DSML｜"): wait.
        if marker is None or start <= pos:
            self._text(state, buf[:start])
            self._buf = buf[start:]
            return False
        self._text(state, buf[:pos])
        self._buf = buf[pos + len(marker):]
        where = "reasoning" if state == REASONING else "content"
        if marker == THINK_END and state == REASONING:
            self._state = self._text_state = CONTENT
        elif marker == EOS:
            self._end(self._buf)
            return False
        elif marker.endswith(DSML):
            self._lead = marker[: len(marker) - len(marker.lstrip("\n"))]
            self._closing = "/" in marker
            self._state = TAG
        else:
            self._problem("special_token", f"special token {marker!r} dropped from the {where}")
        return True

    def _read_tag(self, buf: str) -> tuple[str, bool, str] | None:
        """(attribute text, ended by ">", rest) of the tag at the start of buf; None while it may still grow."""
        body = _TAG_BODY.match(buf, 0, _TAG_LIMIT).group()
        if len(body) == len(buf) and len(buf) < _TAG_LIMIT:
            return None
        closed = buf[len(body):len(body) + 1] == ">"
        return body, closed, buf[len(body) + closed:]

    def _step_tag(self) -> bool:
        """A DSML tag in content or reasoning (the buffer starts after `｜DSML｜`): opener, implicit invoke, or junk."""
        tag = self._read_tag(self._buf)
        if tag is None:
            return False
        body, closed, rest = tag
        name = _TAG_NAME.match(body).group()
        where = "reasoning" if self._text_state == REASONING else "content"
        if not self._closing and name in OPENER_NAMES:
            if not closed or body != name:
                self._problem("malformed_markup", f"malformed tool-call block opener {body[:100]!r}")
            if name != "tool_calls":
                self._problem("v32_block", "a V3.2 <｜DSML｜function_calls> block was read as a tool-call block")
            self._state, self._buf = OPENER, rest
            return True
        if not self._closing and name == "invoke":
            attrs = _INVOKE_ATTRS.fullmatch(body[len(name):])
            tool = attrs.group(1) if attrs else None
            if tool is not None and (self.tool_names is None or tool in self.tool_names):
                self._problem("implicit_block", f"tool call {tool!r} without a block opener; read as a tool call")
                self._open_block(implicit=True)
                self._state, self._buf = INVOKE_HEAD, self._buf[len(name):]
                return True
        self._problem("stray_dsml", f"stray DSML tag <{'/' if self._closing else ''}{DSML}{body[:60]}> dropped from "
                      f"the {where}")
        self._text(self._text_state, self._lead)
        self._state, self._buf = self._text_state, rest
        return True

    def _open_block(self, implicit: bool) -> None:
        if self.calls or self.truncated:
            self._problem("second_block", "a second tool-call block in the message; its calls were read too")
        if self._text_state == REASONING:
            self._problem("block_in_reasoning", "a tool-call block inside the reasoning (no </think> before it)")
        self._implicit = implicit

    def _step_opener(self) -> bool:
        """After a block opener: a block only if an invoke follows; otherwise the opener was quoted markup."""
        buf = self._buf
        rest = buf.lstrip()
        tag, partial = _starts(rest, (INVOKE_START,))
        if partial or not rest:
            return False
        if tag is not None:
            if self._lead != "\n\n":
                self._problem("no_blank_line", "the tool-call block was not preceded by a blank line")
            self._open_block(implicit=False)
            self._state = BLOCK  # which checks the separator
            return True
        self._problem("opener_as_text", "a tool-call block opener not followed by an invoke was dropped; the text "
                      "around it was kept")
        self._text(self._text_state, self._lead)
        self._state = self._text_state
        return True

    def _step_block(self) -> bool:
        """Inside a block, between invokes."""
        buf = self._buf
        rest = buf.lstrip()
        space = buf[: len(buf) - len(rest)]
        tag, partial = _starts(rest, (INVOKE_START, *BLOCK_ENDS, EOS))
        if partial or not rest:
            return False
        if tag == EOS:
            if not self._implicit:
                self._problem("unclosed_block", "the tool-call block was not closed with </｜DSML｜tool_calls>")
            self._end(rest[len(EOS):])
            return False
        if tag is None:
            if self._implicit:  # the prose goes on after a call written without a block
                self._state, self._buf = self._text_state, rest
                return True
            self._problem("malformed_markup", "unexpected text inside the tool-call block dropped")
            self._buf = self._skip_junk(rest)
            return True
        if space != "\n":
            self._problem("malformed_markup", "malformed tool-call markup between tool calls")
        if tag == INVOKE_START:
            self._state, self._buf = INVOKE_HEAD, rest[len(tag):]
            return True
        return self._close_block(rest, tag)

    def _close_block(self, rest: str, tag: str) -> bool:
        after = self._after_closer(rest, tag)
        if after is None:
            return False
        self._state, self._buf = AFTER_BLOCK, after
        return True

    @staticmethod
    def _closer_end(rest: str, tag: str) -> int | None:
        """Where closer `tag` at the start of `rest` ends: after its ">", after attributes a damaged closer carries
        (`</｜DSML｜invoke name="f">`: they go with the tag) and their ">", or right after the name when no ">" comes
        before a "<" or "｜" (or within _TAG_LIMIT characters). None while that is not known yet."""
        body = rest[len(tag): len(tag) + _TAG_LIMIT]
        end = _TAG_BODY.match(body).end()
        if end < len(body):
            return len(tag) + end + 1 if body[end] == ">" else len(tag)
        return len(tag) if len(body) == _TAG_LIMIT else None

    def _after_closer(self, rest: str, tag: str) -> str | None:
        """What follows closer `tag` and its ">" (None while the ">" may still come)."""
        end = self._closer_end(rest, tag)
        if end is None:
            return None
        if end == len(tag):
            self._problem("malformed_markup", f"closing tag {tag!r} without '>'")
        elif end > len(tag) + 1:
            self._problem("malformed_markup", f"closing tag {tag!r} with attributes; they were dropped with it")
        return rest[end:]

    def _skip_junk(self, rest: str) -> str:
        # drop up to the next "<" (a tag or EOS may start there), at least one character; the whitespace before it
        # stays, so the separator check sees the same text however the junk arrived
        cut = rest.find("<", 1)
        cut = len(rest) if cut == -1 else cut
        while cut > 1 and rest[cut - 1].isspace():
            cut -= 1
        return rest[cut:]

    def _step_after(self) -> bool:
        """After a closed block: EOS, or more (another block, or text, which is content)."""
        rest = self._buf.lstrip()
        if not rest:
            return False
        tag, partial = _starts(rest, (EOS,))
        if partial:
            return False
        if tag == EOS:
            self._end(rest[len(EOS):])
            return False
        if rest.startswith("<"):  # another tag: its leading newlines belong to it (a second block's blank line)
            rest = self._buf
        else:
            self._problem("text_after_block", "text after the tool-call block was kept as content")
        self._state, self._buf = self._text_state, rest
        return True

    # -- calls ------------------------------------------------------------------------------------------------------

    def _step_invoke_head(self) -> bool:
        tag = self._read_tag(self._buf)
        if tag is None:
            return False
        body, closed, rest = tag
        attrs = _INVOKE_ATTRS.fullmatch(body)
        if attrs is None or not closed:
            self._problem("malformed_markup", f"malformed <｜DSML｜invoke> header {body[:100]!r}")
        name = attrs.group(1) if attrs else None
        self._open_call(name, body)
        if attrs is not None and attrs.group(2):
            self._problem("self_closing_invoke", f"self-closing <｜DSML｜invoke name={name!r}/> read as a call "
                          "without arguments")
            self._close_call()
            self._state, self._buf = BLOCK, rest
            return True
        if attrs is not None and _OFFICIAL_INVOKE.fullmatch(body) is None:
            self._problem("malformed_markup", f"malformed <｜DSML｜invoke> header {body[:100]!r}; read the name anyway")
        self._state, self._buf = INVOKE_BODY, rest
        return True

    def _open_call(self, name: str | None, header: str) -> None:
        self._args_open, self._args_done, self._params, self._keys = False, False, 0, set()
        self._body_ok = True
        self._call = None
        if name is None:
            self._problem("unreadable_call", f"tool call without a readable name ({header[:100]!r}) dropped")
            return
        if self.tool_names is not None and name not in self.tool_names:
            offered = ", ".join(sorted(self.tool_names)) or "none"
            self._problem("unknown_tool", f"call to unknown tool {name!r} dropped (tools offered: {offered})")
            return
        self._call = {"name": name, "arguments": []}
        self.calls.append(self._call)
        self._out.append(Delta("tool_call", index=len(self.calls) - 1, name=name))

    def _close_call(self) -> None:
        if not self._args_done:
            self._args("}" if self._args_open else "{}")
        self._call = None

    def _unclosed(self) -> None:
        name = self._call["name"] if self._call else "?"
        self._problem("unclosed_call", f"tool call {name!r} was not closed with </｜DSML｜invoke>; closed it")

    def _step_invoke_body(self) -> bool:
        """Inside an invoke, before a parameter or after one."""
        buf = self._buf
        rest = buf.lstrip()
        space = buf[: len(buf) - len(rest)]
        if not rest:
            return False
        if rest[0] == "{" and self._body_ok:
            self._state, self._buf = JSON_BODY, rest
            return True
        tag, partial = _starts(rest, (PARAM_START, INVOKE_END, *BLOCK_ENDS, INVOKE_START, EOS))
        if partial:
            return False
        self._body_ok = False  # a JSON body is the first thing after the header, or none
        if tag is None:
            self._problem("malformed_markup", "unexpected text inside a tool call dropped")
            self._buf = self._skip_junk(rest)
            return True
        expected = ("\n",) if self._params or self._args_done else ("\n", "\n\n")
        if tag in (PARAM_START, INVOKE_END) and space not in expected:
            self._problem("malformed_markup", "malformed tool-call markup between parameters")
        if tag == PARAM_START:
            self._state, self._buf = PARAM_HEAD, rest[len(tag):]
            return True
        if tag == INVOKE_END:
            after = self._after_closer(rest, tag)
            if after is None:
                return False
            self._close_call()
            self._state, self._buf = BLOCK, after
            return True
        if tag in BLOCK_ENDS and self._closer_end(rest, tag) is None:
            return False  # its ">" may still come; nothing is changed before that is known
        self._unclosed()
        self._close_call()
        if tag == EOS:
            self._end(rest[len(EOS):])
            return False
        if tag == INVOKE_START:
            self._state, self._buf = INVOKE_HEAD, rest[len(tag):]
            return True
        return self._close_block(rest, tag)

    @staticmethod
    def _tag_start(buf: str) -> tuple[int, int] | None:
        """(where the DSML tag or EOS that ends a value starts, where its name starts) in buf, or None."""
        pos, marker = _find_first(buf, (DSML, EOS))
        if marker is None:
            return None
        if marker == EOS:
            return pos, pos
        start = pos
        if buf[:start].endswith("/"):
            start -= 1
        if buf[:start].endswith("<"):
            start -= 1
        return start, pos + len(DSML)

    def _step_json_body(self) -> bool:
        """A V3.2 invoke body: one JSON object up to the next DSML tag."""
        found = self._tag_start(self._buf)
        if found is None:
            return False
        start, _ = found
        body = self._buf[:start].strip()
        self._buf = self._buf[start:]
        name = self._call["name"] if self._call else "?"
        try:
            value = loads_strict(body)
        except ValueError:
            value = None
        if isinstance(value, dict):
            self._problem("v32_json_body", f"tool call {name!r} has a JSON body (the V3.2 form); read it")
            self._args(body)
        else:
            self._problem("bad_json_body", f"tool call {name!r} has a body that is not a JSON object; passed on as "
                          "{\"arguments\": text}")
            self._args("{" + to_json("arguments") + ": " + to_json(body) + "}")
        self._args_done = True
        self._state = INVOKE_BODY
        return True

    def _step_param_head(self) -> bool:
        tag = self._read_tag(self._buf)
        if tag is None:
            return False
        body, closed, rest = tag
        attrs = _PARAM_ATTRS.fullmatch(body)
        self._state, self._buf, self._value = PARAM_VALUE, rest, ""
        self._params += 1
        name = self._call["name"] if self._call else "?"
        if attrs is None or not closed:
            self._problem("malformed_markup", f"malformed <｜DSML｜parameter> {body[:100]!r} in tool call {name!r} "
                          "dropped")
            self._skip_param = True
            return True
        self._key, flag = attrs.group(1), attrs.group(2)
        if body != f' name="{self._key}" string="{flag}"' or flag not in ("true", "false"):
            if flag is None or flag.lower() not in ("true", "false"):
                self._problem("missing_string_attr", f"parameter {self._key!r} of tool call {name!r} has no "
                              "string=\"true|false\"; read as JSON if its value is JSON, else as a string")
            else:
                self._problem("malformed_markup", f"malformed <｜DSML｜parameter> header {body[:100]!r}")
        flag = (flag or "").lower()
        if flag not in ("true", "false") and self._key in self._string_params.get(name, ()):
            flag = "true"  # the schema says string: "02134" must not become a number
        self._kind = "string" if flag == "true" else "json" if flag == "false" else "infer"
        self._skip_param = self._key in self._keys or self._call is None
        if self._key in self._keys and self._call is not None:
            self._problem("repeated_parameter", f"tool call {name!r} repeats parameter {self._key!r}; repeat dropped")
        self._keys.add(self._key)
        if self._kind == "string" and not self._skip_param:
            self._args(self._param_prefix(self._key) + '"')
        return True

    def _param_prefix(self, key: str) -> str:
        prefix = (", " if self._args_open else "{") + to_json(key) + ": "
        self._args_open = True
        return prefix

    def _step_param_value(self) -> bool:
        buf = self._buf
        found = self._tag_start(buf)
        if found is None:
            keep = _held(buf, _VALUE_MARKERS)
            self._pass_value(buf[: len(buf) - keep])
            self._buf = buf[len(buf) - keep:]
            return False
        start, name_at = found
        if buf.startswith(EOS, start):
            self._finish_param(buf[:start])
            self._unclosed()
            self._close_call()
            self._end(buf[start + len(EOS):])
            return False
        # the text before the tag is certain, but for a newline that a repaired end would drop (one right before a
        # "<": the only newline still held back, see _VALUE_MARKERS)
        drop_newline = buf[:start].endswith("\n") and buf.startswith("<", start)
        settled = start - 1 if drop_newline else start
        plain_closer = buf.startswith("<", start) and buf[:settled].endswith(PLAIN_CLOSER)
        settled -= len(PLAIN_CLOSER) if plain_closer else 0
        name = _TAG_NAME.match(buf, name_at).group()
        if name_at + len(name) == len(buf) and len(name) < 20:  # the name may still grow
            self._pass_value(buf[:settled])
            self._buf = buf[settled:]
            return False
        closer = buf[start:name_at].endswith(f"/{DSML}")
        if closer and name == "parameter":
            if not buf[start:].startswith("<"):
                self._problem("malformed_markup", f"parameter {self._key!r} is not closed by </｜DSML｜parameter>")
            after = self._after_closer(buf[name_at - len(DSML) - 1:], f"/{DSML}parameter")
            if after is None:
                self._pass_value(buf[:settled])
                self._buf = buf[settled:]
                return False
            self._finish_param(buf[:start])
            self._state, self._buf = INVOKE_BODY, after
            return True
        # any other tag ends the value too: the model left out </｜DSML｜parameter> (its newline is markup), or
        # wrote it without the DSML token
        if plain_closer:
            self._problem("stray_dsml", f"parameter {self._key!r} closed by {PLAIN_CLOSER!r} without the DSML token")
        else:
            self._problem("unclosed_parameter", f"parameter {self._key!r} was not closed by </｜DSML｜parameter>; "
                          "closed it at the next tag")
        self._finish_param(buf[:settled])
        self._state, self._buf = INVOKE_BODY, buf[start:]
        return True

    def _pass_value(self, text: str) -> None:
        """Value text that is certain: a string value streams, others are set aside to be checked whole."""
        if self._kind == "string":
            if not self._skip_param:
                self._args(_escape(text))
        else:
            self._value += text

    def _finish_param(self, text: str) -> None:
        """The value's last text (after what `_pass_value` took) is known: close the value."""
        if self._skip_param:
            return
        if self._kind == "string":
            self._args(_escape(text) + '"')
            return
        value, self._value = self._value + text, ""
        name = self._call["name"] if self._call else "?"
        try:
            loads_strict(value)
            self._args(self._param_prefix(self._key) + value)
        except ValueError:
            if self._kind == "json":
                self._problem("non_json_value", f"tool call {name!r}: parameter {self._key!r} is marked "
                              f"string=\"false\" but {value[:100]!r} is not JSON; passed on as a string")
            self._args(self._param_prefix(self._key) + to_json(value))

    def _truncate(self, pending: str) -> None:
        """The output stopped (no EOS) inside an open call: keep what the model wrote, close nothing."""
        if self._call is None:
            self._problem("truncated_call", "output ends inside a dropped tool call")
            return
        found = self._tag_start(pending)
        text = pending[: found[0]] if found else pending[: len(pending) - _held(pending, _VALUE_MARKERS)]
        if self._state == PARAM_VALUE and not self._skip_param:
            if self._kind == "string":
                self._args(_escape(text))
            else:  # the raw text written so far: partial JSON like the rest of the arguments
                self._args(self._param_prefix(self._key) + self._value + text)
        elif self._state == JSON_BODY:
            self._args(text)
        self.truncated.append(len(self.calls) - 1)
        self._problem("truncated_call", f"tool call {self._call['name']!r} was cut off before it was complete; its "
                      "arguments are the partial text the model wrote, not valid JSON")
        self._call = None
