"""One request can never stall the server for the others: benchmarks/load_test.py's phases at a size for a 2-core
machine, against a real `dsv4 serve` process on loopback (tiny random model, real V4 vocabulary), with pass/fail
assertions. Latency bounds compare with the idle-server baseline measured in the same test, with generous factors:
the point is the order of magnitude (before the fair scheduler a probe waited for the whole prefill, before the
cheap length checks for the whole body's tokenization), not a timing target.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("load_test", Path(__file__).parents[2] / "benchmarks" / "load_test.py")
load_test = importlib.util.module_from_spec(_spec)
sys.modules["load_test"] = load_test
_spec.loader.exec_module(load_test)

MAX_LEN = 8192
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def load(tmp_path_factory: pytest.TempPathFactory) -> Iterator[load_test.Load]:
    root = tmp_path_factory.mktemp("load")
    # the server's defaults: a step budget of 512 tokens (reserve 128), shared steps sized to 20 ms
    server = load_test.Server(load_test.build_model(root / "ckpt", MAX_LEN), MAX_LEN, log=root / "server.log")
    try:
        server.wait_ready()
        yield load_test.Load(server)
    finally:
        server.stop()


def test_no_request_stalls_the_others(load: load_test.Load) -> None:
    idle = asyncio.run(load.baseline(5))
    base = idle["probe_ms"]["p50"]

    streams = asyncio.run(load.streams(24, 8))
    assert streams["completed_well_formed"] == 24, streams

    # ~6K-token prompt: 12 steps of 512 tokens, each deeper and dearer. A probe waits for the step in flight and one
    # short shared step (max_step_ms), not for the rest of the prefill.
    long = asyncio.run(load.long_prefill(6000, 0.05))
    assert long["long_status"] == 200 and long["long_prompt_tokens"] > 5000, long
    assert long["probe_ms"]["n"] >= 3, long
    # measured here (2 cores, idle machine): idle 12-19 ms, during the prefill p50 49-92 ms (3.8-4.9x), the prefill
    # itself 0.4 s; a probe that waited for the rest of the prefill would take ~200 ms or more (13x and up). The bound
    # leaves room for a loaded CI machine; it was 10x too with a 128-token budget, 4x shorter steps than these.
    assert long["probe_ms"]["p50"] < 10 * base, (idle, long)

    # 10 MB of text is refused by its length in characters: no tokenization, little memory, probes barely slowed
    huge = asyncio.run(load.huge_body(10, 0.05))
    assert huge["status"] == 400 and "characters" in huge["message"], huge
    assert huge["rss_peak_growth_mb"] < 150, huge  # the body is 10 MB; tokenizing it took 3.5 GB before
    assert huge["probe_ms"]["max"] < 10 * base, (idle, huge)  # measured: 139 ms max, idle 60 ms

    end = load.server.wait_idle(30)
    assert end["pages_used"] == 0 and end["in_flight"] == 0, end
    assert not [s for s in load.statuses if s >= 500], load.statuses
