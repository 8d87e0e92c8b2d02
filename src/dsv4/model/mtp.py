"""Multi-token prediction block ``mtp.{i}`` (architecture.md sec 10; report: depth 1, same as V3).

At position t it combines the main model's output streams ``h_t`` (before the hc head) with the embedding of the
next token t+1 and runs one more full Block (sliding-window attention, its own MoE and mHC sites) to predict token
t+2:

    e = enorm(embed(next_ids));  x = e_proj(e)[:, None] + h_proj(hnorm(h))   # broadcast over the M streams
    x = Block(x);  logits = head(norm(hc_head_mtp(x)))

Embedding and output head are the main model's (the checkpoint has no ``mtp.*.emb``/``head``). Its window lives in the
cache at layer index ``n_layers + i``, so the engine can draft one token per step with the same ForwardBatch.
Deliberately not here: the speculative acceptance rule (engine) and the MTP loss (train).

Shape legend: N tokens, M = hc_mult streams, D = dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dsv4.config import ModelConfig
from dsv4.model.batch import BatchPlan, ForwardOutput
from dsv4.model.cache import KVCache
from dsv4.model.linear import Linear
from dsv4.model.norm import RMSNorm
from dsv4.model.qat import Numerics
from dsv4.model.transformer import Block

if TYPE_CHECKING:
    from dsv4.model.transformer import Transformer


class MTPBlock(Block):
    def __init__(self, layer_id: int, config: ModelConfig, numerics: Numerics, dtype: torch.dtype) -> None:
        super().__init__(layer_id, config, config.mtp_ratio, numerics, dtype)
        d, m = config.dim, config.hc_mult
        self.e_proj = Linear(d, d, dtype)
        self.h_proj = Linear(d, d, dtype)
        self.enorm = RMSNorm(d, config.rms_norm_eps)
        self.hnorm = RMSNorm(d, config.rms_norm_eps)
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.hc_head_fn = nn.Parameter(torch.zeros(m, m * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(m, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, hidden: torch.Tensor, plan: BatchPlan, cache: KVCache | None, model: Transformer,
                logits_indices: torch.Tensor | None = None) -> ForwardOutput:  # type: ignore[override]
        """hidden [N, M, D] main streams; plan.input_ids = next tokens -> (logits [M', V], streams [N, M, D])."""
        e = self.enorm(model.embed(plan.input_ids))  # [N, D]
        x = self.e_proj(e).unsqueeze(1) + self.h_proj(self.hnorm(hidden.to(e.dtype)))  # [N, M, D]
        x = super().forward(x, plan, cache, plan.input_ids)
        logits = model.logits(x, logits_indices, (self.hc_head_fn, self.hc_head_base, self.hc_head_scale), self.norm)
        return ForwardOutput(logits, x)
