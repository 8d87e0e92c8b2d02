"""AsyncLLM: the engine for an asyncio server. The step loop runs in one background thread; each request is an
`async for` over incremental `RequestOutput`s; `abort(request_id)` works at any time (and is what happens when a
client stops iterating).

Requests are validated in the caller's thread (so a bad request raises `ValueError` right away, before anything is
queued); additions and aborts are handed to the engine thread through a queue and applied between steps, so the
event loop never waits for a forward to finish. A request the engine fails on mid-step raises `RequestFailed` from
its own stream; every other stream carries on.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from dsv4.engine.llm import LLM, LLMEngine, PromptType
from dsv4.engine.request import RequestOutput
from dsv4.engine.sampling import SamplingParams


class RequestFailed(RuntimeError):
    """The engine failed while working on this request (and only on it: other streams carry on)."""

    def __init__(self, request_id: str, error: str) -> None:
        super().__init__(f"request {request_id}: {error}")
        self.request_id, self.error = request_id, error


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            # The consumer's event loop is closed (its program ended without draining the stream): nobody is left
            # to read this output, and the engine thread must not die for it.
            pass


class AsyncLLM:
    def __init__(self, engine: LLMEngine | LLM) -> None:
        self.engine = engine.engine if isinstance(engine, LLM) else engine
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model: Any, **kwargs: Any) -> AsyncLLM:
        return cls(LLM(model, **kwargs))

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="dsv4-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            self._drain_inbox()
            if not eng.has_unfinished():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outs = eng.step(delta=True)
            except Exception as err:  # noqa: BLE001 - a failed step must not hang every client
                self._fail_all(err)
                continue
            for out in outs:
                failed = out.error is not None
                with self._lock:
                    st = self._streams.get(out.request_id)
                    if out.finished or failed:
                        self._streams.pop(out.request_id, None)
                if st is not None:
                    st.put(RequestFailed(out.request_id, out.error) if failed else out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                prompt, params, rid = arg
                try:
                    self.engine.add_request(prompt, params, rid)
                except Exception as err:  # noqa: BLE001 - validated already; report anything left to its caller
                    with self._lock:
                        st = self._streams.pop(rid, None)
                    if st is not None:
                        st.put(err)
            elif op == "abort":
                out = self.engine.abort(arg)
                with self._lock:
                    st = self._streams.pop(arg, None)
                if st is not None and out is not None:
                    st.put(out)

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for rid, st in streams.items():
            self.engine.abort(rid)
            st.put(RuntimeError(f"the engine step failed: {err!r}; request {rid} was aborted"))

    # --- requests ----------------------------------------------------------------------------------------------
    async def stream(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Incremental outputs of one request (cumulative `text`/`token_ids` plus `delta_text`/`delta_token_ids`);
        the last one has `finished=True`. Leaving the loop early aborts the request."""
        self.engine.validate(prompt, sampling_params)  # raises ValueError before anything is queued
        rid = str(request_id) if request_id is not None else f"async-{next(self._ids)}"
        st = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if rid in self._streams or rid in self.engine.requests:
                raise ValueError(f"request_id {rid!r} is already in use; request ids must be unique")
            self._streams[rid] = st
        self.start()
        self._inbox.put(("add", (prompt, sampling_params, rid)))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await st.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    async def generate(
        self, prompt: PromptType, sampling_params: SamplingParams, request_id: str | None = None
    ) -> RequestOutput:
        final = None
        async for out in self.stream(prompt, sampling_params, request_id):
            final = out
        assert final is not None
        return final

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", str(request_id)))
        self._wake.set()
