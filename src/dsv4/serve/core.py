"""The API-neutral core of the server: one `ChatJob` in, a stream of per-choice `Step`s out.

openai.py and anthropic.py translate their requests into a `ChatJob` (V4 chat messages + thinking mode + tools +
sampling) and the `Step`s back into their own response and SSE shapes; everything between (the V4 prompt, limits,
the constraint, the engine stream, the output parser, usage, metrics, abort on exit) happens here once.

Deliberately not here: HTTP (app.py), request/response field names (protocol.py and the two API modules).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dsv4.serve.bodyparse import BodyParser
from dsv4.serve.budget import ThinkingBudget
from dsv4.serve.guard import scrub_paths
from dsv4.serve.metrics import ServerMetrics


T = TypeVar("T")
log = logging.getLogger("dsv4.serve")


class ServeError(Exception):
    """An error one request caused; each API renders it in its own error format."""

    STATUS = {"invalid_request": 400, "authentication": 401, "not_found": 404, "too_large": 413, "overloaded": 503,
              "internal": 500}

    def __init__(self, kind: str, message: str, param: str | None = None, retry_after: int | None = None) -> None:
        message = scrub_paths(message)  # library messages carry source paths; clients get none (guard.py)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.retry_after = retry_after
        # (prompt tokens, requested max tokens or None, context length) of a length error: the Anthropic API words
        # these its own way, and Claude Code parses that wording to retry with a smaller max_tokens
        self.lengths: tuple[int, int | None, int] | None = None

    @property
    def status(self) -> int:
        return self.STATUS[self.kind]


@dataclass
class ChatJob:
    """One generation request in V4 terms (messages as `dsv4.chat.encode_messages` takes them)."""

    messages: list[dict[str, Any]]
    thinking: bool
    reasoning_effort: str | None = None  # None | "high" | "max"
    tools: list[dict[str, Any]] | None = None  # OpenAI format: [{"type": "function", "function": {...}}]
    tool_choice: str | dict[str, str] = "auto"  # "none" | "auto" | "required" | {"name": ...}
    parallel_tool_calls: bool = True
    # None | {"type": "json_object"} | {"type": "json_schema", "name": ..., "schema": {...}}
    response_format: dict[str, Any] | None = None
    max_tokens: int | None = None  # None = up to the context length
    stop: list[str] = field(default_factory=list)
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, seed, n, penalties, logprobs
    thinking_budget: int | None = None  # Anthropic's thinking.budget_tokens: most reasoning tokens before </think>
    # the API's own checks of the request (serve/validate.py), run off the event loop before the prompt is rendered
    checks: Callable[[], None] | None = None


@dataclass
class ToolCallDelta:
    index: int  # position among this choice's tool calls
    id: str | None = None  # set on the first delta of a call
    name: str | None = None  # set on the first delta of a call
    arguments: str = ""  # JSON text to append


@dataclass
class TokenLogprob:
    token: str
    logprob: float | None  # None: the first prompt token (nothing predicts it)
    top: list[tuple[str, float]]
    top_ids: list[int] = field(default_factory=list)  # the token ids of `top`


@dataclass
class Step:
    """What one choice added in one engine step."""

    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "tool_calls" | "stop_sequence"
    stop_sequence: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # SamplingParams.prompt_logprobs: one entry per prompt token (the first one's logprob None), on a step of its own
    # before the choice's first generated text
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Prepared:
    prompt_ids: list[int]
    params: Any  # dsv4.engine.SamplingParams
    thinking: bool  # the output starts inside the reasoning (thinking mode, and no prefill closed it)
    tools: list[dict[str, Any]] | None
    n: int
    raw_text: bool  # /v1/completions: plain text, no chat parsing
    # max_tokens 0 (scoring a prompt): the engine generates one token, which nobody sees or is billed for
    discard_output: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class ServingCore:
    def __init__(self, engine: Any, tokenizer: Any, *, model_names: list[str], max_model_len: int,
                 max_concurrency: int = 256, chat: Any = None, default_thinking: bool = True,
                 accept_any_model: bool = False) -> None:
        if chat is None:
            import dsv4.chat as chat
        builder = getattr(chat, "build_constraint", None)
        if builder is None:
            from dsv4.chat.constraint import build_constraint as builder
        self.build_constraint = builder
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat = chat
        self.model_names = model_names
        self.max_model_len = max_model_len
        self.max_concurrency = max_concurrency
        self.in_flight = 0
        from dsv4.serve.limits import PrepareLanes, max_token_bytes  # (limits.py imports ServeError from here)

        self._lanes = PrepareLanes()
        # NOTE: preparation runs on several threads; the grammar compiler's caches are not meant for concurrent use,
        # so building a constraint takes this lock.
        self._grammar_lock = threading.Lock()
        self.token_bytes = max_token_bytes(tokenizer)  # most characters one token spans (cheap length bound)
        self.ping_interval = 10.0  # seconds of silence in a stream before a keep-alive ping
        # thinking mode of requests that do not choose (`dsv4 serve --thinking`): many clients never show reasoning
        self.default_thinking = default_thinking
        # any `model` name is this model (`--accept-any-model-name`): agent CLIs send their own default model names
        self.accept_any_model = accept_any_model
        self.created = int(time.time())
        self.metrics = ServerMetrics(self.engine_stats)
        self.bodies = BodyParser()  # large JSON bodies parse in a worker process (bodyparse.py)
        # seconds a tool_choice "auto" request waits for its tool set's grammar the first time (small tool sets
        # compile in well under a second; a large one, such as an agent CLI's two dozen tools, finishes in the
        # background and constrains the requests after it)
        self.auto_grammar_wait = 2.0

    # ---- lifecycle ------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        await _maybe_await(getattr(self.engine, "start", None))

    async def stop(self) -> None:
        await _maybe_await(getattr(self.engine, "shutdown", None))
        self._lanes.shutdown()
        self.bodies.shutdown()

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run request preparation (rendering, tokenizing, compiling a grammar: milliseconds to seconds) on a worker
        thread, so the event loop keeps streaming other requests meanwhile. The lane follows the size of the text in
        `args` (limits.PrepareLanes): a small request never waits behind a large one being parsed."""
        from dsv4.serve.limits import arg_chars

        return await self._lanes.run(sum(arg_chars(a) for a in args), fn, *args)

    # ---- request checks -------------------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model not in self.model_names and not self.accept_any_model:
            raise ServeError(
                "not_found",
                f"The model `{model}` does not exist on this server; it serves {', '.join(map(repr, self.model_names))}"
                " (see GET /v1/models, or start the server with --served-model-name, or with "
                "--accept-any-model-name for clients that send their own model names).",
                param="model",
            )

    def _check_length(self, prompt_len: int, max_tokens: int | None, field_name: str) -> int:
        if prompt_len >= self.max_model_len:
            err = ServeError(
                "invalid_request",
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt is "
                f"{prompt_len} tokens, which leaves no room for output. Please shorten the messages.",
                param="messages",
            )
            err.lengths = (prompt_len, None, self.max_model_len)
            raise err
        if max_tokens is None:
            return self.max_model_len - prompt_len
        if prompt_len + max_tokens > self.max_model_len:
            err = ServeError(
                "invalid_request",
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
                f"Please reduce the length of the messages or the {field_name}.",
                param=field_name,
            )
            err.lengths = (prompt_len, max_tokens, self.max_model_len)
            raise err
        return max_tokens

    # ---- preparing ------------------------------------------------------------------------------------------------
    def render_chat(self, job: ChatJob) -> tuple[Any, str, bool]:
        """(prompt as a dsv4.chat.ChatPrompt, prefill, output starts inside the reasoning). A trailing assistant
        message is a prefill (DeepSeek's prefix completion, Anthropic's prefill): the model continues it, and only the
        continuation is returned. In thinking mode a prefill with content closes the reasoning (`reasoning_content` + `</think>` +
        content); one with only `reasoning_content` continues the reasoning."""
        messages, prefill, in_reasoning = job.messages, "", job.thinking
        if messages and messages[-1].get("role") == "assistant":
            last, messages = messages[-1], messages[:-1]
            if last.get("tool_calls") or not messages or messages[-1].get("role") not in ("user", "tool"):
                raise ServeError("invalid_request", "A final assistant message is continued as a prefill; it must "
                                 "follow a user or tool message and carry no tool calls.", param="messages")
            content, reasoning = last.get("content") or "", last.get("reasoning_content") or ""
            if job.thinking and (content or not reasoning):
                prefill, in_reasoning = f"{reasoning}</think>{content}", False
                tail = self.chat.ChatPrompt().data(reasoning).ctrl("</think>").data(content)
            else:
                prefill = reasoning if job.thinking else content
                tail = self.chat.ChatPrompt().data(prefill)
            return self._encode_messages(job, messages) + tail, prefill, in_reasoning
        return self._encode_messages(job, messages), prefill, in_reasoning

    def _checked(self, job: ChatJob) -> None:
        """What is refused before any rendering: the API's own checks, then text that cannot fit the context."""
        from dsv4.serve import limits

        if job.checks is not None:
            job.checks()
        limits.check_chars(limits.prompt_chars(job), self.max_model_len, self.token_bytes, "messages", "messages")

    def count_chat_tokens(self, job: ChatJob) -> int:
        """Prompt tokens of `job` (Anthropic count_tokens), under the same bounds as a generation request."""
        self._checked(job)
        prompt, _, _ = self.render_chat(job)
        return len(self.encode(prompt, "messages"))

    def _encode_messages(self, job: ChatJob, messages: list[dict[str, Any]]) -> Any:
        try:
            fmt = job.response_format
            # a ChatPrompt: control-token strings in the clients' text stay text (dsv4/chat/prompt.py)
            return self.chat.encode_chat_prompt(
                messages, thinking_mode="thinking" if job.thinking else "chat",
                reasoning_effort=job.reasoning_effort,
                # with tool_choice "none" the tools stay out of the prompt, so the model is not invited to call them
                tools=job.tools if job.tool_choice != "none" else None,
                # the V4 encoder writes the schema into the system prompt; json_object has no schema to show
                response_format=fmt["schema"] if fmt and fmt["type"] == "json_schema" else None,
            )
        except (ValueError, AssertionError, KeyError, TypeError) as e:
            raise ServeError("invalid_request", f"The messages cannot be rendered in the V4 chat format: {e}",
                             param="messages") from e

    def encode(self, text: Any, field: str = "prompt") -> list[int]:
        """Token ids of `text` (a str, or a chat prompt whose message text stays text: chat/prompt.py), or a 400
        naming `field` as soon as it is certain not to fit the context: the cost is bounded by the context length,
        not by the text (limits.py)."""
        from dsv4.serve import limits

        what = "messages" if field == "messages" else "prompt"
        plain = text if isinstance(text, str) else text.text
        limits.check_chars(len(plain), self.max_model_len, self.token_bytes, what, field)
        # The slices are counted on the plain text (a control-token string counts as one token there, never more
        # than as text), so the early refusal stays a lower bound; the ids returned are the prompt's own.
        full = None if isinstance(text, str) else (lambda: self.tokenizer.encode_prompt(text))
        return list(limits.encode_within(self.tokenizer.encode, plain, self.max_model_len - 1, what, field,
                                         self.max_model_len, full=full))

    def prepare_chat(self, job: ChatJob, max_tokens_field: str = "max_tokens") -> Prepared:
        self._checked(job)
        prompt, prefill, in_reasoning = self.render_chat(job)
        prompt_ids = self.encode(prompt, "messages")
        max_tokens = self._check_length(len(prompt_ids), job.max_tokens, max_tokens_field)
        constraint = None
        if job.tools and job.tool_choice == "auto" and not job.response_format:
            constraint = self._auto_constraint(job, prefill)
        elif (job.tools and job.tool_choice != "none") or job.response_format:
            constraint = self._constraint(job)
            # the grammar starts at the generation prompt: walk it through the prefill the client wrote
            if constraint is not None and prefill and not constraint.accept_text(prefill):
                raise ServeError("invalid_request", "The final assistant message (prefill) does not fit the required "
                                 "format (tool_choice / response_format); drop it or make it a valid start.",
                                 param="messages")
        if in_reasoning and job.thinking_budget is not None:
            constraint = ThinkingBudget(job.thinking_budget, self.tokenizer.token_id("</think>"), inner=constraint)
        params = self._params(job.sampling, job.stop, max_tokens, constraint)
        # the parser drops calls to tools that were not offered (none at all with tool_choice "none")
        offered = (job.tools or []) if job.tool_choice != "none" else []
        return Prepared(prompt_ids, params, in_reasoning, offered, params.n, raw_text=False)

    def prepare_completion(self, prompt_ids: list[int], sampling: dict[str, Any], stop: list[str],
                           max_tokens: int | None) -> Prepared:
        discard = max_tokens == 0
        max_tokens = self._check_length(len(prompt_ids), 1 if discard else max_tokens, "max_tokens")
        params = self._params(sampling, stop, max_tokens, None, skip_special_tokens=True)
        return Prepared(prompt_ids, params, False, None, params.n, raw_text=True, discard_output=discard)

    def _auto_constraint(self, job: ChatJob, prefill: str) -> Any:
        """tool_choice "auto": content and string values stay free; once the model opens a tool-call block, the DSML
        and the arguments' JSON schemas are enforced. Best effort: a tool set whose grammar is still compiling after
        `auto_grammar_wait` seconds (the first request with a large tool set), or cannot be compiled, or a prefill
        the grammar does not take, runs unconstrained (the parser recovers what the model writes), so "auto" never
        fails or waits long on the grammar."""
        try:
            constraint = self.build_constraint(
                self.tokenizer, tools=job.tools, tool_choice="auto", thinking_mode="thinking" if job.thinking else "chat",
                parallel_tool_calls=job.parallel_tool_calls, background=True, wait=self.auto_grammar_wait,
            )
        except ValueError as e:
            log.warning("tool_choice auto runs unconstrained: %s", e)
            return None
        if constraint is not None and prefill and not constraint.accept_text(prefill):
            log.warning("tool_choice auto runs unconstrained: the prefill does not fit the tool-call grammar")
            return None
        return constraint

    def _constraint(self, job: ChatJob) -> Any:
        """The grammar that makes a forced tool call (tool_choice required / named) or a JSON answer well-formed and
        schema-valid (tool_choice "auto": `_auto_constraint`)."""
        choice: Any = job.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice["name"]}}
        fmt = job.response_format
        if fmt is not None and fmt["type"] == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt["schema"]}}
        try:
            with self._grammar_lock:
                return self.build_constraint(
                    self.tokenizer, tools=job.tools if choice != "none" else None, tool_choice=choice,
                    response_format=fmt, thinking_mode="thinking" if job.thinking else "chat",
                    parallel_tool_calls=job.parallel_tool_calls,
                )
        except ValueError as e:
            raise ServeError("invalid_request", f"Cannot build the constrained-decoding grammar: {e}",
                             param="response_format" if job.response_format else "tools") from e

    def _params(self, sampling: dict[str, Any], stop: list[str], max_tokens: int, constraint: Any,
                skip_special_tokens: bool = False) -> Any:
        from dsv4.engine.sampling import SamplingParams

        kw = {k: v for k, v in sampling.items() if v is not None}
        try:
            # NOTE: special tokens stay in the text, because the V4 output parser needs `</think>` and the DSML
            # markers; the parser removes them from what the client sees.
            return SamplingParams(max_tokens=max_tokens, stop=list(stop), constraint=constraint,
                                  skip_special_tokens=skip_special_tokens, **kw)
        except ValueError as e:
            raise ServeError("invalid_request", str(e)) from e

    # ---- admission ------------------------------------------------------------------------------------------------
    def admit(self) -> None:
        if self.in_flight >= self.max_concurrency:
            raise ServeError(
                "overloaded",
                f"The server is at its limit of {self.max_concurrency} concurrent requests; retry shortly.",
                retry_after=1,
            )

    # ---- running --------------------------------------------------------------------------------------------------
    async def run(self, prep: Prepared, request_id: str) -> AsyncIterator[Step | Usage]:
        """Stream `Step`s of all choices, then one `Usage`. Closing the iterator early aborts the request in the
        engine (this is how a client disconnect frees its cache pages)."""
        self.admit()
        self.in_flight += 1
        self.metrics.in_flight.inc()
        arrival = time.perf_counter()
        first_token: float | None = None
        mode = "thinking" if prep.thinking else "chat"
        parsers = [None if prep.raw_text else self.chat.StreamParser(mode, tools=prep.tools) for _ in range(prep.n)]
        tool_counts = [0] * prep.n
        done = [False] * prep.n
        last = None
        status = "error"
        want_prompt_lps = getattr(prep.params, "prompt_logprobs", None) is not None
        try:
            stream = self.engine.stream(prep.prompt_ids, prep.params, request_id=request_id)
            while True:
                try:
                    out = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except ValueError as e:
                    if last is None:  # the engine refused the request (e.g. a token id outside the vocabulary)
                        status = "rejected"
                        raise ServeError("invalid_request", str(e)) from e
                    raise
                last = out
                plp = getattr(out, "prompt_logprobs", None)
                if want_prompt_lps and plp is not None and len(plp) == len(prep.prompt_ids):
                    want_prompt_lps = False
                    yield Step(index=0, prompt_logprobs=self._prompt_logprobs(prep.prompt_ids, plp))
                for co in out.outputs:
                    if done[co.index]:
                        continue
                    if co.finish_reason == "abort":  # the engine gave up on it (we did not ask: we are still here)
                        raise ServeError("internal", f"the engine aborted request {request_id}; retry it.")
                    if first_token is None and co.token_ids:
                        first_token = time.perf_counter()
                    step = self._step(co, parsers[co.index], tool_counts, prep)
                    done[co.index] = co.finish_reason is not None
                    if prep.discard_output:
                        step = Step(index=co.index, finish_reason="length") if done[co.index] else None
                    if step is not None:
                        yield step
            if not all(done):
                raise ServeError("internal", f"request {request_id} ended before all its choices finished; retry.")
            assert last is not None
            # the engine sums cached tokens over the n sequences; the prompt is counted once, so clamp to it
            usage = Usage(len(prep.prompt_ids),
                          0 if prep.discard_output else sum(len(c.token_ids) for c in last.outputs),
                          min(getattr(last, "num_cached_tokens", 0), len(prep.prompt_ids)))
            status = "ok"
            self.metrics.observe_request(
                prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                output_tokens=usage.completion_tokens, ttft=None if first_token is None else first_token - arrival,
                e2e=time.perf_counter() - arrival,
            )
            yield usage
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            if status == "error":
                # client gone (generator closed / task cancelled) or an error: free the request's pages now
                self.metrics.aborted.inc()
                self.engine.abort(request_id)

    def _step(self, co: Any, parser: Any, tool_counts: list[int], prep: Prepared) -> Step | None:
        # NOTE: the text still holds the final <｜end▁of▁sentence｜>: the V4 parser reads it as the end of the message
        text = co.delta_text
        finished = co.finish_reason is not None
        step = Step(index=co.index)
        if parser is None:
            step.content = text
        else:
            for d in parser.feed(text):
                self._apply_delta(step, d, tool_counts, co.index)
            if finished:
                for d in parser.finish():
                    self._apply_delta(step, d, tool_counts, co.index)
                self._report_problems(parser, co.index, co.finish_reason)
        if co.logprobs is not None and co.delta_token_ids:
            step.logprobs = self._logprobs(co.delta_token_ids, co.logprobs[-len(co.delta_token_ids):])
        if finished:
            # a call the output cut off is not a call to run: the finish reason says why it stopped instead
            cut_call = parser is not None and bool(getattr(parser, "truncated", ()))
            if co.finish_reason == "length":
                step.finish_reason = "length"
            elif tool_counts[co.index] and not cut_call:
                step.finish_reason = "tool_calls"
            elif isinstance(co.stop_reason, str):
                step.finish_reason, step.stop_sequence = "stop_sequence", co.stop_reason
            else:
                step.finish_reason = "stop"
        if not (step.reasoning or step.content or step.tool_calls or step.finish_reason or step.logprobs):
            return None
        return step

    def _report_problems(self, parser: Any, index: int, finish_reason: str | None) -> None:
        """Repairs and losses in the model's output are the operator's to see: a log line and a metric each. (Not
        an output that lacks EOS, or is cut inside the reasoning, by max_tokens or a stop string: the finish reason
        says so already, and that is the client's limit, not a fault of the output.)"""
        for kind, message in getattr(parser, "problems", ()):
            if kind == "no_eos" or (kind == "no_think_end" and finish_reason == "length"):
                continue
            self.metrics.output_problems.labels(kind).inc()
            log.warning("choice %d: model output: %s (%s)", index, message, kind)

    @staticmethod
    def _apply_delta(step: Step, d: Any, tool_counts: list[int], index: int) -> None:
        if d.kind == "reasoning":
            step.reasoning += d.text
        elif d.kind == "content":
            step.content += d.text
        elif d.kind == "tool_call":
            # a parser delta that carries the name opens call `d.index`; later ones add argument JSON text
            if d.name is not None:
                tool_counts[index] += 1
                step.tool_calls.append(ToolCallDelta(d.index, new_id("call_"), d.name, d.text))
            elif step.tool_calls and step.tool_calls[-1].index == d.index:
                step.tool_calls[-1].arguments += d.text
            else:
                step.tool_calls.append(ToolCallDelta(d.index, None, None, d.text))

    def _prompt_logprobs(self, ids: list[int], dists: list[dict[int, float] | None]) -> list[TokenLogprob]:
        first = TokenLogprob(self.tokenizer.decode(ids[:1], skip_special_tokens=False), None, [])
        return [first] + self._logprobs(ids[1:], dists[1:])  # type: ignore[arg-type]

    def _logprobs(self, ids: list[int], dists: list[dict[int, float]]) -> list[TokenLogprob]:
        def text(token_id: int) -> str:
            return self.tokenizer.decode([token_id], skip_special_tokens=False)

        out = []
        for tid, dist in zip(ids, dists):
            top = sorted(dist.items(), key=lambda kv: -kv[1])
            out.append(TokenLogprob(text(tid), float(dist.get(tid, float("-inf"))),
                                    [(text(t), float(lp)) for t, lp in top], [t for t, _ in top]))
        return out

    # ---- engine state ---------------------------------------------------------------------------------------------
    def engine_stats(self) -> dict[str, Any]:
        stats = getattr(self.engine, "stats", None)
        if callable(stats):  # an engine that reports for itself (the test fakes)
            return dict(stats())
        return llm_engine_stats(self.engine.engine)


def llm_engine_stats(eng: Any) -> dict[str, Any]:
    """Cache and queue figures of a `dsv4.engine.LLMEngine`, read without its lock: the engine thread holds that lock
    for a whole forward, and /metrics must not stall the event loop behind a step. The figures are a moment's
    snapshot; a list that changes while it is copied is simply read again."""
    bm, sched = eng.block_manager, eng.scheduler
    for _ in range(5):
        try:
            live = list(sched.running) + list(sched.waiting)
            held = eng.prefix_cache.held_pages() if eng.prefix_cache is not None else []
            break
        except RuntimeError:  # "deque mutated during iteration"
            continue
    else:
        live, held = [], []
    request_pages = {p for seq in live for p in seq.pages}
    prompt, cached = eng.stats.get("prompt_tokens", 0), eng.stats.get("cached_tokens", 0)
    return {
        # pages held by live requests: 0 once every request has finished or been aborted
        "pages_used": len(request_pages),
        # pages kept only as prefix-cache entries (reclaimable; reused by later prompts with the same prefix)
        "pages_prefix_cached": len({p for pages in held for p in pages} - request_pages),
        "pages_free": bm.num_free_pages,
        "pages_total": bm.num_pages,
        "prefix_cache_hit_rate": cached / prompt if prompt else 0.0,
        "running": len(sched.running),
        "waiting": len(sched.waiting),
    }


async def _maybe_await(fn: Any) -> None:
    if fn is not None:
        result = fn()
        if asyncio.iscoroutine(result):
            await result


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
