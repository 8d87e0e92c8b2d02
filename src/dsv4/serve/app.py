"""The HTTP server: FastAPI routes for the OpenAI and Anthropic APIs, auth, errors, metrics, and `dsv4 serve`.

Every failure a request can cause ends as that request's error in its API's format (OpenAI `{"error": {...}}` or
Anthropic `{"type": "error", ...}`), chosen by path; nothing a client sends reaches the engine loop unchecked, so no
request can stop the server. A stream's errors after the headers are sent arrive as an in-stream error event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.serve import anthropic as anthropic_api
from dsv4.serve import limits
from dsv4.serve import openai as openai_api
from dsv4.serve import responses as responses_api
from dsv4.serve import tokens as tokens_api
from dsv4.serve.bodyparse import BodyParser
from dsv4.serve.core import ServeError, ServingCore, Step, Usage, new_id
from dsv4.serve.guard import HostAllowList, allowed_hosts_for
from dsv4.serve.metrics import CONTENT_TYPE
from dsv4.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CountTokensRequest,
    CountTokensResponse,
    MessagesRequest,
    ModelCard,
    ModelList,
)
from dsv4.serve.request_log import RequestLog, note_error, track

log = logging.getLogger("dsv4.serve")


def _is_anthropic(request: Request) -> bool:
    return request.url.path.startswith("/v1/messages")


_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/messages": "messages",
              "/v1/messages/count_tokens": "count_tokens", "/v1/responses": "responses"}


def _error_response(request: Request, err: ServeError, status: int | None = None) -> JSONResponse:
    body = anthropic_api.error_body(err) if _is_anthropic(request) else openai_api.error_body(err)
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    status = status or err.status
    note_error(request, body["error"]["message"])  # as the client got it (Anthropic words length errors its own way)
    core: ServingCore = request.app.state.core
    core.metrics.requests.labels(_ENDPOINTS.get(request.url.path, "other"), str(status)).inc()
    return _ErrorJSON(body, status_code=status, headers=headers)


class _ErrorJSON(JSONResponse):
    """Error bodies in ASCII JSON: a message may quote what the client sent (a model name, a field), and text that
    is not valid Unicode (a lone surrogate) must still leave as a response instead of breaking the connection."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors()[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            return "The request body is not valid JSON; send a JSON object with Content-Type: application/json."
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "Invalid request: " + "; ".join(parts)


DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class _APIKey:
    """The key check as ASGI middleware, so it runs before the body is even read: a client without the key gets 401,
    whatever it sent (a dependency would answer malformed JSON with 400 first). Every path needs the key except
    `public`: /health and /version always (probes carry no key and learn only load figures or the version),
    /metrics and the API docs only when the server is started with --public-metrics / --public-docs
    (docs/security.md)."""

    def __init__(self, app: Any, key: str, public: tuple[str, ...] = ("/health",)) -> None:
        self.app = app
        self.key = key.encode()
        self.public = frozenset(public)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            request = Request(scope, receive)
            bearer = request.headers.get("authorization", "")
            given = request.headers.get("x-api-key") or (bearer[7:] if bearer.lower().startswith("bearer ") else None)
            if given is None or not hmac.compare_digest(given.encode(), self.key):
                err = ServeError("authentication", "Missing API key (send `Authorization: Bearer KEY` or "
                                 "`x-api-key: KEY`)." if not given else
                                 "Incorrect API key provided; use the key the server was started with.")
                await _error_response(request, err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _reject_host(scope: Any, receive: Any, send: Any, message: str) -> None:
    await _error_response(Request(scope, receive), ServeError("invalid_request", message))(scope, receive, send)


class _BodyLimit:
    """Refuse request bodies over `limit` bytes with 413 before reading them, so one huge upload cannot exhaust the
    server's memory. Bodies sent without Content-Length (chunked) are counted as they arrive."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        err = ServeError("too_large", f"The request body is over the server's limit of {self.limit} bytes; send a "
                         "smaller request (the limit follows the context length; `dsv4 serve --max-body-mb` sets it).")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = _error_response(request, err)
            # close the connection rather than read (and discard) the rest of an upload we refused
            response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise err
            return message

        await self.app(scope, counted, send)


def _not_utf8(reason: str) -> str:
    return f"The request body is not UTF-8 text ({reason}); send the JSON encoded as UTF-8."


def _json_body_route(parser: BodyParser) -> type[APIRoute]:
    """A route class whose JSON bodies over `parser.threshold` bytes are parsed in `parser`'s worker process
    (bodyparse.py). FastAPI then takes the parsed object from Starlette's per-request cache (`Request._json`, what
    `Request.json()` returns once set); errors end as FastAPI's own would (400 in the API's format, via the handlers
    below)."""

    class JSONBodyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Any]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
                if request.method == "POST" and (kind == "application/json" or kind.endswith("+json")):
                    body = await request.body()
                    if len(body) > parser.threshold:
                        verdict, value = await parser.parse(body)
                        if verdict == "invalid":
                            msg, pos = value
                            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", pos),
                                                           "msg": "JSON decode error", "input": {},
                                                           "ctx": {"error": msg}}])
                        if verdict == "deep":
                            raise StarletteHTTPException(400) from RecursionError()
                        if verdict == "undecodable":
                            raise ServeError("invalid_request", _not_utf8(value), param="body")
                        request._json = value
                return await handler(request)

            return route

    return JSONBodyRoute


def create_app(core: ServingCore, api_key: str | None = None,
               lifespan: Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]] | None = None,
               max_body_bytes: int | None = None, public_metrics: bool = False, public_docs: bool = False,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """`max_body_bytes=None`: the limit follows the context length (limits.default_body_limit). `public_*`: with an
    `api_key`, serve /metrics or the OpenAPI docs without it. `allowed_hosts`: the Host allow-list (guard.py)."""
    if max_body_bytes is None:
        max_body_bytes = limits.default_body_limit(core.max_model_len, core.token_bytes)
    app = FastAPI(title="dsv4", version="0.1.0", lifespan=lifespan,
                  description="DeepSeek-V4 with the OpenAI and Anthropic HTTP APIs")
    app.state.core = core
    app.router.route_class = _json_body_route(core.bodies)  # before any route is added

    # ---- errors: each API's own format (the real APIs answer 400 where FastAPI would say 422) ----------------------
    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # param: the first field pydantic refused (its loc without the leading "body"), as OpenAI's errors name it
        first = next((e.get("loc", ()) for e in exc.errors() if e.get("type") != "json_invalid"), ())
        param = ".".join(str(x) for x in first if x != "body") or None
        return _error_response(request, ServeError("invalid_request", _validation_message(exc), param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ServeError):  # FastAPI wraps errors raised while reading the body (size limit)
            return _error_response(request, exc.__cause__)
        if isinstance(exc.__cause__, RecursionError):  # JSON nested past the parser's depth limit (about 1000)
            return _error_response(request, ServeError("invalid_request", "The request body nests JSON arrays / "
                                                       "objects too deeply to parse; flatten it.", param="body"))
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's own parse of a small body that is not UTF-8
            return _error_response(request, ServeError("invalid_request", _not_utf8(str(exc.__cause__)),
                                                       param="body"))
        kind = "not_found" if exc.status_code == 404 else "invalid_request"
        detail = exc.detail
        if exc.status_code == 404 and detail == "Not Found":
            detail = ("no such endpoint on this server (it serves /v1/chat/completions, /v1/completions, "
                      "/v1/responses, /v1/messages, /v1/models, /tokenize, /detokenize; see /docs)")
        err = ServeError(kind, f"{request.method} {request.url.path}: {detail}")
        return _error_response(request, err, exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return _error_response(request, ServeError("internal", f"Internal error ({type(exc).__name__}: {exc}); "
                                                   "the server is still up, retry or report this."))

    # (added last = runs first) the key check, then the body size
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    app.state.max_body_bytes = max_body_bytes
    if api_key is not None:
        public = ("/health", "/version") + (("/metrics",) if public_metrics else ()) + (
            DOCS_PATHS if public_docs else ())
        app.add_middleware(_APIKey, key=api_key, public=public)
    if allowed_hosts is not None:  # a rebinding page's requests get no further (guard.py)
        app.add_middleware(HostAllowList, allowed=allowed_hosts, reject=_reject_host)
    app.add_middleware(RequestLog)  # outermost: logs every request, refused ones too

    # ---- plain endpoints -------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": core.in_flight, **core.engine_stats()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(core.metrics.render(), media_type=CONTENT_TYPE)

    # The Anthropic SDK sends `anthropic-version`; it gets Anthropic's model objects, everyone else OpenAI's.
    @app.get("/v1/models", response_model=ModelList)
    async def models(request: Request) -> Any:
        if "anthropic-version" in request.headers:
            cards = [anthropic_api.model_card(name, core.created) for name in core.model_names]
            return JSONResponse({"data": cards, "has_more": False, "first_id": cards[0]["id"],
                                 "last_id": cards[-1]["id"]})
        return ModelList(data=[ModelCard(id=name, created=core.created, max_model_len=core.max_model_len)
                               for name in core.model_names])

    @app.get("/v1/models/{model_id}", response_model=ModelCard)
    async def model(model_id: str, request: Request) -> Any:
        core.check_model(model_id)
        if "anthropic-version" in request.headers:
            return JSONResponse(anthropic_api.model_card(model_id, core.created))
        return ModelCard(id=model_id, created=core.created, max_model_len=core.max_model_len)

    # ---- OpenAI ----------------------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        core.check_model(body.model)
        job = openai_api.chat_job(body, core.default_thinking)
        prep = await core.off_loop(core.prepare_chat, job,
                                   "max_completion_tokens" if body.max_completion_tokens else "max_tokens")
        rid = new_id("chatcmpl-")
        events = track(request, core.run(prep, rid))
        want_lp = bool(body.logprobs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(core, "chat", request, events, lambda ev: openai_api.chat_stream(
                ev, rid, body.model, prep.n, include_usage, want_lp), openai_api.stream_error)
        return await _unary(core, "chat", request, openai_api.chat_response(events, rid, body.model, prep.n, want_lp))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        core.check_model(body.model)
        sampling, stop = openai_api.completion_sampling(body)
        prompts = await core.off_loop(openai_api.completion_prompts, body, core.encode)
        preps = [core.prepare_completion(ids, sampling, stop, body.max_tokens) for ids in prompts]
        rid = new_id("cmpl-")
        want_lp = body.logprobs is not None
        if body.stream:
            if len(preps) != 1:
                raise ServeError("invalid_request", "Streaming supports one prompt per request; send the prompts in "
                                 "separate requests or set stream=false.", param="prompt")
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = track(request, core.run(preps[0], rid))
            echo_text = core.tokenizer.decode(prompts[0]) if body.echo else ""
            return await _stream(core, "completions", request, events, lambda ev: openai_api.completion_stream(
                ev, rid, body.model, include_usage, want_lp, preps[0].n, echo_text), openai_api.stream_error)
        echo = [core.tokenizer.decode(ids) if body.echo else "" for ids in prompts]

        async def collect_all() -> dict[str, Any]:
            tasks = [asyncio.ensure_future(_collect(track(request, core.run(p, f"{rid}-{i}"))))
                     for i, p in enumerate(preps)]
            try:
                results = await asyncio.gather(*tasks)
            finally:  # one prompt failed or the client left: stop the others too (aborting them in the engine)
                for t in tasks:
                    t.cancel()
            return openai_api.completion_response(list(results), rid, body.model, preps[0].n, echo, want_lp,
                                                  prompts, body.prompt_logprobs is not None)

        return await _unary(core, "completions", request, collect_all())

    # ---- Anthropic -------------------------------------------------------------------------------------------------
    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        core.check_model(body.model)
        prep = await core.off_loop(core.prepare_chat, anthropic_api.chat_job(body, core.default_thinking))
        events = track(request, core.run(prep, new_id("msg-")))
        if body.stream:
            live: dict[str, Any] = {}
            return await _stream(core, "messages", request, events, lambda ev: anthropic_api.message_stream(
                ev, body.model, len(prep.prompt_ids), prep.thinking, live), anthropic_api.stream_error,
                ping=lambda: anthropic_api.keepalive(live))
        return await _unary(core, "messages", request, anthropic_api.message_response(events, body.model))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> CountTokensResponse:
        core.check_model(body.model)
        return CountTokensResponse(input_tokens=await core.off_loop(core.count_chat_tokens,
                                                                    anthropic_api.chat_job(body, core.default_thinking)))

    # ---- OpenAI Responses (serve/responses.py) ----------------------------------------------------------------------
    responses_api.register(app, core, _stream, _unary)
    # ---- vLLM's /tokenize, /detokenize, /version (serve/tokens.py) -------------------------------------------------
    tokens_api.register(app, core)

    def openapi() -> dict[str, Any]:
        # Advertise the served names as the `model` enum: clients and fuzzers then see which names are valid.
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for schema in doc.get("components", {}).get("schemas", {}).values():
                model_prop = schema.get("properties", {}).get("model")
                if model_prop is not None and schema.get("title", "").endswith("Request"):
                    model_prop["enum"] = list(core.model_names)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


async def _collect(events: AsyncIterator[Step | Usage]) -> list[Step | Usage]:
    return [ev async for ev in events]


class _ClientGone(Exception):
    pass


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work`, cancelling it (and so aborting its request in the engine) if the client hangs up first; raises
    `_ClientGone` then. Route handlers are not told about disconnects otherwise."""
    task = asyncio.ensure_future(work)
    gone = asyncio.Event()
    watcher = asyncio.ensure_future(_watch_disconnect(request, task, gone))
    try:
        return await task
    except asyncio.CancelledError:
        if not gone.is_set():
            raise  # the server itself is stopping
        raise _ClientGone from None
    finally:
        watcher.cancel()


def _gone_response(core: ServingCore, endpoint: str) -> Response:
    # Answer into the void (nginx's 499) rather than letting the cancellation reach uvicorn as an application error.
    core.metrics.requests.labels(endpoint, "499").inc()
    return Response(status_code=499)


async def _unary(core: ServingCore, endpoint: str, request: Request, work: Any) -> Response:
    try:
        body = await _unless_disconnected(request, work)
    except _ClientGone:
        return _gone_response(core, endpoint)
    core.metrics.requests.labels(endpoint, "200").inc()
    return JSONResponse(body)


async def _watch_disconnect(request: Request, task: asyncio.Future[Any], gone: asyncio.Event) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            task.cancel()
            return


async def _stream(core: ServingCore, endpoint: str, request: Request, events: AsyncIterator[Step | Usage],
                  render: Callable[[AsyncIterator[Step | Usage]], AsyncIterator[bytes]],
                  on_error: Callable[[ServeError], bytes], ping: Callable[[], bytes] | None = None) -> Response:
    # The stream starts at admission, not at the first token: a long prompt's prefill can take minutes, and clients
    # give up on a silent connection (Claude Code re-sends after 300 s). Admission and the engine's request checks
    # run synchronously in the first step of `events`, so one loop turn tells a refused request (still a proper
    # status code) from an accepted one (headers, the API's opening event, then pings until tokens arrive).
    first = asyncio.ensure_future(events.__anext__())
    await asyncio.sleep(0)
    if first.done() and first.exception() is not None and not isinstance(first.exception(), StopAsyncIteration):
        await events.aclose()
        raise first.exception()  # type: ignore[misc]
    if ping is None:
        ping = (lambda: anthropic_api.PING) if endpoint == "messages" else (lambda: openai_api.PING)

    async def chained() -> AsyncIterator[Step | Usage]:
        try:
            ev = await first
        except StopAsyncIteration:
            return
        yield ev
        async for ev in events:
            yield ev

    async def body() -> AsyncIterator[bytes]:
        status = "200"
        try:
            async for chunk in _with_pings(render(chained()), ping, core.ping_interval):
                yield chunk
        except ServeError as e:
            status = str(e.status)
            yield on_error(e)
        except Exception as e:  # the stream is already 200: report in-band, keep the server up
            log.exception("stream failed")
            status = "500"
            yield on_error(ServeError("internal", f"Internal error ({type(e).__name__}: {e}); retry or report this."))
        except BaseException:
            status = "499"  # client disconnected: the stream task is cancelled
            raise
        finally:
            core.metrics.requests.labels(endpoint, status).inc()
            if not first.done():
                first.cancel()
            # closing the core's iterator aborts the request in the engine if it has not finished
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


_END = object()


async def _get_within(queue: asyncio.Queue[Any], seconds: float) -> Any:
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await queue.get()
    return await asyncio.wait_for(queue.get(), seconds)  # Python 3.10: no asyncio.timeout (a task per call)


async def _with_pings(chunks: AsyncIterator[bytes], ping: Callable[[], bytes], interval: float) -> AsyncIterator[bytes]:
    """`chunks`, plus `ping()` whenever nothing came for `interval` seconds (while the prompt is prefilled, or the
    request waits for a batch slot). One task renders into a small queue (backpressure for a slow client); waiting on
    the queue under a timeout costs no task per chunk (a task per chunk measured 50 us of event-loop time each)."""
    queue: asyncio.Queue[tuple[bytes | None, Any]] = asyncio.Queue(maxsize=64)

    async def produce() -> None:
        try:
            async for chunk in chunks:
                await queue.put((chunk, None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer, which raises it where the stream's errors are handled
            await queue.put((None, e))
            return
        await queue.put((None, _END))

    producer = asyncio.ensure_future(produce())
    try:
        while True:
            try:
                chunk, end = await _get_within(queue, interval)
            except asyncio.TimeoutError:
                yield ping()
                continue
            if end is _END:
                return
            if end is not None:
                raise end
            assert chunk is not None
            yield chunk
    finally:
        producer.cancel()
        with contextlib.suppress(BaseException):
            await producer


# ---- `dsv4 serve` ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv4 serve", description="Serve a V4 model with the OpenAI and Anthropic APIs.")
    p.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer / x-api-key)")
    p.add_argument("--allowed-hosts", nargs="+", default=None, metavar="HOST",
                   help="Host header values to accept besides the loopback names (when bound to loopback, only "
                        "those are accepted, against DNS rebinding); '*' accepts any")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model directory's name)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length limit (default: the engine's)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences decoded together (engine option)")
    p.add_argument("--cache-memory-gb", type=float, default=None, help="KV-cache budget in GiB (engine option)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step (engine option, default 512)")
    p.add_argument("--admission-reserve", type=int, default=None,
                   help="tokens of each step a running prefill leaves to waiting requests (engine option, default a "
                        "quarter of the step budget; 0 = a long prefill holds new requests back until it is done)")
    p.add_argument("--max-step-ms", type=float, default=None,
                   help="time target in ms of a step shared by several sequences (engine option, default 20): "
                        "prefill chunks are sized from measured step costs to fit it, so requests arriving during a "
                        "long prefill wait for short steps; 0 = token budget only")
    p.add_argument("--max-concurrency", type=int, default=256,
                   help="requests in flight before new ones get 503 + Retry-After")
    p.add_argument("--max-body-mb", type=float, default=None,
                   help="largest request body in MiB; larger ones get 413 before they are read (default: what the "
                        "context length can use, at most 64; docs/security.md)")
    p.add_argument("--public-metrics", action="store_true",
                   help="with --api-key, serve /metrics without the key (for a scraper on a trusted network)")
    p.add_argument("--public-docs", action="store_true",
                   help="with --api-key, serve /docs, /redoc and /openapi.json without the key")
    p.add_argument("--thinking", default="enabled", choices=["enabled", "disabled"],
                   help="thinking mode of requests that do not choose one (default enabled, as DeepSeek's API); "
                   "'disabled' suits clients that never show reasoning_content")
    p.add_argument("--accept-any-model-name", action="store_true",
                   help="treat any requested model name as this model (agent CLIs send their own default names)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _uvicorn_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal after its graceful shutdown, so the process dies "killed by SIGINT" with a
            # KeyboardInterrupt traceback; the graceful shutdown already is the whole answer to the signal: exit 0.
            self._captured_signals.clear()

    return Server


def build_core(args: argparse.Namespace) -> ServingCore:
    import torch

    from dsv4.engine import LLM, AsyncLLM

    if args.model is None:
        from dsv4.cli import default_model_path

        args.model = default_model_path()
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"dsv4 serve: {args.model} is not a checkpoint directory (no config.json); pass --model PATH")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    options: dict[str, Any] = {}
    for name in ("max_model_len", "max_num_seqs", "cache_memory_gb", "max_num_batched_tokens", "admission_reserve",
                 "max_step_ms"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if options.get("max_step_ms") == 0:
        options["max_step_ms"] = None
    log.info("dsv4 serve: loading %s on %s (%s)", args.model, device, dtype)
    engine = AsyncLLM(LLM(str(args.model), dtype=getattr(torch, dtype), device=device, **options))
    names = args.served_model_name or [Path(args.model).resolve().name]
    return ServingCore(engine, engine.tokenizer, model_names=names, max_model_len=engine.engine.max_model_len,
                       max_concurrency=args.max_concurrency, default_thinking=args.thinking == "enabled",
                       accept_any_model=args.accept_any_model_name)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        log.warning("dsv4 serve: binding %s without --api-key: anyone who can reach this port can use the model",
                    args.host)
    core = build_core(args)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await core.start()
        log.info("dsv4 serve: listening on http://%s:%d (model %s)", args.host, args.port, ", ".join(core.model_names))
        log.info("dsv4 serve: request bodies up to %d bytes (--max-body-mb), context %d tokens",
                 app.state.max_body_bytes, core.max_model_len)
        try:
            yield
        finally:
            log.info("dsv4 serve: shutting down")
            await core.stop()

    body_limit = None if args.max_body_mb is None else int(args.max_body_mb * (1 << 20))
    app = create_app(core, api_key=args.api_key, lifespan=lifespan, max_body_bytes=body_limit,
                     public_metrics=args.public_metrics, public_docs=args.public_docs,
                     allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts))
    _Server = _uvicorn_server_class()
    # uvicorn installs the SIGINT/SIGTERM handlers: it stops accepting, lets open requests finish for up to
    # timeout_graceful_shutdown seconds, then runs the lifespan shutdown (which stops the engine loop).
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=False)
    _Server(config).run()
    log.info("dsv4 serve: stopped")
    return 0
