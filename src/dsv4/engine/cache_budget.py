"""Size the KV cache once from the memory budget (`EngineConfig.cache_memory_gb`) and allocate it.

budget = slots x slot state + prefix snapshots x slot state + speculative rollback snapshots + pages x page bytes.
Snapshots are copies of one slot's state (window rings + compressor tails), so they are counted at the slot size;
whatever is left after the fixed parts becomes pages. The cache never grows afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

from dsv4.engine.config import EngineConfig

GiB = 1 << 30


def cache_dtype(model: Any) -> torch.dtype:
    embed = getattr(model, "embed", None)
    weight = getattr(embed, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def plan_pages(model_config: Any, c: EngineConfig, dtype: torch.dtype, mtp: bool) -> tuple[int, int, int]:
    """(num_pages, slot_bytes, page_bytes) for this budget."""
    from dsv4.model.cache import KVCache

    slot_b = KVCache.slot_bytes(model_config, dtype, mtp)
    page_b = KVCache.page_bytes(model_config, c.page_size, dtype)
    # + one rollback copy per running sequence (an upper bound: KVCache.snapshot_rows copies only what a verify
    # step can overwrite)
    fixed_slots = c.max_num_seqs * (2 if c.speculative else 1)
    fixed_slots += c.max_prefix_snapshots if c.enable_prefix_caching else 0
    if c.num_pages is not None:
        return c.num_pages, slot_b, page_b
    max_len = min(int(getattr(model_config, "max_position_embeddings", 1 << 20)), c.max_model_len or (1 << 62))
    if page_b == 0:  # a model without compressed layers: pages cost nothing, cover the whole context
        return -(-max_len // c.page_size) * c.max_num_seqs, slot_b, page_b
    left = int(c.cache_memory_gb * GiB) - fixed_slots * slot_b
    if left < page_b:
        raise ValueError(
            f"cache_memory_gb={c.cache_memory_gb} does not fit the fixed per-sequence state: {fixed_slots} slot "
            f"states x {slot_b / 2**20:.1f} MiB (max_num_seqs={c.max_num_seqs}, prefix snapshots, speculative "
            f"rollback) plus one page of {page_b / 2**20:.2f} MiB; raise cache_memory_gb or lower max_num_seqs / "
            f"max_prefix_snapshots"
        )
    # No use for more pages than every slot filled to the context length.
    return min(left // page_b, -(-max_len // c.page_size) * c.max_num_seqs), slot_b, page_b


def build_cache(model: Any, c: EngineConfig, device: torch.device) -> tuple[Any, int, int]:
    """-> (KVCache, num_pages, total bytes accounted)."""
    from dsv4.model.cache import KVCache

    dtype = getattr(torch, c.kv_cache_dtype) if c.kv_cache_dtype else cache_dtype(model)
    mtp = bool(c.speculative)
    num_pages, slot_b, page_b = plan_pages(model.config, c, dtype, mtp)
    cache = KVCache(model.config, c.max_num_seqs, num_pages, c.page_size, dtype=dtype, device=device, mtp=mtp)
    snapshots = (c.max_prefix_snapshots if c.enable_prefix_caching else 0) + (c.max_num_seqs if c.speculative else 0)
    return cache, num_pages, cache.nbytes + snapshots * slot_b
