"""One log line per HTTP request (logger `dsv4.serve.requests`): at info the method, path, status, prompt / cached /
completion tokens, time to first token and total time (for a stream: until its last byte); at debug also a summary
of the request body (its size, model, how many messages / items / tools, the limits and switches it set, never the
text itself, which can be long and private).

`RequestLog` is ASGI middleware; the routes hand each engine run's events through `track(request, events)`, which
adds the run's usage and first-token time to the request's record (a request with n prompts sums them).

Deliberately not here: metrics (metrics.py counts the same things for Prometheus).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dsv4.serve.core import Step, Usage

log = logging.getLogger("dsv4.serve.requests")

_KEY = "dsv4.request_log"
_SWITCHES = ("model", "stream", "max_tokens", "max_completion_tokens", "max_output_tokens", "temperature", "n",
             "tool_choice", "thinking", "reasoning_effort", "reasoning", "echo", "logprobs", "store",
             "previous_response_id")


@dataclass
class Record:
    start: float
    prompt: int = 0
    cached: int = 0
    completion: int = 0
    runs: int = 0
    first_token: float | None = None
    error: str | None = None  # the message of an error response (see `note_error`)


async def track(request: Any, events: AsyncIterator[Step | Usage]) -> AsyncIterator[Step | Usage]:
    """`events` unchanged; their usage and first-token time go into the request's log record."""
    rec: Record | None = request.scope.get("state", {}).get(_KEY)
    try:
        async for ev in events:
            if rec is not None:
                if isinstance(ev, Usage):
                    rec.prompt += ev.prompt_tokens
                    rec.cached += ev.cached_tokens
                    rec.completion += ev.completion_tokens
                    rec.runs += 1
                elif rec.first_token is None and (ev.content or ev.reasoning or ev.tool_calls):
                    rec.first_token = time.perf_counter()
            yield ev
    finally:
        # closing this iterator closes the core's at once, which aborts an unfinished request in the engine
        await events.aclose()  # type: ignore[attr-defined]


def note_error(request: Any, message: str) -> None:
    """Put an error response's message on the request's log line: a status alone does not say what went wrong."""
    rec: Record | None = request.scope.get("state", {}).get(_KEY)
    if rec is not None:
        rec.error = message


def summarize(body: bytes) -> str:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return f"{len(body)} bytes, not JSON"
    if not isinstance(data, dict):
        return f"{len(body)} bytes, a JSON {type(data).__name__}"
    parts = [f"{len(body)} bytes"]
    for key in ("messages", "input", "tools", "prompt"):
        value = data.get(key)
        if isinstance(value, list):
            parts.append(f"{key}={len(value)}")
        elif isinstance(value, str):
            parts.append(f"{key}=<{len(value)} chars>")
    if data.get("system") is not None:
        parts.append("system=yes")
    parts += [f"{k}={json.dumps(data[k], separators=(',', ':'))[:80]}" for k in _SWITCHES if data.get(k) is not None]
    return " ".join(parts)


class RequestLog:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rec = Record(time.perf_counter())
        scope.setdefault("state", {})[_KEY] = rec
        status: list[int] = []
        body = bytearray()
        debug = log.isEnabledFor(logging.DEBUG)

        async def receive_logged() -> Any:
            message = await receive()
            if debug and message["type"] == "http.request" and len(body) < (1 << 20):
                body.extend(message.get("body", b""))
            return message

        async def send_logged(message: Any) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive_logged, send_logged)
        finally:
            self._emit(scope, rec, status[0] if status else 499, bytes(body) if debug else None)

    @staticmethod
    def _emit(scope: Any, rec: Record, status: int, body: bytes | None) -> None:
        total = time.perf_counter() - rec.start
        tokens = (f"prompt={rec.prompt} cached={rec.cached} completion={rec.completion}" if rec.runs else
                  "prompt=- cached=- completion=-")
        ttft = f"{rec.first_token - rec.start:.3f}s" if rec.first_token is not None else "-"
        error = f" error={json.dumps(rec.error[:300], ensure_ascii=False)}" if rec.error else ""
        log.info("%s %s %d %s ttft=%s total=%.3fs%s", scope["method"], scope["path"], status, tokens, ttft, total,
                 error)
        if body:
            log.debug("%s %s body: %s", scope["method"], scope["path"], summarize(body))
