"""Large JSON request bodies are parsed in a worker process, so the event loop keeps answering while they are.

`json.loads` holds the GIL for the whole parse (about 5 ms a MB here), so a thread would not help: a 60 MB body
stalled every other request, health checks included, for about 0.3 s. Bodies over `OFF_LOOP_BYTES` go to one spawned
worker process (started on the first such body; spawned, not forked from a process running torch threads: it imports
this module and the program's light main module, about 25 MB); the parsed object comes back pickled, which costs the
loop a fraction of the parse (~40 ms for 60 MB). Smaller bodies parse in place, where a worker
round trip would cost more than it saves. The body limit (app.py `_BodyLimit`) bounds what can arrive at all.

Only the parse moves: validation and everything after it run as before (FastAPI reads the parsed object from the
request: app.py `_json_body_route`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

OFF_LOOP_BYTES = 1 << 20

log = logging.getLogger("dsv4.serve")


def parse(body: bytes) -> tuple[str, Any]:
    """What `json.loads(body)` gives, as a picklable verdict: ("ok", obj), ("invalid", (msg, pos)) for a syntax error,
    ("deep", None) for nesting past the parser's recursion limit, ("undecodable", reason) for bytes that are no
    JSON text encoding."""
    try:
        return "ok", json.loads(body)
    except json.JSONDecodeError as e:
        return "invalid", (e.msg, e.pos)
    except RecursionError:
        return "deep", None
    except UnicodeDecodeError as e:
        return "undecodable", str(e)


class BodyParser:
    """One worker process for the large bodies of a server, created when the first one arrives."""

    def __init__(self, threshold: int = OFF_LOOP_BYTES) -> None:
        self.threshold = threshold
        self._pool: ProcessPoolExecutor | None = None
        self.broken = False  # the worker could not be kept alive: parse in place

    async def parse(self, body: bytes) -> tuple[str, Any]:
        if len(body) <= self.threshold or self.broken:
            return parse(body)
        loop = asyncio.get_running_loop()
        for _ in range(2):  # a worker that died (killed for memory, say) is replaced once
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
            try:
                return await loop.run_in_executor(self._pool, parse, body)
            except BrokenProcessPool:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
        # e.g. a host program whose __main__ a spawned process cannot import: correct answers matter more
        self.broken = True
        log.warning("the body-parsing worker process died twice in a row; large request bodies are parsed on the "
                    "event loop from now on (other requests wait while they are)")
        return parse(body)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
