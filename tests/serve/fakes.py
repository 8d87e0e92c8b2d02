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
    def __init__(self, tokenizer: Any, script: Callable[[list[int], Any], str], step_delay: float = 0.0,
                 first_delay: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.script = script
        self.step_delay = step_delay
        self.first_delay = first_delay  # "queued / prefilling": time before the first output
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
        await asyncio.sleep(self.first_delay)
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
            # prompt_logprobs: token t at position j gets -j/10, and token 7 is always the other candidate
            plp = None if getattr(params, "prompt_logprobs", None) is None else \
                [None] + [{t: -j / 10, 7: -2.0} for j, t in enumerate(prompt_ids[1:], 1)]
            yield RequestOutput(request_id, None, prompt_ids, [s.completion_output(delta=True) for s in seqs],
                                finished, num_cached_tokens=3, prompt_logprobs=plp)
            await asyncio.sleep(self.step_delay)


class FakeChat:
    """`dsv4.chat` without constrained decoding (tests here check the HTTP layer, not grammars)."""

    def __init__(self) -> None:
        import dsv4.chat as chat

        self.encode_messages = chat.encode_messages
        self.encode_chat_prompt = chat.encode_chat_prompt
        self.ChatPrompt = chat.ChatPrompt
        self.StreamParser = chat.StreamParser

    def build_constraint(self, *args: Any, **kwargs: Any) -> None:
        return None
