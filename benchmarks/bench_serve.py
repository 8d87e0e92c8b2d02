"""Serving benchmark: N concurrent streaming clients against `dsv4 serve` over HTTP.

Workload (fixed by the arguments, seeded): `--requests` chat requests, at most `--clients` in flight at once, each a
synthetic user prompt of about `--prompt-words` words and exactly `--max-tokens` output tokens (`ignore_eos`-free: the
stream may stop early at EOS, and the token counts come from the server's `usage`), thinking off, streamed over SSE.

Reported: time to first token (TTFT: request sent -> first streamed text), time per output token (TPOT: first ->
last text chunk / (tokens - 1)), end-to-end latency, each as mean / p50 / p90 / p99 in ms; request and output-token
throughput. The peer, measured in the same run unless `--no-peer`: the same prompts at the same concurrency through
`dsv4.AsyncLLM` in this process (no HTTP), so the report shows what the server layer costs.

    python benchmarks/bench_serve.py                       # tiny random model, server started here
    python benchmarks/bench_serve.py --model /ckpt --clients 64 --requests 256
    python benchmarks/bench_serve.py --url http://127.0.0.1:8000 --model-name NAME --no-peer

The last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def make_prompts(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summary(xs: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in xs]
    return {"mean": statistics.fmean(ms) if ms else float("nan"), "p50": pct(ms, 50), "p90": pct(ms, 90),
            "p99": pct(ms, 99)}


async def one_request(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any]
                      ) -> dict[str, Any]:
    start = time.perf_counter()
    first = last = None
    usage = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"].get("message", "stream error")}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                d = c.get("delta", {})
                if d.get("content") or d.get("reasoning_content") or d.get("tool_calls"):
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    return {"ttft": (first - start) if first is not None else None,
            "tpot": (last - first) / (tokens - 1) if first is not None and tokens > 1 else None,
            "e2e": end - start, "tokens": tokens, "prompt_tokens": usage["prompt_tokens"] if usage else 0}


async def run_clients(url: str, model: str, api_key: str | None, prompts: list[str], clients: int,
                      max_tokens: int) -> tuple[list[dict[str, Any]], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(clients)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def guarded(prompt: str) -> dict[str, Any]:
            body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                    "thinking": {"type": "disabled"}}
            async with sem:
                try:
                    return await one_request(client, url, headers, body)
                except httpx.HTTPError as e:
                    return {"error": f"{type(e).__name__}: {e}"}

        await guarded(prompts[0])  # warm-up: first-request costs (grammar-free, but allocations / lazy imports)
        start = time.perf_counter()
        results = await asyncio.gather(*[guarded(p) for p in prompts])
        return list(results), time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, name: str, args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dsv4.cli", "serve", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", name, "--max-num-seqs", str(max(args.clients, 1)),
           "--max-concurrency", str(max(args.clients * 2, 8)), "--log-level", "warning"]
    if args.device:
        cmd += ["--device", args.device]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench_serve: the server exited with {proc.returncode} while starting")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("bench_serve: the server did not become ready within 600 s")


def engine_peer(model_dir: Path, prompts: list[str], max_tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same prompts and concurrency through `dsv4.AsyncLLM` in this process: the engine (same background step
    thread) without HTTP, JSON, SSE and the V4 output parser."""
    import torch

    from dsv4 import LLM, AsyncLLM, SamplingParams
    from dsv4.chat import encode_messages

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    engine = AsyncLLM(LLM(str(model_dir), dtype=getattr(torch, dtype), device=device,
                          max_num_seqs=max(args.clients, 1)))
    tok = engine.tokenizer
    ids = [tok.encode(encode_messages([{"role": "user", "content": p}], thinking_mode="chat")) for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)

    async def run() -> tuple[int, float]:
        sem = asyncio.Semaphore(args.clients)

        async def one(prompt_ids: list[int]) -> int:
            async with sem:
                return len((await engine.generate(prompt_ids, params)).outputs[0].token_ids)

        await one(ids[0])  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*[one(x) for x in ids])
        return sum(counts), time.perf_counter() - start

    try:
        tokens, elapsed = asyncio.run(run())
    finally:
        engine.shutdown()
    return {"duration_s": elapsed, "output_tokens": tokens, "output_token_throughput": tokens / elapsed,
            "request_throughput": len(prompts) / elapsed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--model", type=Path, default=None, help="checkpoint to serve (default: a tiny random model)")
    p.add_argument("--model-name", default="bench", help="served model name (with --url: the server's name)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=16, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    p.add_argument("--no-peer", action="store_true", help="skip the in-process AsyncLLM peer")
    args = p.parse_args(argv)

    prompts = make_prompts(args.requests, args.prompt_words, args.seed)
    tmp = None
    proc = None
    model_desc = args.url or ""
    model_dir = args.model
    try:
        if args.url is None:
            if model_dir is None:
                sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
                from tests.serve.tiny import build_tiny_checkpoint

                tmp = tempfile.TemporaryDirectory(prefix="dsv4-bench-")
                model_dir = build_tiny_checkpoint(Path(tmp.name) / "tiny-random")
            model_desc = str(model_dir)
            proc, url = start_server(model_dir, args.model_name, args)
        else:
            url = args.url.rstrip("/")
        results, elapsed = asyncio.run(run_clients(url, args.model_name, args.api_key, prompts, args.clients,
                                                   args.max_tokens))
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    report: dict[str, Any] = {
        "bench": "serve", "model": model_desc, "clients": args.clients, "requests": args.requests,
        "max_tokens": args.max_tokens,
        "prompt_tokens_mean": statistics.fmean([r["prompt_tokens"] for r in ok]) if ok else 0,
        "completed": len(ok), "errors": len(errors), "duration_s": elapsed, "output_tokens": tokens,
        "request_throughput": len(ok) / elapsed, "output_token_throughput": tokens / elapsed,
        "ttft_ms": summary([r["ttft"] for r in ok if r["ttft"] is not None]),
        "tpot_ms": summary([r["tpot"] for r in ok if r["tpot"] is not None]),
        "e2e_ms": summary([r["e2e"] for r in ok]),
        "pages_used_after": health.get("pages_used"),
    }
    if not args.no_peer and model_dir is not None:
        peer = engine_peer(model_dir, prompts, args.max_tokens, args)
        report["peer_engine_in_process"] = peer
        # > 1: the engine alone is faster than through the server by this factor
        report["engine_over_server_throughput"] = (peer["output_token_throughput"]
                                                   / max(report["output_token_throughput"], 1e-9))
    if tmp is not None:
        tmp.cleanup()

    print(f"model {model_desc}: {args.requests} requests, {args.clients} concurrent clients, "
          f"{args.max_tokens} max tokens, {len(errors)} errors")
    for e in errors[:5]:
        print(f"  error: {e}")
    print(f"throughput: {report['request_throughput']:.2f} req/s, {report['output_token_throughput']:.1f} tok/s "
          f"over {elapsed:.1f} s")
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        s = report[key]
        print(f"{key:8s} mean {s['mean']:9.1f}  p50 {s['p50']:9.1f}  p90 {s['p90']:9.1f}  p99 {s['p99']:9.1f}")
    if "peer_engine_in_process" in report:
        print(f"peer (AsyncLLM in-process, same prompts and concurrency, no HTTP): "
              f"{report['peer_engine_in_process']['output_token_throughput']:.1f} tok/s "
              f"({report['engine_over_server_throughput']:.2f}x the server's)")
    print(json.dumps(report))
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
