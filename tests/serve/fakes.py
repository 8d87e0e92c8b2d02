"""A scripted stand-in for the engine, so the HTTP layer is tested in milliseconds and without a model.

It replays a fixed completion text per request through the engine's own `Sequence` (so stop strings, max_tokens,
detokenization and delta bookkeeping are the engine's, not re-implemented here), and books one cache "page" per live
request, so tests can check that every finished or aborted request gives its page back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from dsv4.engine.request import RequestOutput, Sequence


class FakeEngine:
    def __init__(self, tokenizer: Any, script: Callable[[list[int], Any], str], step_delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.step_delay = step_delay
        self.live: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.stopped = True

    def stats(self) -> dict[str, Any]:
        return {"pages_used": len(self.live), "pages_total": 64, "prefix_cache_hit_rate": 0.0,
                "running": len(self.live), "waiting": 0}

    def abort(self, request_id: str) -> None:
        if request_id in self.live:
            self.live.discard(request_id)
            self.aborted.append(request_id)

    async def stream(self, prompt_ids: list[int], params: Any, request_id: str) -> AsyncIterator[RequestOutput]:
        if any(t >= len(self.tokenizer) for t in prompt_ids):
            raise ValueError(f"prompt token id {max(prompt_ids)} is outside the vocabulary")
        script = self.tokenizer.encode(self.script(prompt_ids, params)) + [self.tokenizer.eos_id]
        seqs = [Sequence(i, request_id, i, prompt_ids, params, 0, None, tokenizer=self.tokenizer,
                         eos_token_id=self.tokenizer.eos_id) for i in range(params.n)]
        self.live.add(request_id)
        step = 0
        while request_id in self.live and not all(s.is_finished for s in seqs):
            for s in seqs:
                if not s.is_finished:
                    s.append_token(script[min(step, len(script) - 1)],
                                   {script[min(step, len(script) - 1)]: -0.5, 7: -1.5} if s.logprobs is not None
                                   else None)
            step += 1
            finished = all(s.is_finished for s in seqs)
            if finished:
                self.live.discard(request_id)
                self.finished.append(request_id)
            yield RequestOutput(request_id, None, prompt_ids, [s.completion_output(delta=True) for s in seqs],
                                finished, num_cached_tokens=3)
            await asyncio.sleep(self.step_delay)


class _Delta:
    def __init__(self, kind: str, text: str = "", name: str | None = None, arguments: str = "") -> None:
        self.kind, self.text, self.name, self.arguments = kind, text, name, arguments


class SplitThinkParser:
    """Just enough of a V4 stream parser for HTTP-layer tests: reasoning until `</think>` in thinking mode."""

    def __init__(self, thinking_mode: str) -> None:
        self.in_reasoning = thinking_mode == "thinking"
        self.buf = ""

    def feed(self, text: str) -> list[_Delta]:
        if not self.in_reasoning:
            return [_Delta("content", text)] if text else []
        self.buf += text
        if "</think>" in self.buf:
            reasoning, content = self.buf.split("</think>", 1)
            self.in_reasoning, self.buf = False, ""
            return [d for d in (_Delta("reasoning", reasoning), _Delta("content", content)) if d.text]
        keep = next((k for k in range(min(len(self.buf), 7), 0, -1) if "</think>".startswith(self.buf[-k:])), 0)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return [_Delta("reasoning", out)] if out else []

    def finish(self) -> list[_Delta]:
        out, self.buf = self.buf, ""
        return [_Delta("reasoning", out)] if out else []


class FakeChat:
    """`dsv4.chat` with the stream parser swapped for `SplitThinkParser`."""

    def __init__(self) -> None:
        import dsv4.chat.encoding as encoding

        self.encode_messages = encoding.encode_messages
        self.StreamParser = SplitThinkParser

    def build_constraint(self, *args: Any, **kwargs: Any) -> None:
        return None
