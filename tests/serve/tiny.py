"""A tiny random V4 checkpoint with the real vocabulary (so the real tokenizer, chat format and grammars apply),
built on the fly: 3 layers (sliding window, CSA, HCA), hidden size 16, bf16 weights, about 10 MB on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4.config import ModelConfig
from dsv4.model import checkpoint_io
from dsv4.model.transformer import Transformer

V4_VOCAB = 129280


def tiny_config(**overrides: object) -> ModelConfig:
    base: dict[str, object] = dict(
        vocab_size=V4_VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, head_dim=32,
        qk_rope_head_dim=16, q_lora_rank=16, o_groups=2, o_lora_rank=16, sliding_window=8,
        compress_ratios=[0, 4, 16, 0], index_n_heads=2, index_head_dim=16, index_topk=4,
        moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        num_hash_layers=1, routed_scaling_factor=1.5, swiglu_limit=10.0, rope_theta=10000.0,
        compress_rope_theta=160000.0,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1},
        hc_mult=2, hc_sinkhorn_iters=4, num_nextn_predict_layers=0, max_position_embeddings=4096,
    )
    base.update(overrides)
    return ModelConfig.from_dict(base)


def build_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    model = Transformer(tiny_config(), dtype=torch.float32).init_weights(seed)
    return checkpoint_io.save_checkpoint(path, model.state_dict(), model.config, dtype=torch.bfloat16)
