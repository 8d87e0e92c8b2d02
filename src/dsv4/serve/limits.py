"""Bounded work per request before admission: a request that cannot fit the context is refused by the cheapest
measure that proves it, so its cost never scales with what a hostile client sends.

In order, each step bounding the next:

1. bytes: the body limit (app.py's `_BodyLimit`, answered 413 from `Content-Length` before reading). By default it
   follows the context: a token is at most `max_token_bytes` UTF-8 bytes (128 for V4: runs of dots / spaces) and JSON
   spells a byte in at most 6 (`\\u0001`), so a prompt that fits needs at most `6 * max_token_bytes * max_model_len`
   bytes of text, plus `BODY_SLACK` for field names, tool definitions and history the chat format drops.
2. characters: `check_chars` sums the lengths of the strings that reach the prompt; over
   `max_model_len * max_token_bytes` characters the prompt cannot fit, and nothing is rendered or tokenized.
3. tokens: `encode_within` tokenizes in slices and stops as soon as the count proves the prompt too long, so a
   request costs at most about one context's worth of tokenization (memory: one slice's encoding), never its body's.

`PrepareLanes` runs rendering and tokenization off the event loop, small requests on their own threads so that a
large request being parsed never queues a small one behind it.

Deliberately not here: the exact length check after tokenization (`ServingCore._check_length`), request admission by
concurrency (`ServingCore.admit`), and anything about the scheduler's fairness (engine/scheduler.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dsv4.serve.core import ChatJob, ServeError

T = TypeVar("T")

BODY_SLACK = 1 << 20  # bytes beyond the prompt's own text: field names, ids, tool schemas, dropped reasoning
BODY_CAP = 64 << 20  # the default limit never exceeds this, whatever the context (a larger one needs --max-body-mb)
JSON_BYTES_PER_BYTE = 6  # `\u0001`: the longest JSON spelling of one UTF-8 byte of text
SLICE_CHARS = 16384  # tokenized at a time while counting (~15 ms, a few MB of encoding)
SEAM_SLACK = 16  # tokens one cut can add over the whole text's tokenization (a cut splits at most a few merges)
SMALL_CHARS = 32768  # requests up to this many characters take the fast lane
FALLBACK_TOKEN_BYTES = 128  # the V4 vocabulary's longest token, for a tokenizer that does not list its bytes


def max_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes (so also characters) one token of `tokenizer` stands for."""
    table = getattr(tokenizer, "token_bytes", None)
    return max(map(len, table)) if table else FALLBACK_TOKEN_BYTES


def default_body_limit(max_model_len: int, token_bytes: int) -> int:
    return min(BODY_CAP, BODY_SLACK + JSON_BYTES_PER_BYTE * token_bytes * max_model_len)


def _too_long(max_model_len: int, what: str, field: str, detail: str) -> ServeError:
    return ServeError("invalid_request", f"This model's maximum context length is {max_model_len} tokens. However, "
                      f"your {what} {detail}. Please shorten the {what}.", param=field)


def prompt_chars(job: ChatJob) -> int:
    """Characters of a `ChatJob` that the V4 chat format writes into the prompt verbatim: message contents, tool-call
    arguments, tool definitions, the response schema. Reasoning of earlier turns is left out: the format drops it."""
    total = 0
    for m in job.messages:
        content = m.get("content")
        total += len(content) if isinstance(content, str) else 0
        for call in m.get("tool_calls") or []:
            fn = call.get("function") or {}
            total += len(fn.get("arguments") or "") + len(fn.get("name") or "")
    for extra in (job.tools, (job.response_format or {}).get("schema")):
        total += _string_chars(extra)
    return total


def arg_chars(arg: Any) -> int:
    """The size by which `PrepareLanes` picks a lane: prompt characters of a ChatJob, a string's length, or a
    completion request's prompt(s)."""
    if isinstance(arg, ChatJob):
        return prompt_chars(arg)
    if hasattr(arg, "prompt"):  # a completion request
        arg = arg.prompt
    return _string_chars(arg)


def _string_chars(value: Any) -> int:
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
            total += sum(len(k) for k in v if isinstance(k, str))
        elif isinstance(v, list):
            stack.extend(v)
    return total


def check_chars(chars: int, max_model_len: int, token_bytes: int, what: str, field: str) -> None:
    """Refuse `chars` characters of prompt text that cannot fit `max_model_len` tokens whatever they say."""
    if chars > (max_model_len - 1) * token_bytes:
        raise _too_long(max_model_len, what, field, f"have {chars} characters, more than {max_model_len} tokens can "
                        f"hold (one token spans at most {token_bytes} characters)")


def _slices(text: str) -> Iterator[str]:
    """`text` in pieces of about SLICE_CHARS, cut after a newline or space where one is near, so that a cut falls
    where the pre-tokenizer splits anyway."""
    start = 0
    while start < len(text):
        end = min(start + SLICE_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", end - 1024, end), text.rfind(" ", end - 1024, end))
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def encode_within(encode: Callable[[str], list[int]], text: str, limit: int, what: str, field: str,
                  max_model_len: int, full: Callable[[], list[int]] | None = None) -> list[int]:
    """`encode(text)` (or `full()`, the same text's ids by another rule), unless counting slice by slice proves it
    longer than `limit` tokens first (then a 400 that says so). The exact tokenization of the whole text is what is
    returned; the slices only decide early."""
    full = full or (lambda: encode(text))
    if len(text) <= SLICE_CHARS:
        return full()
    counted = 0
    for cuts, piece in enumerate(_slices(text)):
        counted += len(encode(piece))
        # each cut may have added up to SEAM_SLACK tokens: only what survives that discount proves the length
        proven = counted - cuts * SEAM_SLACK
        if proven > limit:
            raise _too_long(max_model_len, what, field, f"are more than {proven} tokens (counting stopped there)")
    return full()


class PrepareLanes:
    """Two thread pools for request preparation: up to `SMALL_CHARS` characters on `small`, the rest on `large`.
    Both run tokenization and chat rendering, which release the GIL for most of their time (the Rust tokenizer) or
    are bounded by the checks above, so the event loop keeps answering meanwhile."""

    def __init__(self, small_workers: int = 2, large_workers: int = 1) -> None:
        self.small = ThreadPoolExecutor(max_workers=small_workers, thread_name_prefix="dsv4-prepare")
        self.large = ThreadPoolExecutor(max_workers=large_workers, thread_name_prefix="dsv4-prepare-large")

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        pool = self.small if size <= SMALL_CHARS else self.large
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        for pool in (self.small, self.large):
            pool.shutdown(wait=False, cancel_futures=True)
