"""Mixture of experts of DeepSeek-V4 (architecture.md sec 9; report sec 2.1 and 4.2.3).

* Router (``Gate``): affinity ``s = sqrt(softplus(x W^T))`` in fp32; the first ``num_hash_layers`` layers pick
  experts by a fixed token-id table ``tid2eid``, the others by ``topk(s + bias)`` (the bias only steers selection,
  aux-loss-free balancing). Weights ``s[picked]`` normalised to sum 1, times ``routed_scaling_factor``.
* Experts: SwiGLU with clamping (gate branch ``min(g, limit)``, linear branch ``clamp(u, -limit, limit)``), the
  routing weight applied to the activation *before* ``w2`` (official), routed outputs accumulated in fp32, plus
  one always-on shared expert (also clamped).

Each expert runs only on the tokens routed to it (tokens sorted by expert; one loop over the experts that got any
token). On the native fast path (``MoE.use_native_kernels``) everything after the gate is one dsv4/kernels call.
Deliberately not here: expert parallelism, the kernels themselves, the training-time balance loss and the bias
update (train/).

Shape legend: N tokens, D dim, E experts, k experts per token, F expert inner dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import kernels, ops
from dsv4.config import ModelConfig
from dsv4.model import quant
from dsv4.model.linear import Linear


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.topk = config.num_experts_per_tok
        self.score_func = config.scoring_func
        self.route_scale = config.routed_scaling_factor
        self.hash = config.is_hash_layer(layer_id)
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.dim, dtype=dtype))
        if self.hash:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.topk, dtype=torch.long))
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], input_ids [N] -> (weights [N, k] fp32, expert ids [N, k])."""
        logits = F.linear(x.float(), self.weight.float())  # [N, E] fp32 router (official)
        if self.score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif self.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        if self.hash:
            ids = self.tid2eid[input_ids].long()
        else:
            ids = (scores + self.bias.float()).topk(self.topk, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.score_func != "softmax":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, ids


class Expert(nn.Module):
    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.w1 = Linear(dim, inter_dim, dtype)
        self.w2 = Linear(inter_dim, dim, dtype)
        self.w3 = Linear(dim, inter_dim, dtype)
        self.limit = swiglu_limit

    def forward(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        # ops.linear on the weights: the same math as calling the Linear modules, without their dispatch cost
        g = ops.linear(x, self.w1.weight, self.w1.scale).float()
        u = ops.linear(x, self.w3.weight, self.w3.scale).float()
        if self.limit > 0:
            g = g.clamp(max=self.limit)
            u = u.clamp(-self.limit, self.limit)
        h = F.silu(g) * u  # [n, F] fp32
        if weights is not None:
            h = weights[:, None] * h  # routing weight before w2 (official)
        return ops.linear(h.to(x.dtype), self.w2.weight, self.w2.scale)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.gate = Gate(config, layer_id, dtype)
        self.experts = nn.ModuleList(
            Expert(config.dim, config.moe_intermediate_size, config.swiglu_limit, dtype)
            for _ in range(config.n_routed_experts))
        self.shared_experts = (Expert(config.dim, config.shared_inter_dim, config.swiglu_limit, dtype)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D]."""
        n, k = x.shape[0], self.gate.topk
        weights, ids = self.gate(x, input_ids)  # [N, k]
        stacks = self.fp4_stacks()
        if stacks is not None:  # packed FP4 experts: one op over the stacked weights
            y = ops.experts(x, ids, weights, *stacks, self.experts[0].limit)
            if self.shared_experts is not None:
                y = y + Expert.forward(self.shared_experts, x).float()
            return y.to(x.dtype)
        if self._native is not None and not torch.is_grad_enabled():
            return kernels.moe(x, ids, weights, self._native).to(x.dtype)
        if n == 1 and self._packed is None and not torch.is_grad_enabled():
            return self._one_token(x, weights, ids)
        flat = ids.flatten()  # [N*k]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()  # one host sync per layer
        tok = order // k
        w = weights.flatten()[order]
        packed = self._packed if self._packed is not None and not torch.is_grad_enabled() else None
        if packed is not None and packed[0].data_ptr() != self.experts[0].w1.weight.data_ptr():
            packed = None  # the expert weights were replaced (e.g. reloaded): the stacks are stale
        # batched matmuls pay for padding every expert to the busiest one: worth it while that waste is < 2x
        if packed is not None and self.n_experts * max(counts) <= 2 * n * k:
            y = self._routed_batched(x, flat[order], tok, w, counts, packed)
        elif packed is not None:  # skewed or sparse load: one fused w1|w3 matmul per expert that got tokens
            y = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
            w13, w2 = packed
            f = w2.shape[2]
            limit = self.experts[0].limit
            a = 0
            for e, cnt in enumerate(counts):
                if cnt == 0:
                    continue
                t = tok[a:a + cnt]
                gu = F.linear(x[t], w13[e]).float()  # [cnt, 2F]
                g, u = gu[:, :f], gu[:, f:]
                if limit > 0:
                    g = g.clamp(max=limit)
                    u = u.clamp(-limit, limit)
                h = w[a:a + cnt, None] * (F.silu(g) * u)
                y.index_add_(0, t, F.linear(h.to(x.dtype), w2[e]).float())
                a += cnt
        elif torch.is_grad_enabled():  # training: per-expert gathers (the gradient accumulation order is kept)
            y = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
            a = 0
            for e, cnt in enumerate(counts):
                if cnt == 0:
                    continue
                t = tok[a:a + cnt]
                y.index_add_(0, t, Expert.forward(self.experts[e], x[t], w[a:a + cnt]).float())  # y: not a leaf
                a += cnt
        else:
            # one gather of the pairs' inputs and one index_add_ of all outputs (pairs in expert order, so each row
            # accumulates in the same order as one index_add_ per expert), contiguous slices per expert
            xs = x[tok]  # [N*k, D]
            outs = []
            a = 0
            for e, cnt in enumerate(counts):
                if cnt == 0:
                    continue
                outs.append(Expert.forward(self.experts[e], xs[a:a + cnt], w[a:a + cnt]))
                a += cnt
            y = torch.zeros(n, x.shape[1], dtype=torch.float32, device=x.device)
            y.index_add_(0, tok, torch.cat(outs).float())
        if self.shared_experts is not None:
            y = y + Expert.forward(self.shared_experts, x).float()
        return y.to(x.dtype)

    def _one_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Decode fast path for one token (no autograd): the same expert math and the same fp32 accumulation order
        (experts by ascending id, starting from zeros) as the general path, without the sort / bincount / gather /
        index_add bookkeeping and the per-expert module calls."""
        eids = ids[0].tolist()  # the one host sync (the general path has it too)
        w = weights[0]
        y = torch.zeros(1, x.shape[1], dtype=torch.float32, device=x.device)
        for j in sorted(range(len(eids)), key=eids.__getitem__):  # stable, like argsort(stable=True)
            y += Expert.forward(self.experts[eids[j]], x, w[j:j + 1])  # the general path's index_add_ on row 0
        if self.shared_experts is not None:
            y = y + Expert.forward(self.shared_experts, x).float()
        return y.to(x.dtype)

    # ------------------------------------------------------------------ packed FP4 experts
    _fp4: tuple[torch.Tensor, ...] | None = None  # (w1, s1, w3, s3, w2, s2) stacked over the experts

    @torch.no_grad()
    def hold_fp4(self, device: torch.device | str) -> None:
        """Allocate the routed experts' weights in the published FP4 layout, stacked: ``w1, w3 [E, F, D/2]`` int8
        with ue8m0 scales ``[E, F, D/32]``, ``w2 [E, D, F/2]`` with ``[E, D, F/32]``, and make every
        ``experts.{e}.w{1,2,3}.weight`` / ``.scale`` a view of its slice (same names as the checkpoint, one block of
        memory per tensor kind). The loader then fills the views in place; the contents start uninitialised."""
        if not self.can_stack_fp4():
            raise ValueError("stacked FP4 experts need dim and moe_intermediate_size to be multiples of 32")
        e0 = self.experts[0]
        f, d = e0.w1.out_features, e0.w1.in_features
        e = self.n_experts
        stacks = []
        for rows, cols in ((f, d), (f, d), (d, f)):
            stacks.append(torch.empty(e, rows, cols // 2, dtype=torch.int8, device=device))
            stacks.append(torch.empty(e, rows, cols // quant.FP4_BLOCK, dtype=torch.float8_e8m0fnu, device=device))
        for i, ex in enumerate(self.experts):
            for j, lin in enumerate((ex.w1, ex.w3, ex.w2)):
                lin.set_packed(stacks[2 * j][i], stacks[2 * j + 1][i])
        self._fp4 = tuple(stacks)

    def can_stack_fp4(self) -> bool:
        """Whole 1x32 scale blocks along both expert dims (every real config; tiny test configs may not have them,
        and then each expert keeps its own FP4 tensors and the per-expert path)."""
        e0 = self.experts[0]
        return e0.w1.in_features % quant.FP4_BLOCK == 0 and e0.w1.out_features % quant.FP4_BLOCK == 0

    def fp4_stacks(self) -> tuple[torch.Tensor, ...] | None:
        """The stacked FP4 expert tensors, or None when the experts are not held that way. Restacked (one copy) if
        the expert parameters were replaced since (e.g. ``load_state_dict(..., assign=True)``)."""
        if self._fp4 is None:
            return None
        first, last = self.experts[0], self.experts[-1]
        if (first.w1.weight.data_ptr() == self._fp4[0].data_ptr()
                and last.w2.scale is not None and last.w2.scale.data_ptr() == self._fp4[5][-1].data_ptr()):
            return self._fp4
        lins = [(ex.w1, ex.w3, ex.w2) for ex in self.experts]
        if not all(lin.scale is not None and quant.is_packed_fp4(lin.weight) for ls in lins for lin in ls):
            self._fp4 = None  # the experts were replaced by plain weights: the per-expert path applies
            return None
        stacks = []
        for j in range(3):
            stacks.append(torch.stack([ls[j].weight.view(torch.int8) for ls in lins]))
            stacks.append(torch.stack([ls[j].scale for ls in lins]))
        for i, ls in enumerate(lins):
            for j, lin in enumerate(ls):
                lin.set_packed(stacks[2 * j][i], stacks[2 * j + 1][i])
        self._fp4 = tuple(stacks)
        return self._fp4

    # ------------------------------------------------------------------ inference fast paths
    _packed: tuple[torch.Tensor, torch.Tensor] | None = None
    _native: kernels.ExpertWeights | None = None

    def use_native_kernels(self) -> None:
        """Run the experts (after the gate) as one native kernel call (dsv4/kernels; Transformer.use_native_kernels).
        The kernel reads the expert weights in place; call this again if they are replaced."""
        def lins(ex: Expert) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return ex.w1.weight, ex.w3.weight, ex.w2.weight

        shared = lins(self.shared_experts) if self.shared_experts is not None else None
        self._native = kernels.ExpertWeights([lins(ex) for ex in self.experts], shared, self.experts[0].limit)

    @torch.no_grad()
    def pack(self) -> None:
        """Move the routed experts' weights into two stacked tensors ``w13 [E, 2F, D]`` and ``w2 [E, D, F]`` and
        re-point every ``experts.{e}.w1/w2/w3.weight`` to a view of them (same memory, same names). Inference with
        many tokens then runs all experts as two batched matmuls instead of a Python loop over experts.

        NOTE: for inference only (autograd still uses the per-expert path, whose gradients land in the views);
        the views share storage, so clone before saving with safetensors.
        """
        if self._packed is not None:
            return
        e0 = self.experts[0]
        f, d = e0.w1.weight.shape
        w13 = torch.empty(self.n_experts, 2 * f, d, dtype=e0.w1.weight.dtype, device=e0.w1.weight.device)
        w2 = torch.empty(self.n_experts, d, f, dtype=e0.w2.weight.dtype, device=e0.w2.weight.device)
        for i, ex in enumerate(self.experts):
            w13[i, :f].copy_(ex.w1.weight)
            w13[i, f:].copy_(ex.w3.weight)
            w2[i].copy_(ex.w2.weight)
            ex.w1.weight = nn.Parameter(w13[i, :f], requires_grad=ex.w1.weight.requires_grad)
            ex.w3.weight = nn.Parameter(w13[i, f:], requires_grad=ex.w3.weight.requires_grad)
            ex.w2.weight = nn.Parameter(w2[i], requires_grad=ex.w2.weight.requires_grad)
        self._packed = (w13, w2)

    def _routed_batched(self, x: torch.Tensor, expert_of: torch.Tensor, tok: torch.Tensor, w: torch.Tensor,
                        counts: list[int], packed: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """All experts at once on a [E, cap, D] padded layout (pairs sorted by expert). Same math as Expert."""
        w13, w2 = packed
        f = w2.shape[2]
        cap = max(counts)
        counts_t = torch.tensor(counts, device=x.device)
        first = torch.cumsum(counts_t, 0) - counts_t  # [E] first sorted pair of each expert
        slot = torch.arange(tok.shape[0], device=x.device) - first[expert_of]  # rank of a pair inside its expert
        xs = x.new_zeros(self.n_experts, cap, x.shape[1])
        xs[expert_of, slot] = x[tok]
        ws = w.new_zeros(self.n_experts, cap)
        ws[expert_of, slot] = w
        gu = torch.bmm(xs, w13.transpose(1, 2))  # [E, cap, 2F]
        g, u = gu[..., :f].float(), gu[..., f:].float()
        limit = self.experts[0].limit
        if limit > 0:
            g = g.clamp(max=limit)
            u = u.clamp(-limit, limit)
        h = ws[..., None] * (F.silu(g) * u)  # routing weight before w2 (official)
        out = torch.bmm(h.to(x.dtype), w2.transpose(1, 2))  # [E, cap, D]
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        return y.index_add_(0, tok, out[expert_of, slot].float())
