"""The OpenAI API: requests -> `ChatJob`, `Step`s -> responses and SSE chunks, errors in OpenAI's format.

Thinking follows DeepSeek's API: thinking is on unless `thinking: {"type": "disabled"}` (or `reasoning_effort:
"none"`); `reasoning_effort` minimal/low/medium map to high and xhigh to max, the two efforts V4 was trained with;
any other value runs at the default effort (high) and is logged, so a newer SDK's value does not fail the request.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from dsv4.serve import validate
from dsv4.serve.core import ChatJob, ServeError, Step, Usage, dumps
from dsv4.serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIMessage

log = logging.getLogger("dsv4.serve")

_EFFORT = {"minimal": "high", "low": "high", "medium": "high", "high": "high", "xhigh": "max", "max": "max"}
_ERROR_TYPE = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "not_found": "invalid_request_error",
    "too_large": "invalid_request_error",
    "overloaded": "server_overloaded",
    "internal": "server_error",
}
PING = b": keep-alive\n\n"  # an SSE comment: every OpenAI client skips it
_ERROR_CODE = {"authentication": "invalid_api_key", "not_found": "not_found"}


def error_body(err: ServeError) -> dict[str, Any]:
    # only a missing model is `model_not_found` (SDKs report that code as "the model does not exist")
    code = "model_not_found" if err.kind == "not_found" and err.param == "model" else _ERROR_CODE.get(err.kind)
    return {"error": {"message": err.message, "type": _ERROR_TYPE[err.kind], "param": err.param, "code": code}}


def _text(content: str | list[Any] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for p in content:
        if p.type != "text" or p.text is None:
            raise ServeError("invalid_request", f"{where}: content parts of type {p.type!r} are not supported by this "
                             "text-only model; send text parts only.", param="messages")
        parts.append(p.text)
    return "\n\n".join(parts)


def _message(i: int, m: OpenAIMessage) -> dict[str, Any]:
    where = f"messages[{i}]"
    if m.role in ("system", "developer"):
        # OpenAI's "developer" is its newer name for "system"; V4's own developer role is an internal search-agent
        # format that DeepSeek's API rejects, so it is not reachable from here.
        return {"role": "system", "content": _text(m.content, where)}
    if m.role == "user":
        return {"role": "user", "content": _text(m.content, where)}
    if m.role == "tool":
        if not m.tool_call_id:
            raise ServeError("invalid_request", f"{where}: a tool message needs `tool_call_id`, the id of the call it "
                             "answers.", param=f"{where}.tool_call_id")
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": _text(m.content, where)}
    out: dict[str, Any] = {"role": "assistant", "content": _text(m.content, where)}
    if m.reasoning_content:
        out["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": tc.id or f"call_{i}_{j}", "type": "function",
             "function": {"name": tc.function.name,
                          "arguments": "{}" if tc.function.arguments is None else tc.function.arguments}}
            for j, tc in enumerate(m.tool_calls)
        ]
    return out


def thinking_of(thinking: Any, effort: str | None, default: bool = True) -> tuple[bool, str | None]:
    """(thinking on, V4 effort) from a `thinking` toggle and an effort; `default` when neither chooses."""
    effort = effort.strip().lower() if isinstance(effort, str) else effort
    if effort and effort != "none" and effort not in _EFFORT:
        # accepted (a newer SDK's value must not fail the request) and run at the default effort, visibly
        log.warning("unknown reasoning effort %r; using the default (high). Known: none, %s", effort, ", ".join(_EFFORT))
        effort = None
    enabled = thinking.type != "disabled" if thinking is not None else (effort not in (None, "none") or default)
    if effort == "none":
        enabled = False
    return enabled, (_EFFORT.get(effort) if enabled and effort else None)


def chat_job(req: ChatCompletionRequest, default_thinking: bool = True) -> ChatJob:
    if req.logit_bias:
        raise ServeError("invalid_request", "logit_bias is not supported by this server; remove it.",
                         param="logit_bias")
    thinking, effort = thinking_of(req.thinking, req.reasoning_effort, default_thinking)
    tool_choice: str | dict[str, str] = "auto" if req.tools else "none"
    if req.tool_choice is not None:
        if isinstance(req.tool_choice, str):
            tool_choice = req.tool_choice
        else:
            tool_choice = {"name": req.tool_choice.function.name}
    if tool_choice != "none" and not req.tools:
        raise ServeError("invalid_request", f"tool_choice={req.tool_choice!r} needs `tools`; pass the tool "
                         "definitions or drop tool_choice.", param="tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    if isinstance(tool_choice, dict) and tool_choice["name"] not in {t.function.name for t in req.tools or []}:
        raise ServeError("invalid_request", f"tool_choice names the function {tool_choice['name']!r}, which is not "
                         "among `tools`.", param="tool_choice")
    fmt = None
    if req.response_format is not None and req.response_format.type != "text":
        if req.response_format.type == "json_schema":
            spec = req.response_format.json_schema
            if spec is None or spec.schema_ is None:
                raise ServeError("invalid_request", "response_format json_schema needs `json_schema.schema`.",
                                 param="response_format")
            fmt = {"type": "json_schema", "name": spec.name, "schema": spec.schema_}
        else:
            fmt = {"type": "json_object"}
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if req.logprobs is False and req.top_logprobs:
        raise ServeError("invalid_request", "top_logprobs needs logprobs=true.", param="top_logprobs")
    return ChatJob(
        messages=[_message(i, m) for i, m in enumerate(req.messages)],
        thinking=thinking, reasoning_effort=effort, tools=tools, tool_choice=tool_choice,
        parallel_tool_calls=req.parallel_tool_calls is not False, response_format=fmt,
        max_tokens=req.max_completion_tokens or req.max_tokens, stop=stop,
        sampling=_sampling(req, logprobs=(req.top_logprobs or 0) if req.logprobs else None),
        checks=functools.partial(validate.check_openai_chat, req),
    )


def _sampling(req: ChatCompletionRequest | CompletionRequest, logprobs: int | None) -> dict[str, Any]:
    return {"temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "seed": req.seed, "n": req.n,
            "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
            "logprobs": logprobs}


def completion_sampling(req: CompletionRequest) -> tuple[dict[str, Any], list[str]]:
    if req.suffix:
        raise ServeError("invalid_request", "suffix (fill-in-the-middle) is not supported; remove it.", param="suffix")
    if req.logit_bias:
        raise ServeError("invalid_request", "logit_bias is not supported by this server; remove it.",
                         param="logit_bias")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ServeError("invalid_request", "best_of different from n is not supported; set best_of=n or drop it.",
                         param="best_of")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sampling = _sampling(req, logprobs=req.logprobs)
    # echo with logprobs scores the prompt too (legacy OpenAI, vLLM): the first token has no logprob
    wanted = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    if wanted:
        sampling["prompt_logprobs"] = max(wanted)
    return sampling, stop


def completion_prompts(req: CompletionRequest, encode: Any) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        prompts = [encode(p)]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [encode(x) for x in p]  # type: ignore[arg-type]
    elif p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]  # type: ignore[arg-type]
    else:
        prompts = []
    if not prompts or any(not ids for ids in prompts):
        raise ServeError("invalid_request", "prompt must be a non-empty string, a list of strings, or token ids.",
                         param="prompt")
    return prompts


# ---- responses ---------------------------------------------------------------------------------------------------
def _logprobs_json(step_lps: list[Any]) -> list[dict[str, Any]]:
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top]}
            for lp in step_lps]


def _usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _finish(step: Step) -> str:
    return "stop" if step.finish_reason == "stop_sequence" else step.finish_reason or "stop"


async def chat_response(events: AsyncIterator[Step | Usage], rid: str, model: str, n: int,
                        want_logprobs: bool) -> dict[str, Any]:
    choices = [{"content": "", "reasoning": "", "calls": [], "finish": "stop", "lps": []} for _ in range(n)]
    usage = None
    async for ev in events:
        if isinstance(ev, Usage):
            usage = ev
            continue
        c = choices[ev.index]
        c["content"] += ev.content
        c["reasoning"] += ev.reasoning
        c["lps"] += ev.logprobs
        for tc in ev.tool_calls:
            if tc.name is not None:
                c["calls"].append({"id": tc.id, "type": "function", "function": {"name": tc.name, "arguments": ""}})
            c["calls"][tc.index]["function"]["arguments"] += tc.arguments
        if ev.finish_reason:
            c["finish"] = _finish(ev)
    assert usage is not None
    out = []
    for i, c in enumerate(choices):
        msg: dict[str, Any] = {"role": "assistant", "content": c["content"] or (None if c["calls"] else "")}
        if c["reasoning"]:
            msg["reasoning_content"] = c["reasoning"]
        if c["calls"]:
            msg["tool_calls"] = c["calls"]
        out.append({"index": i, "message": msg, "finish_reason": c["finish"],
                    "logprobs": {"content": _logprobs_json(c["lps"])} if want_logprobs else None})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": out,
            "usage": _usage(usage)}


def _sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


async def chat_stream(events: AsyncIterator[Step | Usage], rid: str, model: str, n: int, include_usage: bool,
                      want_logprobs: bool) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        body: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                                "choices": choices}
        if include_usage:
            body["usage"] = _usage(usage) if usage is not None else None
        return _sse(body)

    for i in range(n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    async for ev in events:
        if isinstance(ev, Usage):
            if include_usage:
                yield chunk([], ev)
            break
        lps = {"content": _logprobs_json(ev.logprobs)} if want_logprobs and ev.logprobs else None
        # reasoning, content and tool calls go in separate chunks: clients treat a delta as one kind of thing
        deltas: list[dict[str, Any]] = []
        if ev.reasoning:
            deltas.append({"reasoning_content": ev.reasoning})
        if ev.content:
            deltas.append({"content": ev.content})
        if ev.tool_calls:
            calls = []
            for tc in ev.tool_calls:
                d: dict[str, Any] = {"index": tc.index}
                if tc.name is not None:
                    d.update(id=tc.id, type="function", function={"name": tc.name, "arguments": tc.arguments})
                else:
                    d["function"] = {"arguments": tc.arguments}
                calls.append(d)
            deltas.append({"tool_calls": calls})
        if not deltas:
            deltas.append({})
        for j, delta in enumerate(deltas):
            last = j == len(deltas) - 1
            yield chunk([{"index": ev.index, "delta": delta, "logprobs": lps if last else None,
                          "finish_reason": _finish(ev) if last and ev.finish_reason else None}])
    yield b"data: [DONE]\n\n"


def completion_response(results: list[list[Step | Usage]], rid: str, model: str, n: int, echo_texts: list[str],
                        want_logprobs: bool, prompts: list[list[int]] | None = None,
                        vllm_prompt_logprobs: bool = False) -> dict[str, Any]:
    """`results[p]` = the collected events of prompt p; choice p*n+i is choice i of prompt p, as OpenAI numbers them.
    With echo and logprobs the choice's logprobs start with the prompt's tokens (the first one's logprob null)."""
    choices: list[dict[str, Any]] = []
    prompt_tokens = completion_tokens = cached = 0
    for p, events in enumerate(results):
        texts = [echo_texts[p] for _ in range(n)]
        finish = ["stop"] * n
        lps: list[list[Any]] = [[] for _ in range(n)]
        prompt_lps = None
        for ev in events:
            if isinstance(ev, Usage):
                prompt_tokens += ev.prompt_tokens
                completion_tokens += ev.completion_tokens
                cached += ev.cached_tokens
                continue
            if ev.prompt_logprobs is not None:
                prompt_lps = ev.prompt_logprobs
            texts[ev.index] += ev.content
            lps[ev.index] += ev.logprobs
            if ev.finish_reason:
                finish[ev.index] = _finish(ev)
        echo_lps = prompt_lps if echo_texts[p] and want_logprobs else None
        for i in range(n):
            choice: dict[str, Any] = {"index": p * n + i, "text": texts[i], "finish_reason": finish[i],
                                      "logprobs": _legacy_logprobs(lps[i], 0, echo_lps) if want_logprobs else None}
            if vllm_prompt_logprobs:
                choice["prompt_logprobs"] = _vllm_prompt_logprobs(prompt_lps, (prompts or [[]])[p])
            choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(Usage(prompt_tokens, completion_tokens, cached))}


def _legacy_logprobs(lps: list[Any], start: int = 0, prompt: list[Any] | None = None) -> dict[str, Any]:
    """The legacy `logprobs` object; `prompt` (echo): the prompt tokens' entries first (the first one's logprob and
    top_logprobs null), with text offsets counted from the start of the prompt."""
    entries = list(prompt or []) + lps
    offsets, pos = [], 0 if prompt else start
    for lp in entries:
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": [lp.token for lp in entries], "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [None if lp.logprob is None else dict(lp.top) for lp in entries],
            "text_offset": offsets}


def _vllm_prompt_logprobs(prompt_lps: list[Any] | None, ids: list[int]) -> list[Any] | None:
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}} for the
    prompt token and the top candidates; rank is the place among the candidates (null for a prompt token outside
    them: the engine does not rank the whole vocabulary)."""
    if prompt_lps is None:
        return None
    out: list[Any] = []
    for tid, lp in zip(ids, prompt_lps):
        if lp.logprob is None:
            out.append(None)
            continue
        entry: dict[str, Any] = {str(tid): {"logprob": lp.logprob, "rank": None, "decoded_token": lp.token}}
        for rank, (cand, (tok, val)) in enumerate(zip(lp.top_ids, lp.top), 1):
            entry[str(cand)] = {"logprob": val, "rank": rank, "decoded_token": tok}
        out.append(entry)
    return out


async def completion_stream(events: AsyncIterator[Step | Usage], rid: str, model: str, include_usage: bool,
                            want_logprobs: bool, n: int = 1, echo_text: str = "") -> AsyncIterator[bytes]:
    created = int(time.time())

    def echo(prompt_lps: list[Any] | None) -> list[bytes]:  # the prompt comes first, as its own chunk per choice
        return [_sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                      "choices": [{"index": i, "text": echo_text, "finish_reason": None,
                                   "logprobs": _legacy_logprobs([], 0, prompt_lps) if prompt_lps else None}]})
                for i in range(n)]

    # with logprobs the echo waits for the prompt's logprobs (the first event); without, it goes out at once
    echo_pending = bool(echo_text) and want_logprobs
    for chunk in echo(None) if echo_text and not echo_pending else []:
        yield chunk
    async for ev in events:
        if isinstance(ev, Step) and ev.prompt_logprobs is not None:
            for chunk in echo(ev.prompt_logprobs) if echo_pending else []:
                yield chunk
            echo_pending = False
            continue
        if isinstance(ev, Usage):
            if include_usage:
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                            "choices": [], "usage": _usage(ev)})
            break
        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": ev.index, "text": ev.content,
                                 "logprobs": _legacy_logprobs(ev.logprobs) if want_logprobs else None,
                                 "finish_reason": _finish(ev) if ev.finish_reason else None}]})
    yield b"data: [DONE]\n\n"


def stream_error(err: ServeError) -> bytes:
    return _sse(error_body(err))
