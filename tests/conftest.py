"""Shared test helpers: tiny DeepSeek-V4 configs that exercise every layer type in seconds on a CPU."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from hypothesis import settings

from dsv4.config import ModelConfig

# One CI run decides whether a change lands, so the property tests draw the same examples on every run: a red run is
# a reproducible bug, not an unlucky draw. Explore other examples with HYPOTHESIS_PROFILE=explore (random draws).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The suite runs tiny models on a shared 2-core machine: with several intra-op threads every small op pays OpenMP
# hand-off/spin costs (measured 17x slower decode steps under load). One thread per test process is fastest here.
torch.set_num_threads(1)


def make_tiny_config(**overrides: Any) -> ModelConfig:
    """5 layers SWA/CSA/HCA/CSA/HCA (+ an MTP block), 1 hash layer, window 8, CSA ratio 4, HCA ratio 16, YaRN,
    16 indexer heads with top-4 (fewer than the visible entries once S > 20)."""
    base: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, head_dim=32,
        qk_rope_head_dim=16, q_lora_rank=32, o_groups=2, o_lora_rank=16, sliding_window=8,
        compress_ratios=[0, 4, 16, 4, 16, 0], index_n_heads=16, index_head_dim=32, index_topk=4,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        num_hash_layers=1, routed_scaling_factor=1.5, swiglu_limit=10.0, rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1},
        hc_mult=4, hc_sinkhorn_iters=20, num_nextn_predict_layers=1, max_position_embeddings=4096,
    )
    base.update(overrides)
    return ModelConfig.from_dict(base)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return make_tiny_config()


def random_model(cfg: ModelConfig, seed: int = 0, dtype=None):
    """A dsv4 Transformer with every parameter random and O(1)-scaled (init_weights' small std makes most
    comparisons trivially pass); fp32 by default."""
    from dsv4.model.transformer import Transformer

    model = Transformer(cfg, dtype=dtype or torch.float32).init_weights(seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name:
                v = 1 + 0.1 * r
            elif name.endswith(("attn_sink", "ape", "gate.bias")):
                v = 0.5 * r
            elif name.endswith("_base"):
                v = 0.3 * r
            elif name.endswith("_scale"):
                v = 1 + 0.2 * r
            elif name == "embed.weight":
                v = r
            else:
                v = r * p.shape[-1] ** -0.5
            p.copy_(v.to(p.dtype))
    return model
