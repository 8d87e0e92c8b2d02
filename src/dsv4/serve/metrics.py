"""Prometheus metrics of the server (`GET /metrics`).

Every app owns its own `CollectorRegistry`, so several servers (or test apps) in one process never share counters.
Cache gauges are not pushed by the engine: a collector reads the engine's counters at scrape time, so /metrics is
always current and the engine's hot loop does no metrics work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket edges in seconds: CPU test models answer in milliseconds, a large model on a busy GPU in seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._stats()
        yield GaugeMetricFamily("dsv4_kv_cache_pages_used", "KV-cache pages held by requests", value=s["pages_used"])
        yield GaugeMetricFamily("dsv4_kv_cache_pages_total", "KV-cache pages allocated", value=s["pages_total"])
        yield GaugeMetricFamily("dsv4_kv_cache_pages_prefix_cached", "KV-cache pages held only by the prefix cache",
                                value=s.get("pages_prefix_cached", 0))
        total = s["pages_total"]
        yield GaugeMetricFamily(
            "dsv4_kv_cache_usage_ratio", "fraction of KV-cache pages not free (requests + prefix cache)",
            value=(total - s.get("pages_free", total - s["pages_used"])) / total if total else 0.0
        )
        yield GaugeMetricFamily(
            "dsv4_prefix_cache_hit_rate",
            "prompt tokens served from the prefix cache / prompt tokens, since start",
            value=s["prefix_cache_hit_rate"],
        )
        yield GaugeMetricFamily("dsv4_num_requests_running", "requests in the engine's running batch",
                                value=s["running"])
        yield GaugeMetricFamily("dsv4_num_requests_waiting", "requests queued in the engine", value=s["waiting"])


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dsv4_requests", "finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "prompt tokens processed", registry=r)
        self.cached_tokens = Counter("dsv4_cached_prompt_tokens", "prompt tokens served from the prefix cache",
                                     registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram(
            "dsv4_time_to_first_token_seconds", "time from arrival to the first generated token", buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "dsv4_time_per_output_token_seconds", "mean time between generated tokens of a request",
            buckets=_TPOT_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "dsv4_e2e_request_latency_seconds", "time from arrival to the last token", buckets=_E2E_BUCKETS, registry=r
        )
        self.in_flight = Gauge("dsv4_requests_in_flight", "generation requests accepted and not yet finished",
                               registry=r)
        self.aborted = Counter("dsv4_requests_aborted", "requests aborted (client gone or error)", registry=r)
        # kinds are dsv4.chat.StreamParser problem kinds: repairs (implicit_block, missing_string_attr, ...) and
        # losses (truncated_call, unknown_tool, ...); one count per kind and choice
        self.output_problems = Counter("dsv4_output_parse_problems", "model outputs the V4 parser had to repair or "
                                       "could not fully read, by kind", ["kind"], registry=r)
        r.register(_EngineCollector(engine_stats))

    def observe_request(self, *, prompt_tokens: int, cached_tokens: int, output_tokens: int, ttft: float | None,
                        e2e: float) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.generation_tokens.inc(output_tokens)
        self.e2e.observe(e2e)
        if ttft is not None:
            self.ttft.observe(ttft)
            if output_tokens > 1:
                self.tpot.observe((e2e - ttft) / (output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
