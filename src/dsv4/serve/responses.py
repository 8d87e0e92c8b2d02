"""The OpenAI Responses API (`POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}`): input items -> `ChatJob`,
`Step`s -> output items and the official event stream, stored responses for `previous_response_id`.

Mapping onto V4:

* `instructions` and system / developer messages are V4 system text (OpenAI's "developer" is its newer name for
  "system"; V4's own developer role is an internal search-agent format); mid-conversation ones are placed by turns.py.
* An assistant turn is assembled from consecutive reasoning, assistant-message and function_call items; a
  function_call_output is a V4 tool message. Reasoning passed back (its `content`, its `encrypted_content`, or its
  summary) becomes the turn's `reasoning_content`, which V4 keeps for tool-using conversations (interleaved thinking).
* `encrypted_content` (with `include: ["reasoning.encrypted_content"]`) is the reasoning text in an opaque envelope so
  stateless clients (Codex sends `store: false`) can hand it back; it is encoded, not encrypted: it keeps nothing
  secret from whoever holds the response anyway.
* V4 writes no separate reasoning summary: the reasoning streams as `reasoning_text`, and `summary` is empty.
* A custom tool's `input` is one string, known once the call's arguments are complete: its stream has
  `output_item.added` and `custom_tool_call_input.done`, no input deltas.
* Function tools pass through, together with those of `additional_tools` input items; `namespace` tools are
  flattened to `namespace.name` for the model and come back as function_call items with `name` and `namespace`, as
  OpenAI returns them; `custom` (free-form) tools become functions with one string parameter `input`. Hosted tools
  (web_search, file_search, ...) cannot run here: they are dropped with a warning, because Codex sends `web_search`
  on every request and a 400 would stop it from working at all.

Deliberately not here: background responses, conversations, and images or files in the input (text-only model).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response

from dsv4.serve import validate
from dsv4.serve.core import ChatJob, ServeError, Step, Usage, dumps, new_id
from dsv4.serve.openai import thinking_of
from dsv4.serve.request_log import track
from dsv4.serve.responses_protocol import InputContentPart, InputItem, ResponsesRequest, ToolSpec
from dsv4.serve.turns import place_system_messages

log = logging.getLogger("dsv4.serve")

_ENVELOPE = "dsv4r1."  # version prefix of the opaque reasoning value
_TEXT_PARTS = ("input_text", "output_text", "text", "summary_text", "reasoning_text")
_CUSTOM_PARAMS = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}


# ---- the opaque reasoning value ---------------------------------------------------------------------------------
def seal_reasoning(text: str) -> str:
    return _ENVELOPE + base64.urlsafe_b64encode(text.encode()).decode()


def open_reasoning(value: str, where: str) -> str:
    try:
        if not value.startswith(_ENVELOPE):
            raise ValueError
        return base64.urlsafe_b64decode(value[len(_ENVELOPE):].encode()).decode()
    except ValueError:
        raise ServeError("invalid_request", f"{where}.encrypted_content was not produced by this server (reasoning "
                         "from another provider cannot be read by this model); drop the reasoning item or pass its "
                         "text in `content`.", param=f"{where}.encrypted_content") from None


# ---- stored responses -------------------------------------------------------------------------------------------
@dataclass
class Stored:
    response: dict[str, Any]
    history: list[dict[str, Any]]  # V4 messages of the conversation so far, output included, instructions not


class ResponseStore:
    """The last `capacity` stored responses, in memory (lost on restart, as the docs for `dsv4 serve` say)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, rid: str, stored: Stored) -> None:
        self._items[rid] = stored
        self._items.move_to_end(rid)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, rid: str) -> Stored | None:
        return self._items.get(rid)

    def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None


def _not_stored(rid: str, param: str | None = None) -> ServeError:
    return ServeError("not_found", f"No stored response with id {rid!r}: it was created with store=false, deleted, "
                      "evicted (the server keeps the last responses in memory only) or made before a restart.",
                      param=param)


# ---- request -> ChatJob -----------------------------------------------------------------------------------------
@dataclass
class Translated:
    job: ChatJob
    history: list[dict[str, Any]]  # the conversation without instructions (stored with the output)
    # flat name -> (namespace, name, "function" | "custom")
    tools: dict[str, tuple[str | None, str, str]]
    want_logprobs: bool


def _text(content: str | list[InputContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, p in enumerate(content):
        if p.type in _TEXT_PARTS and p.text is not None:
            parts.append(p.text)
        elif p.type == "refusal" and p.refusal is not None:
            parts.append(p.refusal)
        else:
            raise ServeError("invalid_request", f"{where}.content[{j}]: parts of type {p.type!r} are not supported by "
                             "this text-only model; send input_text parts.", param=f"{where}.content")
    return "\n\n".join(parts)


def _tools(specs: list[ToolSpec] | None) -> tuple[list[dict[str, Any]], dict[str, tuple[str | None, str, str]]]:
    out: list[dict[str, Any]] = []
    names: dict[str, tuple[str | None, str, str]] = {}
    dropped: list[str] = []

    def add(spec: ToolSpec, where: str, namespace: str | None, ns_description: str | None) -> None:
        if spec.type not in ("function", "custom"):
            dropped.append(spec.type)
            return
        if not spec.name:
            raise ServeError("invalid_request", f"{where}: a {spec.type} tool needs a `name`.", param=where)
        flat = f"{namespace}.{spec.name}" if namespace else spec.name
        if flat in names:
            raise ServeError("invalid_request", f"{where}: the tool name {flat!r} is given twice.", param=where)
        names[flat] = (namespace, spec.name, spec.type)
        description = spec.description or ""
        if ns_description:
            description = f"({namespace}: {ns_description}) {description}".strip()
        fn: dict[str, Any] = {"name": flat}
        if description:
            fn["description"] = description
        fn["parameters"] = (spec.parameters or {"type": "object", "properties": {}}) if spec.type == "function" \
            else _CUSTOM_PARAMS
        out.append({"type": "function", "function": fn})

    for i, spec in enumerate(specs or []):
        if spec.type == "namespace":
            if not spec.name or spec.tools is None:
                raise ServeError("invalid_request", f"tools[{i}]: a namespace tool needs `name` and `tools`.",
                                 param=f"tools[{i}]")
            for j, inner in enumerate(spec.tools):
                add(inner, f"tools[{i}].tools[{j}]", spec.name, spec.description)
        else:
            add(spec, f"tools[{i}]", None, None)
    if dropped:
        log.warning("responses: dropped hosted tools %s (they run on OpenAI's servers, not here); the model sees only "
                    "the function tools", sorted(set(dropped)))
    return out, names


def _flat(name: str, namespace: str | None) -> str:
    return f"{namespace}.{name}" if namespace else name


def _input_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None  # the assistant turn being assembled from items

    def assistant(new_if_started: bool = False) -> dict[str, Any]:
        nonlocal turn
        if turn is None or (new_if_started and (turn["content"] or turn.get("tool_calls"))):
            turn = {"role": "assistant", "content": ""}
            msgs.append(turn)
        return turn

    for i, it in enumerate(items):
        where = f"input[{i}]"
        kind = it.type or ("message" if it.role else None)
        if kind == "message":
            if it.role is None:
                raise ServeError("invalid_request", f"{where}: a message needs a `role`.", param=f"{where}.role")
            text = _text(it.content, where)
            if it.role == "assistant":
                a = assistant()
                a["content"] = f"{a['content']}\n\n{text}" if a["content"] and text else a["content"] + text
            else:
                turn = None
                msgs.append({"role": "user" if it.role == "user" else "system", "content": text})
        elif kind == "reasoning":
            if it.content:
                text = _text(it.content, where)
            elif it.encrypted_content:
                text = open_reasoning(it.encrypted_content, where)
            else:
                text = "\n\n".join(p.text or "" for p in it.summary or [])
            a = assistant(new_if_started=True)  # reasoning opens its turn: it comes before the turn's output
            a["reasoning_content"] = a.get("reasoning_content", "") + text
        elif kind in ("function_call", "custom_tool_call"):
            if not it.call_id or not it.name:
                raise ServeError("invalid_request", f"{where}: a {kind} item needs `call_id` and `name`.",
                                 param=where)
            args = it.arguments if kind == "function_call" else dumps({"input": it.input or ""})
            assistant().setdefault("tool_calls", []).append(
                {"id": it.call_id, "type": "function",
                 "function": {"name": _flat(it.name, it.namespace), "arguments": args or "{}"}})
        elif kind == "additional_tools":
            continue  # its tools join the request's (translate): V4 declares every tool in the system prompt
        elif kind in ("function_call_output", "custom_tool_call_output"):
            if not it.call_id:
                raise ServeError("invalid_request", f"{where}: a {kind} item needs the `call_id` of its call.",
                                 param=f"{where}.call_id")
            turn = None
            msgs.append({"role": "tool", "tool_call_id": it.call_id, "content": _text(it.output, f"{where}.output")})
        else:
            raise ServeError("invalid_request", f"{where}: input items of type {kind!r} are not supported here; send "
                             "messages, function_call / function_call_output and reasoning items.",
                             param=f"{where}.type")
    return msgs


def translate(req: ResponsesRequest, store: ResponseStore, default_thinking: bool = True) -> Translated:
    if req.background:
        raise ServeError("invalid_request", "background responses are not supported; send background=false and "
                         "keep the connection open (or stream).", param="background")
    if req.conversation is not None:
        raise ServeError("invalid_request", "conversations are not supported; pass previous_response_id or the "
                         "whole input.", param="conversation")
    history: list[dict[str, Any]] = []
    if req.previous_response_id:
        prev = store.get(req.previous_response_id)
        if prev is None:
            raise _not_stored(req.previous_response_id, "previous_response_id")
        history = list(prev.history)
    items = [InputItem(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    history += _input_messages(items)
    if not any(m["role"] in ("user", "tool") for m in history):
        raise ServeError("invalid_request", "input has no user message; send at least one.", param="input")

    # additional_tools items (Codex sends one ahead of the conversation) add to the tools; V4 has one tool list
    extra = [t for it in items if it.type == "additional_tools" for t in it.tools or []]
    tools, names = _tools((req.tools or []) + extra)
    choice: str | dict[str, str] = "auto" if tools else "none"
    tc = req.tool_choice
    if isinstance(tc, str):
        choice = tc
    elif tc is not None:
        if tc.type in ("function", "custom"):
            flat = tc.name if tc.name in names else next((f for f, v in names.items() if v[1] == tc.name), None)
            if flat is None:
                raise ServeError("invalid_request", f"tool_choice names the tool {tc.name!r}, which is not among "
                                 "`tools`.", param="tool_choice")
            choice = {"name": flat}
        elif tc.type == "allowed_tools":
            allowed = {_flat(t.get("name", ""), t.get("namespace")) for t in tc.tools or []}
            tools = [t for t in tools if t["function"]["name"] in allowed]
            choice = tc.mode or "auto"
        else:
            raise ServeError("invalid_request", f"tool_choice {tc.type!r} names a hosted tool, which this server "
                             "cannot run; use 'auto', 'required', 'none' or a function.", param="tool_choice")
    if choice != "none" and not tools:
        if choice == "auto":
            choice = "none"
        else:
            raise ServeError("invalid_request", f"tool_choice {tc!r} needs function tools; pass them or drop "
                             "tool_choice.", param="tool_choice")

    fmt = req.text.format if req.text else None
    response_format = None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise ServeError("invalid_request", "text.format json_schema needs `schema`.", param="text.format.schema")
        response_format = {"type": "json_schema", "name": fmt.name, "schema": fmt.schema_}
    elif fmt is not None and fmt.type == "json_object":
        response_format = {"type": "json_object"}

    thinking, effort = thinking_of(None, req.reasoning.effort if req.reasoning else None, default_thinking)
    include = set(req.include or [])
    want_lp = "message.output_text.logprobs" in include
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history
    job = ChatJob(
        messages=place_system_messages(messages), thinking=thinking, reasoning_effort=effort,
        tools=tools or None, tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls is not False,
        response_format=response_format, max_tokens=req.max_output_tokens,
        checks=functools.partial(validate.check_responses, req, messages),
        sampling={"temperature": req.temperature, "top_p": req.top_p,
                  "logprobs": (req.top_logprobs or 0) if want_lp else None},
    )
    return Translated(job, history, names, want_lp)


# ---- Steps -> output items and events ---------------------------------------------------------------------------
class ResponseBuilder:
    """Turns the core's `Step`s into output items, producing the stream's events on the way (the non-streaming
    response is the same builder with the events thrown away, so both always agree)."""

    def __init__(self, req: ResponsesRequest, rid: str, tr: Translated, tokenizer: Any,
                 on_done: Callable[[dict[str, Any], dict[str, Any]], None] | None = None) -> None:
        self.req, self.rid, self.tr, self.tokenizer, self.on_done = req, rid, tr, tokenizer, on_done
        self.created = int(time.time())
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None  # the item now streaming
        self.calls: dict[int, dict[str, Any]] = {}  # Step tool-call index -> its item
        self.reasoning = self.content = ""
        self.status, self.incomplete = "in_progress", None
        self.usage: dict[str, Any] | None = None
        self.sealed = "reasoning.encrypted_content" in set(req.include or [])

    # -- the response object
    def response(self) -> dict[str, Any]:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else \
            {"type": "text"}
        tool_choice = req.tool_choice if isinstance(req.tool_choice, str) or req.tool_choice is None else \
            req.tool_choice.model_dump(exclude_none=True)
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": self.status,
            "background": False, "error": None, "incomplete_details": self.incomplete,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "max_tool_calls": None,
            "model": req.model, "output": [dict(item) for item in self.output],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                          "summary": req.reasoning.summary if req.reasoning else None},
            "store": req.store is not False, "temperature": req.temperature, "text": {"format": fmt},
            "tool_choice": tool_choice or ("auto" if req.tools else "none"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "top_p": req.top_p, "truncation": "disabled", "usage": self.usage, "user": req.user,
            "metadata": req.metadata or {},
        }

    def _ev(self, kind: str, **data: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **data}
        self.seq += 1
        return ev

    def start(self) -> list[dict[str, Any]]:
        return [self._ev("response.created", response=self.response()),
                self._ev("response.in_progress", response=self.response())]

    # -- items
    def _open(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._close()
        self.output.append(item)
        self.open = item
        out.append(self._ev("response.output_item.added", output_index=len(self.output) - 1, item=dict(item)))
        if item["type"] == "message":
            out.append(self._ev("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                       "logprobs": []}))
        elif item["type"] == "reasoning":
            out.append(self._ev("response.content_part.added", item_id=item["id"], output_index=len(self.output) - 1,
                                content_index=0, part={"type": "reasoning_text", "text": ""}))
        return out

    def _close(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        i, iid, out = self.output.index(item), item["id"], []
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._ev("response.output_text.done", item_id=iid, output_index=i, content_index=0,
                                text=part["text"], logprobs=part["logprobs"]))
            out.append(self._ev("response.content_part.done", item_id=iid, output_index=i, content_index=0,
                                part=dict(part)))
        elif item["type"] == "reasoning":
            part = item["content"][0]
            out.append(self._ev("response.reasoning_text.done", item_id=iid, output_index=i, content_index=0,
                                text=part["text"]))
            out.append(self._ev("response.content_part.done", item_id=iid, output_index=i, content_index=0,
                                part=dict(part)))
            if self.sealed:
                item["encrypted_content"] = seal_reasoning(part["text"])
        elif item["type"] == "function_call":
            out.append(self._ev("response.function_call_arguments.done", item_id=iid, output_index=i,
                                name=item["name"], arguments=item["arguments"]))
        elif item["type"] == "custom_tool_call":
            item["input"] = _custom_input(item.pop("_arguments"))
            out.append(self._ev("response.custom_tool_call_input.done", item_id=iid, output_index=i,
                                input=item["input"]))
        done = {k: v for k, v in item.items() if not k.startswith("_")}
        out.append(self._ev("response.output_item.done", output_index=i, item=done))
        return out

    def feed(self, step: Step) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if step.reasoning:
            self.reasoning += step.reasoning
            if self.open is None or self.open["type"] != "reasoning":
                out += self._open({"id": new_id("rs_"), "type": "reasoning", "summary": [],
                                   "content": [{"type": "reasoning_text", "text": ""}], "status": "in_progress"})
            self.open["content"][0]["text"] += step.reasoning
            out.append(self._ev("response.reasoning_text.delta", item_id=self.open["id"],
                                output_index=len(self.output) - 1, content_index=0, delta=step.reasoning))
        if step.content:
            self.content += step.content
            if self.open is None or self.open["type"] != "message":
                out += self._open({"id": new_id("msg_"), "type": "message", "role": "assistant",
                                   "status": "in_progress",
                                   "content": [{"type": "output_text", "text": "", "annotations": [],
                                                "logprobs": []}]})
            lps = _logprobs(step.logprobs) if self.tr.want_logprobs else []
            part = self.open["content"][0]
            part["text"] += step.content
            part["logprobs"] += lps
            out.append(self._ev("response.output_text.delta", item_id=self.open["id"],
                                output_index=len(self.output) - 1, content_index=0, delta=step.content,
                                logprobs=lps))
        for tc in step.tool_calls:
            if tc.name is not None:
                namespace, name, kind = self.tr.tools.get(tc.name, (None, tc.name, "function"))
                item: dict[str, Any] = {"id": new_id("fc_"), "type": "function_call", "call_id": tc.id,
                                        "name": name, "arguments": "", "status": "in_progress"}
                if kind == "custom":
                    item = {"id": new_id("ctc_"), "type": "custom_tool_call", "call_id": tc.id, "name": name,
                            "input": "", "status": "in_progress", "_arguments": ""}
                if namespace:
                    item["namespace"] = namespace
                out += self._open(item)
                self.calls[tc.index] = item
            item = self.calls[tc.index]
            if not tc.arguments:
                continue
            if item["type"] == "custom_tool_call":  # its input is one string: known once the JSON is complete
                item["_arguments"] += tc.arguments
            else:
                item["arguments"] += tc.arguments
                out.append(self._ev("response.function_call_arguments.delta", item_id=item["id"],
                                    output_index=self.output.index(item), delta=tc.arguments))
        if step.finish_reason == "length":
            self.incomplete = {"reason": "max_output_tokens"}
        return out

    def finish(self, usage: Usage) -> list[dict[str, Any]]:
        out = self._close()
        reasoning_tokens = len(self.tokenizer.encode(self.reasoning)) if self.reasoning else 0
        self.usage = {"input_tokens": usage.prompt_tokens,
                      "input_tokens_details": {"cached_tokens": usage.cached_tokens},
                      "output_tokens": usage.completion_tokens,
                      "output_tokens_details": {"reasoning_tokens": min(reasoning_tokens, usage.completion_tokens)},
                      "total_tokens": usage.total_tokens}
        self.status = "incomplete" if self.incomplete else "completed"
        final = self.response()
        if self.on_done is not None:
            self.on_done(final, self.assistant_message())
        out.append(self._ev("response.incomplete" if self.incomplete else "response.completed", response=final))
        return out

    def assistant_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            msg["reasoning_content"] = self.reasoning
        calls = []
        for item in self.output:
            if item["type"] in ("function_call", "custom_tool_call"):
                args = item["arguments"] if item["type"] == "function_call" else dumps({"input": item["input"]})
                calls.append({"id": item["call_id"], "type": "function",
                              "function": {"name": _flat(item["name"], item.get("namespace")),
                                           "arguments": args}})
        if calls:
            msg["tool_calls"] = calls
        return msg

    def error(self, err: ServeError) -> list[dict[str, Any]]:
        self.status = "failed"
        code = {"overloaded": "server_overloaded", "internal": "server_error"}.get(err.kind, "invalid_request_error")
        final = self.response()
        final["error"] = {"code": code, "message": err.message}
        return [self._ev("error", code=code, message=err.message, param=err.param),
                self._ev("response.failed", response=final)]


def _custom_input(arguments: str) -> str:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return arguments
    return value.get("input", "") if isinstance(value, dict) and isinstance(value.get("input", ""), str) else \
        arguments


def _logprobs(lps: list[Any]) -> list[dict[str, Any]]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
            for lp in lps]


def _sse(ev: dict[str, Any]) -> bytes:
    return f"event: {ev['type']}\ndata: {dumps(ev)}\n\n".encode()


async def collect(events: AsyncIterator[Step | Usage], builder: ResponseBuilder) -> dict[str, Any]:
    builder.start()
    async for ev in events:
        if isinstance(ev, Usage):
            builder.finish(ev)
        else:
            builder.feed(ev)
    return builder.response()


async def stream(events: AsyncIterator[Step | Usage], builder: ResponseBuilder) -> AsyncIterator[bytes]:
    for ev in builder.start():
        yield _sse(ev)
    async for step in events:
        for ev in builder.finish(step) if isinstance(step, Usage) else builder.feed(step):
            yield _sse(ev)


# ---- routes -----------------------------------------------------------------------------------------------------
def register(app: Any, core: Any, run_stream: Callable[..., Any], run_unary: Callable[..., Any]) -> None:
    """Add the Responses routes to `app`; `run_stream` / `run_unary` are app.py's disconnect-aware runners."""
    store = ResponseStore()
    app.state.responses = store

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        core.check_model(body.model)
        tr = translate(body, store, core.default_thinking)
        prep = await core.off_loop(core.prepare_chat, tr.job, "max_output_tokens")
        rid = new_id("resp_")

        def keep(final: dict[str, Any], message: dict[str, Any]) -> None:
            if body.store is not False:
                store.put(rid, Stored(final, tr.history + [message]))

        builder = ResponseBuilder(body, rid, tr, core.tokenizer, keep)
        events = track(request, core.run(prep, rid))
        if body.stream:
            return await run_stream(core, "responses", request, events, lambda ev: stream(ev, builder),
                                    lambda err: b"".join(_sse(e) for e in builder.error(err)))
        return await run_unary(core, "responses", request, collect(events, builder))

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str) -> dict[str, Any]:
        stored = store.get(response_id)
        if stored is None:
            raise _not_stored(response_id)
        return stored.response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict[str, Any]:
        if not store.delete(response_id):
            raise _not_stored(response_id)
        return {"id": response_id, "object": "response", "deleted": True}
