"""A tiny random V4 checkpoint with the real vocabulary (so the real tokenizer, chat format and grammars apply),
built on the fly: 3 layers (sliding window, CSA, HCA), hidden size 16, bf16 weights, about 10 MB on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from dsv4.config import ModelConfig
from dsv4.model import checkpoint_io
from dsv4.model.transformer import Transformer
from tests.conftest import make_tiny_config

V4_VOCAB = 129280


def tiny_config(**overrides: object) -> ModelConfig:
    """The model tests' tiny config, cut down to a few MB with the real V4 vocabulary (the chat format needs it)."""
    base: dict[str, object] = dict(
        vocab_size=V4_VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, q_lora_rank=16,
        compress_ratios=[0, 4, 16, 0], index_n_heads=2, index_head_dim=16, moe_intermediate_size=16,
        n_routed_experts=4, hc_mult=2, hc_sinkhorn_iters=4, num_nextn_predict_layers=0,
    )
    base.update(overrides)
    return make_tiny_config(**base)


def build_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    model = Transformer(tiny_config(), dtype=torch.float32).init_weights(seed)
    return checkpoint_io.save_checkpoint(path, model.state_dict(), model.config, dtype=torch.bfloat16)
