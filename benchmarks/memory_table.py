"""Resident bytes of V4-Flash and V4-Pro in dsv4: weights (packed as published vs dequantised to bf16) and the KV
cache at 128K and 1M tokens (bf16, and the compact FP8/FP4 layout of spec sec 11), computed from the published
configs (shared/reference/configs/) on the meta device: no weights are read or allocated.

Weights: each parameter at the bytes dsv4 holds it: FP8 e4m3 + 128x128 ue8m0 scales and FP4 + 1x32 scales where the
release stores them (checkpoint_io.tensor_kind; wo_a is FP8 in the release), fp32 where the model keeps fp32 (norms,
mHC, compressors, sinks, router bias, the head), bf16 otherwise, tid2eid int64; the MTP block included.
KV per sequence: KVCache.page_bytes / page_size per token (window rings and compressor tails are per-slot constants,
added once) in bf16; the compact layout counts 584 B per main entry (448 FP8 + 64 bf16 RoPE dims + scales) and
68 B per indexer entry (FP4 + scales), spec sec 11. Last stdout line: JSON.

    python benchmarks/memory_table.py [--configs /work/shared/reference/configs]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dsv4.config import CSA_RATIO, ModelConfig
from dsv4.model import checkpoint_io as cio
from dsv4.model import quant
from dsv4.model.cache import KVCache

GiB = 2**30


def weight_bytes(config: ModelConfig) -> tuple[int, int]:
    """(packed as published, dequantised to bf16) bytes of every parameter and buffer."""
    from dsv4.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config, dtype=torch.bfloat16)
    packed = plain = 0
    for name, t in list(model.state_dict().items()):
        n = t.numel()
        kind = cio.tensor_kind(name)
        if kind == "fp8":
            o, i = t.shape
            ob, ib = quant.fp8_scale_shape(t.shape)
            packed += n + ob * ib
        elif kind == "fp4":
            packed += n // 2 + n // quant.FP4_BLOCK
        else:
            packed += n * t.element_size()
        plain += n * (2 if kind in ("fp8", "fp4") else t.element_size())
    return packed, plain


def kv_bytes(config: ModelConfig, tokens: int) -> tuple[int, int]:
    """(bf16, compact FP8/FP4) KV bytes of one sequence of ``tokens``."""
    page = 128
    pages = -(-tokens // page)
    bf16 = KVCache.page_bytes(config, page, torch.bfloat16) * pages + KVCache.slot_bytes(config, torch.bfloat16, False)
    ratios = [r for r in config.layer_ratios if r > 0]
    main_entries = sum(tokens // r for r in ratios)
    idx_entries = sum(tokens // r for r in ratios if r == CSA_RATIO)
    bf16_entries = main_entries * config.head_dim * 2 + idx_entries * config.index_head_dim * 2
    compact = bf16 - bf16_entries + main_entries * 584 + idx_entries * 68
    return bf16, compact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=Path, default=Path("/work/shared/reference/configs"))
    args = ap.parse_args()
    out = {}
    for name in ("v4-flash", "v4-pro"):
        cfg = ModelConfig.from_json(args.configs / name / "config.json")
        packed, plain = weight_bytes(cfg)
        kv = {t: kv_bytes(cfg, t) for t in (128 * 1024, 1024 * 1024)}
        out[name] = {"weights_packed_gib": packed / GiB, "weights_bf16_gib": plain / GiB,
                     **{f"kv_{t // 1024}k_bf16_gib": v[0] / GiB for t, v in kv.items()},
                     **{f"kv_{t // 1024}k_compact_gib": v[1] / GiB for t, v in kv.items()}}
        r = out[name]
        print(f"{name}: weights packed {r['weights_packed_gib']:.1f} GiB (bf16 {r['weights_bf16_gib']:.1f}); KV per "
              f"sequence 128K {r['kv_128k_bf16_gib']:.2f} GiB bf16 / {r['kv_128k_compact_gib']:.2f} compact, 1M "
              f"{r['kv_1024k_bf16_gib']:.2f} / {r['kv_1024k_compact_gib']:.2f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
