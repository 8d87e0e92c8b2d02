"""EngineConfig: the engine options of `dsv4.LLM(..., **engine options)`, validated once."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class EngineConfig:
    # Memory budget for the KV cache (pages + state slots + prefix snapshots), in GiB. The cache is allocated once
    # from it and never grows; `num_pages` overrides the derived page count (tests use it to force preemption).
    cache_memory_gb: float = 1.0
    num_pages: int | None = None
    page_size: int = 128  # tokens per page: a multiple of every compression ratio (V4: lcm(4, 128) = 128)
    max_num_seqs: int = 32  # state slots = most sequences running at once
    max_num_batched_tokens: int = 512  # token budget of one forward (chunked prefill splits longer prompts)
    # tokens of each step that running prefills leave to waiting requests (None: a quarter of the budget), so a short
    # request starts within a step or two while a long prompt prefills (scheduler.py)
    admission_reserve: int | None = None
    # time target of a step that holds prefill chunks, in ms (engine/step_cost.py): chunks are sized from the measured
    # cost of earlier steps to stay within max(max_step_ms, 4 x a small step), so a request arriving during a long
    # prefill waits for short steps only; None sizes chunks by max_num_batched_tokens alone
    max_step_ms: float | None = 20.0
    max_model_len: int | None = None  # default: the model's max_position_embeddings, capped by the cache capacity
    enable_prefix_caching: bool = True
    max_prefix_snapshots: int = 16  # bound on prefix-cache entries (each holds a snapshot of one slot's state)
    prefix_snapshot_interval: int = 4  # pages between snapshots inside a long prompt (plus its last boundary)
    speculative: bool = False  # MTP speculative decoding (draft 1 token with mtp.0, verify with the main model)
    seed: int = 0  # seeds the per-request generators of requests without their own seed
    num_threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    # which kernels the ops run on a CPU (dsv4/ops; docs/architecture.md sec 6): "native" = the native kernels
    # (dsv4/kernels) where they load here, else the reference with the reason logged once; "reference" = the plain
    # PyTorch ops; None = the ops' default table (native). A checkpoint LLM loads onto a CPU with native kernels in
    # use computes in fp32 (the kernels' precision; bf16 weights stay bf16).
    backend: str | None = None
    # dtype of the KV cache (window rings, compressed entries, indexer keys; the compressor tails stay fp32):
    # "bfloat16" halves its memory whatever the activations (the official cache is bf16), "float32" keeps it exact
    # for fp32 activations; None = the activation dtype.
    kv_cache_dtype: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"engine option {name}={getattr(self, name)!r} is invalid: {why}")

        if not self.cache_memory_gb > 0:
            raise bad("cache_memory_gb", "it must be > 0")
        if self.num_pages is not None and self.num_pages < 1:
            raise bad("num_pages", "it must be >= 1 (or None to size the cache from cache_memory_gb)")
        if self.page_size < 1:
            raise bad("page_size", "it must be a positive multiple of the model's compression ratios (V4: 128)")
        if self.max_num_seqs < 1:
            raise bad("max_num_seqs", "it must be >= 1")
        if self.max_num_batched_tokens < 2:
            raise bad("max_num_batched_tokens", "it must be >= 2 (a decode with a speculative draft needs 2)")
        if self.admission_reserve is not None and not 0 <= self.admission_reserve < self.max_num_batched_tokens:
            raise bad("admission_reserve", "it must be in [0, max_num_batched_tokens)")
        if self.max_step_ms is not None and not self.max_step_ms > 0:
            raise bad("max_step_ms", "it must be > 0 (or None to size prefill chunks by tokens only)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise bad("max_model_len", "it must be >= 2")
        if self.max_prefix_snapshots < 1:
            raise bad("max_prefix_snapshots", "it must be >= 1 (disable prefix caching with enable_prefix_caching)")
        if self.prefix_snapshot_interval < 1:
            raise bad("prefix_snapshot_interval", "it must be >= 1 page")
        if self.kv_cache_dtype not in (None, "bfloat16", "float32"):
            raise bad("kv_cache_dtype", 'choose "bfloat16", "float32" or None (the activation dtype)')
        if self.backend not in (None, "native", "reference"):
            raise bad("backend", 'choose "native" (the native CPU kernels where they load), "reference" (plain '
                      "PyTorch) or None (the default: native)")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; valid options: {sorted(known)}")
        return cls(**kwargs)
