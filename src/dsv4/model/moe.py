"""Mixture of experts of DeepSeek-V4 (architecture.md sec 9; report sec 2.1 and 4.2.3).

* Router (``Gate``): affinity ``s = sqrt(softplus(x W^T))`` in fp32; the first ``num_hash_layers`` layers pick
  experts by a fixed token-id table ``tid2eid``, the others by ``topk(s + bias)`` (the bias only steers selection,
  aux-loss-free balancing). Weights ``s[picked]`` normalised to sum 1, times ``routed_scaling_factor``.
* Experts: SwiGLU with clamping (gate branch ``min(g, limit)``, linear branch ``clamp(u, -limit, limit)``), the
  routing weight applied to the activation *before* ``w2`` (official), routed outputs accumulated in fp32, plus
  one always-on shared expert (also clamped).

Everything after the gate is one op, ``dsv4::routed_experts`` (dsv4/ops; the reference runs each expert only on
the tokens routed to it, the CPU backend one native call), for training and inference alike. Router top-k ties go to
the lowest expert id (``ops.topk_lowest``, the rule of every top-k in dsv4).
Deliberately not here: expert parallelism, the kernels themselves, the training-time balance loss and the bias
update (train/).

Shape legend: N tokens, D dim, E experts, k experts per token, F expert inner dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv4 import ops
from dsv4.config import ModelConfig
from dsv4.model import quant
from dsv4.model.linear import Linear
from dsv4.ops import packed
from dsv4.ops.reference import swiglu_expert


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
            ids = ops.topk_lowest(scores + self.bias.float(), self.topk)[1]
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
        """x [n, D] (routing weights [n] or None) -> [n, D]: the op's expert math (expert parallelism calls it)."""
        return swiglu_expert(x, self.w1.weight, self.w3.weight, self.w2.weight, self.limit, weights,
                             (self.w1.scale, self.w3.scale, self.w2.scale))


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

    def _lins(self) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
        """The experts' (w1, w3, w2) Linear modules (the modules, not their weights, are memoised)."""
        cached = self.__dict__.get("_lin_cache")
        if cached is None or cached[0] is not self.experts:
            cached = (self.experts, [(e.w1, e.w3, e.w2) for e in self.experts])
            self.__dict__["_lin_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> [N, D]."""
        weights, ids = self.gate(x, input_ids)  # [N, k]
        # the weight lists are read per call (no cached tensors or pointers: replaced weights are the ones used);
        # _parameters lookups, not nn.Module attribute access: 3E of them per layer and token batch
        lins = self._lins()
        w1, w3, w2 = ([lin[i]._parameters["weight"] for lin in lins] for i in range(3))
        sh = self.shared_experts
        shared = [sh.w1.weight, sh.w3.weight, sh.w2.weight] if sh is not None else []
        # packed (scaled) weights: one scale per weight (loader: the routed experts may be FP4 and the shared FP8)
        scales = [lin[i]._parameters["scale"] for i in range(3) for lin in lins] if lins[0][0].scale is not None \
            else []
        shared_scales = [lin.scale for lin in (sh.w1, sh.w3, sh.w2)] if sh is not None and sh.w1.scale is not None \
            else []
        y = ops.routed_experts(x, ids, weights, w1, w3, w2, scales, shared, shared_scales, self.experts[0].limit)
        return y.to(x.dtype)

    # ------------------------------------------------------------------ packed FP4 experts
    _fp4: tuple[torch.Tensor, ...] | None = None  # (w1, s1, w3, s3, w2, s2) stacked over the experts

    def can_stack_fp4(self) -> bool:
        """Whole 1x32 scale blocks along both expert dims (every real config; tiny test configs may not have them,
        and then each expert keeps its own FP4 tensors)."""
        e0 = self.experts[0]
        return e0.w1.in_features % quant.FP4_BLOCK == 0 and e0.w1.out_features % quant.FP4_BLOCK == 0

    @torch.no_grad()
    def hold_fp4(self, device: torch.device | str) -> None:
        """Allocate the routed experts' weights in the published FP4 layout, stacked: ``w1, w3 [E, F, D/2]`` int8
        with ue8m0 scales ``[E, F, D/32]``, ``w2 [E, D, F/2]`` with ``[E, D, F/32]``, and make every
        ``experts.{e}.w{1,2,3}.weight`` / ``.scale`` a view of its slice (the checkpoint's names, one block of memory
        per tensor kind, which the native experts kernel reads with one pointer). The loader then fills the views in
        place; the contents start uninitialised."""
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

    def fp4_stacks(self) -> tuple[torch.Tensor, ...] | None:
        """The stacked FP4 expert tensors while every expert parameter is still a view of them, else None (e.g. after
        ``load_state_dict(..., assign=True)``: the experts then run from their own tensors)."""
        if self._fp4 is None:
            return None
        lins = [(ex.w1, ex.w3, ex.w2) for ex in self.experts]
        for j in range(3):
            for i, tensors in ((2 * j, [ls[j].weight for ls in lins]), (2 * j + 1, [ls[j].scale for ls in lins])):
                if any(t is None for t in tensors):
                    return None
                whole = packed.stacked(tensors)
                if whole is None or whole.data_ptr() != self._fp4[i].data_ptr():
                    return None
        return self._fp4
