"""The Anthropic Messages API: requests -> `ChatJob`, `Step`s -> messages and the SSE event sequence, errors in
Anthropic's format.

As in DeepSeek's Anthropic-compatible API, thinking is on unless `thinking: {"type": "disabled"}` (or the server's
`--thinking` default says otherwise), and `output_config.effort` picks the reasoning effort (low / medium / high ->
V4's "high", max -> "max"). `thinking: {"type": "adaptive"}` (Claude Code's default) is thinking on: V4 has no mode
that decides per turn whether to reason. `role: "system"` messages inside `messages` are V4 system text, placed at a
turn boundary (turns.py); `output_config.format` (json_schema) goes through the same grammar as OpenAI's
`response_format`. `budget_tokens` must be below max_tokens (as Anthropic requires) and is enforced as a hard cap on
reasoning tokens (serve/budget.py); Anthropic's minimum of 1024 is not imposed, since small local models are served
here too. Context-length errors use Anthropic's wording, which Claude Code parses to retry with a smaller max_tokens.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime, timezone
from collections.abc import AsyncIterator
from typing import Any

from dsv4.serve import validate
from dsv4.serve.core import ChatJob, ServeError, Step, Usage, dumps, new_id
from dsv4.serve.openai import thinking_of
from dsv4.serve.protocol import AnthropicBlock, CountTokensRequest, MessagesRequest
from dsv4.serve.turns import place_system_messages

_ERROR_TYPE = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "overloaded": "overloaded_error",
    "internal": "api_error",
}
PING = b'event: ping\ndata: {"type": "ping"}\n\n'  # what Anthropic's API sends to keep a stream alive
_STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "stop_sequence": "stop_sequence"}


def model_card(name: str, created: int) -> dict[str, Any]:
    stamp = datetime.fromtimestamp(created, tz=timezone.utc).isoformat().replace("+00:00", "Z")
    return {"type": "model", "id": name, "display_name": name, "created_at": stamp}


def error_body(err: ServeError) -> dict[str, Any]:
    message = err.message
    if err.lengths is not None:  # Anthropic's own wording, which Claude Code parses to retry with less max_tokens
        prompt, max_tokens, limit = err.lengths
        message = (f"prompt is too long: {prompt} tokens > {limit - 1} maximum" if max_tokens is None else
                   f"input length and `max_tokens` exceed context limit: {prompt} + {max_tokens} > {limit}, "
                   "decrease input length or `max_tokens` and try again")
    return {"type": "error", "error": {"type": _ERROR_TYPE[err.kind], "message": message}}


def _block_text(content: str | list[AnthropicBlock] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for b in content:
        if b.type != "text" or b.text is None:
            raise ServeError("invalid_request", f"{where}: blocks of type {b.type!r} are not supported here by this "
                             "text-only model; send text blocks.")
        parts.append(b.text)
    return "\n\n".join(parts)


def _messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _block_text(req.system, "system")})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}"
        blocks = [AnthropicBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        if m.role == "system":
            out.append({"role": "system", "content": _block_text(m.content, where)})
            continue
        if m.role == "user":
            texts = []
            for j, b in enumerate(blocks):
                if b.type == "tool_result":
                    if not b.tool_use_id:
                        raise ServeError("invalid_request", f"{where}.content.{j}: tool_result needs `tool_use_id`.")
                    text = _block_text(b.content, f"{where}.content.{j}.content")
                    # tool results become V4 tool messages; the encoder merges them into the user turn in call order
                    out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                                "content": f"Error: {text}" if b.is_error else text})
                elif b.type == "text":
                    texts.append(b.text or "")
                else:
                    raise ServeError("invalid_request", f"{where}.content.{j}: blocks of type {b.type!r} are not "
                                     "supported by this text-only model.")
            if texts or not any(b.type == "tool_result" for b in blocks):
                out.append({"role": "user", "content": "\n\n".join(texts)})
            continue
        msg: dict[str, Any] = {"role": "assistant", "content": ""}
        reasoning, texts, calls = [], [], []
        for j, b in enumerate(blocks):
            if b.type == "text":
                texts.append(b.text or "")
            elif b.type == "thinking":
                reasoning.append(b.thinking or "")
            elif b.type == "redacted_thinking":
                continue  # opaque by design (encrypted by another provider): there is nothing V4 could read
            elif b.type == "tool_use":
                if not b.id or not b.name:
                    raise ServeError("invalid_request", f"{where}.content.{j}: tool_use needs `id` and `name`.")
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": dumps(b.input or {})}})
            else:
                raise ServeError("invalid_request", f"{where}.content.{j}: blocks of type {b.type!r} are not "
                                 "supported in assistant messages.")
        msg["content"] = "".join(texts)
        if reasoning:
            msg["reasoning_content"] = "".join(reasoning)
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    # a final assistant message is a prefill: ServingCore.render_chat continues it
    return place_system_messages(out)


def _tools(req: MessagesRequest | CountTokensRequest) -> tuple[list[dict[str, Any]] | None, Any, bool]:
    tools = None
    if req.tools:
        tools = []
        for i, t in enumerate(req.tools):
            if t.input_schema is None:
                raise ServeError("invalid_request", f"tools.{i}: {t.name!r} has no input_schema; server-side tools "
                                 f"(type {t.type!r}) are not available here, only client tools with an input_schema.")
            fn: dict[str, Any] = {"name": t.name, "parameters": t.input_schema}
            if t.description:
                fn["description"] = t.description
            tools.append({"type": "function", "function": fn})
    choice: Any = "auto" if tools else "none"
    parallel = True
    tc = req.tool_choice
    if tc is not None:
        parallel = not tc.disable_parallel_tool_use
        if tc.type == "tool":
            if not tc.name or tc.name not in {t["function"]["name"] for t in tools or []}:
                raise ServeError("invalid_request", f"tool_choice names the tool {tc.name!r}, which is not among "
                                 "`tools`.")
            choice = {"name": tc.name}
        else:
            choice = {"auto": "auto", "any": "required", "none": "none"}[tc.type]
        if choice != "none" and not tools:
            raise ServeError("invalid_request", f"tool_choice {tc.type!r} needs `tools`.")
    return tools, choice, parallel


def chat_job(req: MessagesRequest | CountTokensRequest, default_thinking: bool = True) -> ChatJob:
    effort = req.output_config.effort if req.output_config else None
    thinking, effort = thinking_of(req.thinking, effort, default_thinking)
    tools, choice, parallel = _tools(req)
    fmt = req.output_config.format if req.output_config else None
    job = ChatJob(messages=_messages(req), thinking=thinking, reasoning_effort=effort, tools=tools,
                  tool_choice=choice, parallel_tool_calls=parallel,
                  checks=functools.partial(validate.check_anthropic_messages, req),
                  response_format={"type": "json_schema", "name": None, "schema": fmt.schema_} if fmt else None)
    if isinstance(req, MessagesRequest):
        budget = req.thinking.budget_tokens if req.thinking else None
        if thinking and budget is not None and budget >= req.max_tokens:
            raise ServeError("invalid_request", f"`max_tokens` must be greater than `thinking.budget_tokens` "
                             f"({req.max_tokens} <= {budget}); raise max_tokens or lower the budget.")
        job.thinking_budget = budget
        job.max_tokens = req.max_tokens
        job.stop = list(req.stop_sequences or [])
        job.sampling = {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k}
    return job


# ---- responses ---------------------------------------------------------------------------------------------------
def _input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        value = None
    # Anthropic's tool_use.input must be an object; keep unparsable text visible the way the V4 encoder does
    return value if isinstance(value, dict) else {"arguments": arguments}


def _usage(u: Usage) -> dict[str, Any]:
    # Anthropic counts cache reads apart from input_tokens (total input = input + cache_read + cache_creation)
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


async def message_response(events: AsyncIterator[Step | Usage], model: str) -> dict[str, Any]:
    reasoning, text = "", ""
    calls: list[dict[str, Any]] = []
    stop_reason, stop_sequence, usage = "end_turn", None, None
    async for ev in events:
        if isinstance(ev, Usage):
            usage = ev
            continue
        reasoning += ev.reasoning
        text += ev.content
        for tc in ev.tool_calls:
            if tc.name is not None:
                calls.append({"id": new_id("toolu_"), "name": tc.name, "arguments": ""})
            calls[tc.index]["arguments"] += tc.arguments
        if ev.finish_reason:
            stop_reason, stop_sequence = _STOP_REASON[ev.finish_reason], ev.stop_sequence
    assert usage is not None
    content: list[dict[str, Any]] = []
    if reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    if text or not (calls or reasoning):  # an empty answer is still one (empty) text block, as in the stream
        content.append({"type": "text", "text": text})
    content += [{"type": "tool_use", "id": c["id"], "name": c["name"], "input": _input(c["arguments"])} for c in calls]
    return {"id": new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": _usage(usage)}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {dumps(data)}\n\n".encode()


def keepalive(live: dict[str, Any]) -> bytes:
    """What a silent stream sends while the prompt is prefilled: an empty thinking delta when the thinking block is
    already open, else a ping. Claude Code's watchdog restarts a request after 300 s without a *chunk*, and the
    Anthropic SDK drops `ping` events before they count as one; an empty delta of a block that is open anyway does
    count, and changes nothing in the message."""
    if live.get("thinking") is not None:
        return _delta(live["thinking"], {"type": "thinking_delta", "thinking": ""})
    return PING


async def message_stream(events: AsyncIterator[Step | Usage], model: str, prompt_tokens: int,
                         opens_thinking: bool = False, live: dict[str, Any] | None = None) -> AsyncIterator[bytes]:
    """`opens_thinking`: the output starts in the reasoning, so the thinking block opens with the stream (before the
    first token); `live["thinking"]` is the open thinking block's index for `keepalive`, else None."""
    live = {} if live is None else live
    yield _event("message_start", {"type": "message_start", "message": {
        "id": new_id("msg_"), "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}})
    index = -1
    open_kind: str | None = None  # "thinking" | "text" | "tool_use"
    answered = False  # a text or tool_use block was sent, or some reasoning

    def start(kind: str, block: dict[str, Any]) -> list[bytes]:
        nonlocal index, open_kind
        out = stop()
        index += 1
        open_kind = kind
        live["thinking"] = index if kind == "thinking" else None
        out.append(_event("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": block}))
        return out

    def stop() -> list[bytes]:
        nonlocal open_kind
        if open_kind is None:
            return []
        out = []
        if open_kind == "thinking":
            out.append(_delta(index, {"type": "signature_delta", "signature": ""}))
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        open_kind = None
        live["thinking"] = None
        return out

    if opens_thinking:
        for b in start("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
            yield b

    stop_reason, stop_sequence = "end_turn", None
    async for ev in events:
        if isinstance(ev, Usage):
            for b in stop():
                yield b
            yield _event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                           "usage": _usage(ev)})
            yield _event("message_stop", {"type": "message_stop"})
            return
        out: list[bytes] = []
        answered = answered or bool(ev.reasoning or ev.content or ev.tool_calls)
        if ev.reasoning:
            if open_kind != "thinking":
                out += start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(_delta(index, {"type": "thinking_delta", "thinking": ev.reasoning}))
        if ev.content:
            if open_kind != "text":
                out += start("text", {"type": "text", "text": ""})
            out.append(_delta(index, {"type": "text_delta", "text": ev.content}))
        for tc in ev.tool_calls:
            if tc.name is not None:
                out += start("tool_use", {"type": "tool_use", "id": new_id("toolu_"), "name": tc.name, "input": {}})
            if tc.arguments:
                out.append(_delta(index, {"type": "input_json_delta", "partial_json": tc.arguments}))
        if ev.finish_reason:
            stop_reason, stop_sequence = _STOP_REASON[ev.finish_reason], ev.stop_sequence
            if not answered:  # nothing generated at all: still give the client one (empty) text block
                out += start("text", {"type": "text", "text": ""})
        for b in out:
            yield b


def _delta(index: int, delta: dict[str, Any]) -> bytes:
    return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def stream_error(err: ServeError) -> bytes:
    return _event("error", error_body(err))
