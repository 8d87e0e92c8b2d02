"""The benchmark's accounting helpers (the numbers its report is built on)."""

from __future__ import annotations

import torch

from dsv4.config import ModelConfig
from dsv4.engine import bench
from dsv4.model.transformer import Transformer
from tests.engine.test_engine_model import TINY


def test_decode_weight_bytes_counts_active_experts_only():
    cfg = ModelConfig.from_dict(TINY)
    with torch.device("meta"):
        m = Transformer(cfg, dtype=torch.float32)
    params = dict(m.named_parameters())
    expert = sum(p.numel() * 4 for n, p in params.items() if ".ffn.experts." in n and not n.startswith("mtp."))
    mtp = sum(p.numel() * 4 for n, p in params.items() if n.startswith("mtp."))
    rest = sum(p.numel() * 4 for n, p in params.items() if ".ffn.experts." not in n and not n.startswith("mtp."))
    embed = params["embed.weight"]
    expect = rest - embed.numel() * 4 + embed.shape[1] * 4 + expert * TINY["num_experts_per_tok"] / TINY[
        "n_routed_experts"]
    assert expert > 0 and mtp > 0
    assert bench.decode_weight_bytes(m) == int(expect)


def test_bandwidth_is_positive_and_config_is_valid():
    assert bench.measure_bandwidth(mib=8, reps=2) > 0
    cfg = ModelConfig.from_dict(bench.BENCH_CONFIG)
    assert cfg.vocab_size == 129280 and cfg.dim == 512 and cfg.n_layers == 8 and cfg.n_routed_experts == 32
