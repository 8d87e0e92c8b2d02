"""Lightning Indexer: picks which compressed entries a CSA query attends to (architecture.md sec 8; report eqs.
13-17).

Index score ``I[t, s] = sum_h w[t, h] * ReLU(qI[t, h] . K[s])`` between the query's ``n_I`` small heads (from the
shared low-rank query ``qr``) and the indexer's own compressed keys (a second, ``index_head_dim``-wide CSA
compressor). Each query keeps the top ``index_topk`` *visible* entries (``s < (t + 1) // 4``; exact ties to the lowest
id); picks that are not visible (early queries with few entries) become -1. The indexer scores every visible key, so
its cost grows with the context; the main attention then reads only the picked entries. The scoring and top-k are
the op ``dsv4::indexer_topk`` (dsv4/ops: keys read from their pages in chunks, a running top-k).

With ``Numerics.qat_sim`` the official Hadamard rotation + FP4 rounding is applied to q and to the keys when they are
compressed. Scores are computed in the activation dtype (official: a bf16 einsum).

Deliberately not here: the attention over the picked entries (attention.py).

Shape legend: N flat tokens, Bg sequences, S chunk width, H = index_n_heads, I = index_head_dim, E entries, k picks.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops
from dsv4.config import CSA_RATIO, ModelConfig
from dsv4.model.compressor import Compressor
from dsv4.model.linear import Linear
from dsv4.model.qat import fp4_sim, hadamard
from dsv4.model.rope import apply_rope


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.topk = config.index_topk
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, dtype)
        self.weights_proj = nn.Linear(config.dim, self.n_heads, bias=False, dtype=dtype)
        self.compressor = Compressor(config.dim, self.head_dim, CSA_RATIO, config.rms_norm_eps)
        self.weight_scale = self.head_dim ** -0.5 * self.n_heads ** -0.5

    def queries(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qat: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (qI [N, H, I] rotated, w [N, H] head weights incl. both softmax scales)."""
        q = ops.linear(qr, self.wq_b.weight, getattr(self.wq_b, "scale", None))
        q = q.unflatten(-1, (self.n_heads, self.head_dim))  # [N, H, I]
        q = apply_rope(q, cos[:, None], sin[:, None])
        if qat:
            q = fp4_sim(hadamard(q))
        w = ops.linear(x, self.weights_proj.weight, getattr(self.weights_proj, "scale", None)) * self.weight_scale
        return q, w

    @staticmethod
    def key_post(qat: bool):
        return (lambda k: fp4_sim(hadamard(k))) if qat else None

    def select(self, qg: torch.Tensor, wg: torch.Tensor, keys: torch.Tensor, block_tables: torch.Tensor,
               visible: torch.Tensor, n_entries: int) -> torch.Tensor:
        """Top-k visible entries per query: qg [Bg, S, H, I], wg [Bg, S, H], the indexer keys' pages [R, P, I] and
        block tables (Compressor.group_entries), ``visible`` [Bg, S] = number of entries each query may see,
        (t + 1) // 4, ``n_entries`` = the most any query sees -> [Bg, S, k] entry ids, -1 where fewer are visible."""
        k = min(self.topk, n_entries)
        return ops.indexer_topk(qg, wg, keys, block_tables, CSA_RATIO, visible, n_entries, k)
