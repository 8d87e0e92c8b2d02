"""Load test: can one request stall the server for the others? Against a `dsv4 serve` process started here on
loopback (127.0.0.1, a free port), bounded in requests and seconds. One run reports:

1. idle baseline: latency of a 1-token chat request ("probe") and of GET /health on the idle server;
2. concurrent streams held: `--streams` streaming chats at once, how many completed well-formed, the most in flight;
3. long prefill: probes sent while a `--long-tokens`-token prompt prefills: their p50 / p99 latency, next to the
   idle baseline and the long request's own duration; the peer, in the same run: a second server started with
   `--admission-reserve 0 --max-step-ms 0` (a running prefill takes every step's whole budget, as before the fair
   scheduler), where a probe waits for the whole prefill (skip with `--no-peer`);
4. huge bodies: a 10 MB and a 60 MB chat body (the server runs with --max-body-mb 64 so they are parsed and refused
   by their length rather than by Content-Length): the status, how long the refusal took, the server's peak RSS
   growth (VmHWM, reset before each), and probe latency meanwhile; the same against the peer, which keeps the default
   body limit (it follows the context: 25 MB for 32K tokens);
5. soak: `--soak-s` seconds of small requests at `--soak-clients` concurrency: RSS before / after, statuses;
6. the end: pages in use once idle (must be 0) and every status seen (no 5xx allowed).

    python benchmarks/load_test.py                        # tiny random model with the real V4 vocabulary
    python benchmarks/load_test.py --report benchmarks/results/2026-12-03-load.md

Workload is fixed by the arguments and seeded. The last stdout line is JSON. tests/serve/test_load.py runs the same
functions at a size for a 2-core machine and asserts: no 5xx, no leaked pages, probe latency bounded relative to the
idle baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from dsv4.serve.process import ServeProcess

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()
OFF = {"thinking": {"type": "disabled"}}


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def ms(xs: list[float]) -> dict[str, float]:
    return {"p50": pct(xs, 50) * 1000, "p99": pct(xs, 99) * 1000, "max": max(xs) * 1000 if xs else float("nan"),
            "n": len(xs)}


# ---- the server ---------------------------------------------------------------------------------------------------
def build_model(path: Path, max_len: int) -> Path:
    """The tests' tiny random V4 model (real vocabulary, so the real tokenizer and chat format apply), with room for
    `max_len` positions."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dsv4.model import checkpoint_io
    from dsv4.model.transformer import Transformer
    from tests.serve.tiny import tiny_config

    model = Transformer(tiny_config(max_position_embeddings=max(max_len, 4096)), dtype=torch.float32).init_weights(0)
    return checkpoint_io.save_checkpoint(path, model.state_dict(), model.config, dtype=torch.bfloat16)


class Server(ServeProcess):
    """The load test's server: the model at `max_len`, name "load", warnings only, `--max-body-mb body_mb`."""

    def __init__(self, model_dir: Path, max_len: int, port: int = 0, extra: list[str] | None = None,
                 log: Path | None = None, body_mb: int | None = 64) -> None:
        super().__init__("--model", str(model_dir), "--served-model-name", "load", "--dtype", "float32",
                         "--device", "cpu", "--max-model-len", str(max_len), "--max-num-seqs", "80",
                         "--log-level", "warning", *(["--max-body-mb", str(body_mb)] if body_mb else []),
                         *(extra or []), log=log, port=port)

    stop = ServeProcess.close


# ---- clients ------------------------------------------------------------------------------------------------------
class Load:
    """The clients of one run; every status code any of them saw is counted in `statuses`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.statuses: Counter[int] = Counter()
        self.limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)

    def chat_body(self, content: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
        return {"model": "load", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0, "stream": stream, **OFF}

    async def probe(self, client: httpx.AsyncClient, i: int = 0) -> float:
        """Latency of a 1-token chat request (a short prompt: its time is queueing + one prefill + one token)."""
        t = time.perf_counter()
        r = await client.post(f"{self.server.url}/v1/chat/completions",
                              json=self.chat_body(f"probe {i}: {words(6, i)}", 1))
        self.statuses[r.status_code] += 1
        return time.perf_counter() - t

    async def health_latency(self, client: httpx.AsyncClient) -> float:
        t = time.perf_counter()
        r = await client.get(f"{self.server.url}/health")
        self.statuses[r.status_code] += 1
        return time.perf_counter() - t

    async def until_admitted(self, client: httpx.AsyncClient, busy: asyncio.Task[Any], limit_s: float = 30) -> None:
        """Wait until the server holds a request (it has been parsed and admitted) or `busy` is done. A fixed sleep
        here would let a fast machine finish the whole prefill before the first probe."""
        deadline = time.monotonic() + limit_s
        while not busy.done() and time.monotonic() < deadline:
            h = (await client.get(f"{self.server.url}/health")).json()
            if h.get("running", 0) + h.get("waiting", 0) > 0:
                return
            await asyncio.sleep(0.005)

    async def probes_while(self, client: httpx.AsyncClient, busy: asyncio.Task[Any], gap: float,
                           start: int) -> tuple[list[float], list[float]]:
        """1-token probes and /health checks, one after another, until `busy` is done."""
        lat, health = [], []
        i = start
        while not busy.done():
            lat.append(await self.probe(client, i))
            health.append(await self.health_latency(client))
            i += 1
            await asyncio.sleep(gap)
        return lat, health

    # 1 -------------------------------------------------------------------------------------------------------------
    async def baseline(self, n: int) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=120, limits=self.limits) as c:
            await self.probe(c, -1)  # warm-up
            lat = [await self.probe(c, i) for i in range(n)]
            health = [await self.health_latency(c) for _ in range(n)]
        return {"probe_ms": ms(lat), "health_ms": ms(health)}

    # 2 -------------------------------------------------------------------------------------------------------------
    async def streams(self, n: int, max_tokens: int) -> dict[str, Any]:
        peak = 0
        done = asyncio.Event()

        async def watch(c: httpx.AsyncClient) -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, (await c.get(f"{self.server.url}/health")).json()["in_flight"])
                await asyncio.sleep(0.05)

        async def one(c: httpx.AsyncClient, i: int) -> bool:
            body = self.chat_body(words(12, 100 + i), max_tokens, stream=True)
            async with c.stream("POST", f"{self.server.url}/v1/chat/completions", json=body) as r:
                self.statuses[r.status_code] += 1
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            return r.status_code == 200 and lines[-1] == "data: [DONE]" and all(
                "error" not in json.loads(x[6:]) for x in lines[:-1])

        async with httpx.AsyncClient(timeout=300, limits=self.limits) as c:
            watcher = asyncio.ensure_future(watch(c))
            t = time.perf_counter()
            ok = await asyncio.gather(*[one(c, i) for i in range(n)])
            elapsed = time.perf_counter() - t
            done.set()
            await watcher
        return {"streams": n, "completed_well_formed": sum(ok), "max_in_flight": peak, "duration_s": elapsed}

    # 3 -------------------------------------------------------------------------------------------------------------
    def tokens_per_word(self) -> float:
        # another seed than the long prompt's, so that the prefix cache does not shorten its prefill
        r = httpx.post(f"{self.server.url}/v1/chat/completions", json=self.chat_body(words(2000, 8), 1), timeout=120)
        self.statuses[r.status_code] += 1
        return r.json()["usage"]["prompt_tokens"] / 2000

    async def long_prefill(self, tokens: int, gap: float) -> dict[str, Any]:
        prompt = words(int(tokens / self.tokens_per_word()), 7)

        def long_request() -> tuple[int, float, int]:
            # its own thread and connection: the load generator's event loop stays free for the probes
            t = time.perf_counter()
            r = httpx.post(f"{self.server.url}/v1/chat/completions", json=self.chat_body(prompt, 1), timeout=600)
            self.statuses[r.status_code] += 1
            used = r.json().get("usage", {}).get("prompt_tokens", 0) if r.status_code == 200 else 0
            return r.status_code, time.perf_counter() - t, used

        async with httpx.AsyncClient(timeout=600, limits=self.limits) as c:
            task = asyncio.ensure_future(asyncio.to_thread(long_request))
            await self.until_admitted(c, task)  # the probes then meet its prefill
            lat, health = await self.probes_while(c, task, gap, 1000)
            status, took, used = await task
        return {"long_status": status, "long_prompt_tokens": used, "long_request_s": took, "probe_ms": ms(lat),
                "health_ms": ms(health)}

    # 4 -------------------------------------------------------------------------------------------------------------
    async def huge_body(self, mb: int, gap: float) -> dict[str, Any]:
        # ~mb MB of text in one message: far past any context by characters, under the 64 MB body limit
        body = json.dumps(self.chat_body("word " * (mb * (1 << 20) // 5 - 40), 1)).encode()
        before, _ = self.server.rss()
        self.server.reset_peak()
        def send() -> tuple[int, float, str]:
            t = time.perf_counter()
            r = httpx.post(f"{self.server.url}/v1/chat/completions", content=body, timeout=600,
                           headers={"content-type": "application/json"})
            self.statuses[r.status_code] += 1
            return r.status_code, time.perf_counter() - t, r.text[:200]

        async with httpx.AsyncClient(timeout=600, limits=self.limits) as c:
            task = asyncio.ensure_future(asyncio.to_thread(send))
            lat, health = await self.probes_while(c, task, gap, 2000 + mb)
            status, took, text = await task
        _, peak = self.server.rss()
        after, _ = self.server.rss()
        return {"body_mb": len(body) / (1 << 20), "status": status, "refused_in_s": took, "message": text,
                "rss_before_mb": before / 2**20, "rss_peak_growth_mb": (peak - before) / 2**20,
                "rss_after_mb": after / 2**20, "probe_ms": ms(lat), "health_ms": ms(health)}

    # 5 -------------------------------------------------------------------------------------------------------------
    async def soak(self, seconds: float, clients: int) -> dict[str, Any]:
        before, _ = self.server.rss()
        deadline = time.monotonic() + seconds
        count = 0

        async def client_loop(c: httpx.AsyncClient, k: int) -> None:
            nonlocal count
            i = 0
            while time.monotonic() < deadline:
                r = await c.post(f"{self.server.url}/v1/chat/completions",
                                 json=self.chat_body(words(10, 5000 + k * 10_000 + i), 8, stream=(i % 2 == 0)))
                self.statuses[r.status_code] += 1
                count += 1
                i += 1

        async with httpx.AsyncClient(timeout=120, limits=self.limits) as c:
            await asyncio.gather(*[client_loop(c, k) for k in range(clients)])
        self.server.wait_idle(30)
        after, _ = self.server.rss()
        return {"seconds": seconds, "requests": count, "rss_start_mb": before / 2**20, "rss_end_mb": after / 2**20,
                "rss_growth_pct": 100 * (after - before) / before}


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.TemporaryDirectory(prefix="dsv4-load-")
    try:
        model = args.model or build_model(Path(tmp.name) / "tiny", args.max_len)
        extra = args.server_args.split()
        server = Server(Path(model), args.max_len, args.port, extra=extra, log=Path(tmp.name) / "server.log")
        try:
            server.wait_ready()
            load = Load(server)
            report: dict[str, Any] = {"bench": "load", "model": str(args.model or "tiny random (real V4 vocab)"),
                                      "max_model_len": args.max_len, "server_args": extra, "cpus": os.cpu_count()}
            report["idle"] = asyncio.run(load.baseline(args.baseline))
            report["streams"] = asyncio.run(load.streams(args.streams, args.stream_tokens))
            report["long_prefill"] = asyncio.run(load.long_prefill(args.long_tokens, args.gap))
            report["huge_bodies"] = [asyncio.run(load.huge_body(mb, args.gap)) for mb in args.body_mb]
            report["soak"] = asyncio.run(load.soak(args.soak_s, args.soak_clients))
            report["end"] = server.wait_idle(30)
        finally:
            server.stop()
        if not args.no_peer:
            # the peer also keeps the default body limit (it follows the context), to show where a huge body ends
            # without --max-body-mb 64: a 413 before it is read
            unfair = ["--admission-reserve", "0", "--max-step-ms", "0"]
            peer = Server(Path(model), args.max_len, 0, extra=[*extra, *unfair],
                          log=Path(tmp.name) / "peer.log", body_mb=None)
            try:
                peer.wait_ready()
                load.server = peer
                report["peer_long_prefill_no_reserve"] = asyncio.run(load.long_prefill(args.long_tokens, args.gap))
                report["default_body_limit"] = [asyncio.run(load.huge_body(mb, args.gap)) for mb in args.body_mb]
            finally:
                peer.stop()
        report["statuses"] = dict(sorted(load.statuses.items()))
        report["server_errors_5xx"] = sum(v for k, v in load.statuses.items() if k >= 500)
    finally:
        tmp.cleanup()
    return report


def summary(r: dict[str, Any]) -> list[str]:
    idle, lp = r["idle"], r["long_prefill"]
    out = [f"idle: probe (1-token chat) p50 {idle['probe_ms']['p50']:.0f} ms p99 {idle['probe_ms']['p99']:.0f} ms; "
           f"/health p50 {idle['health_ms']['p50']:.1f} ms",
           f"streams: {r['streams']['completed_well_formed']}/{r['streams']['streams']} completed well-formed, "
           f"{r['streams']['max_in_flight']} in flight at most, {r['streams']['duration_s']:.1f} s",
           f"long prefill ({lp['long_prompt_tokens']} tokens, {lp['long_request_s']:.1f} s, status "
           f"{lp['long_status']}): {lp['probe_ms']['n']} probes p50 {lp['probe_ms']['p50']:.0f} ms p99 "
           f"{lp['probe_ms']['p99']:.0f} ms ({lp['probe_ms']['p50'] / idle['probe_ms']['p50']:.1f}x idle p50); "
           f"/health p99 {lp['health_ms']['p99']:.1f} ms"]
    if "peer_long_prefill_no_reserve" in r:
        pe = r["peer_long_prefill_no_reserve"]
        out.append(f"peer, --admission-reserve 0 --max-step-ms 0 (no fair share): long prefill "
                   f"{pe['long_request_s']:.1f} s, "
                   f"{pe['probe_ms']['n']} probes p50 {pe['probe_ms']['p50']:.0f} ms "
                   f"p99 {pe['probe_ms']['p99']:.0f} ms")
    for h in r["huge_bodies"] + r.get("default_body_limit", []):
        where = "--max-body-mb 64" if h in r["huge_bodies"] else "default body limit"
        out.append(f"{h['body_mb']:.0f} MB body ({where}): {h['status']} in {h['refused_in_s'] * 1000:.0f} ms, "
                   f"peak RSS "
                   f"+{h['rss_peak_growth_mb']:.0f} MB (from {h['rss_before_mb']:.0f} MB), {h['probe_ms']['n']} "
                   f"probes meanwhile p50 {h['probe_ms']['p50']:.0f} ms max {h['probe_ms']['max']:.0f} ms, /health max "
                   f"{h['health_ms']['max']:.1f} ms")
    s = r["soak"]
    out.append(f"soak: {s['requests']} requests in {s['seconds']:.0f} s, RSS {s['rss_start_mb']:.0f} -> "
               f"{s['rss_end_mb']:.0f} MB ({s['rss_growth_pct']:+.1f}%)")
    out.append(f"end: pages_used {r['end']['pages_used']}, in_flight {r['end']['in_flight']}; statuses "
               f"{r['statuses']} ({r['server_errors_5xx']} 5xx)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint to serve (default: a tiny random model built here)")
    p.add_argument("--port", type=int, default=0, help="loopback port (default: a free one)")
    p.add_argument("--max-len", type=int, default=32768, help="the server's --max-model-len")
    p.add_argument("--baseline", type=int, default=10, help="probes on the idle server")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--stream-tokens", type=int, default=32)
    p.add_argument("--long-tokens", type=int, default=30000)
    p.add_argument("--body-mb", type=int, nargs="*", default=[10, 60])
    p.add_argument("--gap", type=float, default=0.1, help="seconds between probes")
    p.add_argument("--soak-s", type=float, default=30)
    p.add_argument("--soak-clients", type=int, default=4)
    p.add_argument("--server-args", default="", help="more `dsv4 serve` options, e.g. '--max-num-batched-tokens 128'")
    p.add_argument("--no-peer", action="store_true", help="skip the peer server (no fair share)")
    p.add_argument("--report", type=Path, default=None, help="also write the summary as markdown here")
    args = p.parse_args(argv)
    r = run(args)
    lines = summary(r)
    print("\n".join(lines))
    if args.report is not None:
        # several runs (e.g. two step budgets) append to one dated report
        old = args.report.read_text() + "\n" if args.report.exists() else ""
        args.report.write_text(old + 
            f"# Load test {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"`python benchmarks/load_test.py {' '.join(argv if argv is not None else sys.argv[1:])}` on "
            f"{os.cpu_count()} CPU cores (shared), model: {r['model']}, max_model_len {r['max_model_len']}.\n\n"
            + "\n".join(f"- {x}" for x in lines) + "\n\n```json\n" + json.dumps(r, indent=1) + "\n```\n")
    print(json.dumps(r))
    return 0 if r["server_errors_5xx"] == 0 and r["end"]["pages_used"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
