"""The DeepSeek-V4 model: embedding, mHC blocks, hc head, final norm and fp32 head (architecture.md sec 2-3).

``Transformer`` module attributes equal the official checkpoint keys (``embed``, ``layers.{L}``, ``norm``, ``head``,
``hc_head_fn/base/scale``, ``mtp.{i}``), so a published checkpoint loads without renaming. Build it on ``meta`` and
load, or call :meth:`Transformer.init_weights`. Parameters get the official dtypes: the ones the official code
keeps in fp32 (norm weights, mHC parameters, attention sinks, compressor projections and ``ape``, router bias, the
output head) stay fp32 whatever ``dtype`` is; all others use ``dtype``. Do not ``.to(dtype)`` a built model: that
would round the fp32 parameters.

Entry points:

* ``model(input_ids [B, S]) -> fp32 logits [B, S, vocab]``: no cache, every position;
* ``model.forward_batch(ForwardBatch, KVCache | None) -> ForwardOutput(logits [M, vocab], hidden [N, M, D])``:
  varlen batches of prefill chunks and decode tokens (docs/contracts.md);
* ``model.forward_mtp(ForwardBatch of the *next* tokens, hidden, cache)``: the MTP block (mtp.py);
* ``model.set_activation_dtype(dtype)``: compute in ``dtype`` while the matmul weights stay as stored (e.g. fp32
  activations over bf16 weights: what ``dsv4.LLM`` does for a checkpoint it loads onto a CPU).

The hot computations are dsv4/ops ops (``torch.library``), called unconditionally: which kernel runs is the op
layer's choice per device (docs/architecture.md sec 6), the model has one path for training and inference.

CPU note: this torch build's bf16 GEMV/GEMM kernels run 2-5x slower than fp32 on CPU, so a bf16 checkpoint decodes
faster there with fp32 activations (bf16 weights are exact in fp32).

Deliberately not here: sampling, scheduling, cache allocation policy, parallelism.

Shape legend: B sequences, S tokens each, N flat tokens, M = hc_mult streams, D = dim, V = vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4 import ops
from dsv4.config import ModelConfig
from dsv4.model.attention import Attention
from dsv4.model.batch import BatchPlan, ForwardBatch, ForwardOutput
from dsv4.model.cache import KVCache
from dsv4.model.hyper import hc_head
from dsv4.model.moe import MoE
from dsv4.model.norm import RMSNorm
from dsv4.model.qat import Numerics


class Block(nn.Module):
    """One layer: attention and MoE, each inside an mHC site (pre-norm inside the HC branch)."""

    def __init__(self, layer_id: int, config: ModelConfig, ratio: int, numerics: Numerics, dtype: torch.dtype
                 ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.config = config
        d, m = config.dim, config.hc_mult
        mix = (2 + m) * m
        self.attn = Attention(config, layer_id, ratio, numerics, dtype)
        self.ffn = MoE(config, layer_id, dtype)
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(d, config.rms_norm_eps)
        for site in ("attn", "ffn"):
            self.register_parameter(f"hc_{site}_fn", nn.Parameter(torch.zeros(mix, m * d, dtype=torch.float32)))
            self.register_parameter(f"hc_{site}_base", nn.Parameter(torch.zeros(mix, dtype=torch.float32)))
            self.register_parameter(f"hc_{site}_scale", nn.Parameter(torch.ones(3, dtype=torch.float32)))

    def _pre_norm(self, x: torch.Tensor, site: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hc_pre then the site's RMSNorm on its output (one op: the norm fuses into the mix)."""
        c = self.config
        norm = self.attn_norm if site == "attn" else self.ffn_norm
        return ops.hc_pre(x, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                          getattr(self, f"hc_{site}_scale"), norm.weight, c.hc_sinkhorn_iters, c.hc_eps,
                          c.rms_norm_eps, norm.eps)

    def forward(self, x: torch.Tensor, plan: BatchPlan, cache: KVCache | None, input_ids: torch.Tensor
                ) -> torch.Tensor:
        """x [N, M, D] -> [N, M, D]."""
        y, post, comb = self._pre_norm(x, "attn")
        x = ops.hc_post(self.attn(y, plan, cache), x, post, comb)
        y, post, comb = self._pre_norm(x, "ffn")
        return ops.hc_post(self.ffn(y, input_ids), x, post, comb)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, numerics: Numerics | None = None, dtype: torch.dtype | None = None,
                 qat_sim: bool | None = None) -> None:
        super().__init__()
        if numerics is None:
            numerics = Numerics(qat_sim=bool(qat_sim))
        elif qat_sim is not None:
            raise ValueError("pass either numerics=Numerics(...) or qat_sim=..., not both")
        dtype = dtype or torch.get_default_dtype()
        self.config, self.numerics, self.compute_dtype = config, numerics, dtype
        d, m = config.dim, config.hc_mult
        self.embed = nn.Embedding(config.vocab_size, d, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, config, r, numerics, dtype) for i, r in enumerate(config.layer_ratios))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False, dtype=torch.float32)  # fp32 logits (official)
        self.hc_head_fn = nn.Parameter(torch.zeros(m, m * d, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.zeros(m, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        from dsv4.model.mtp import MTPBlock  # mtp.py subclasses Block

        self.mtp = nn.ModuleList(MTPBlock(config.n_layers + i, config, numerics, dtype)
                                 for i in range(config.n_mtp_layers))

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S] -> fp32 logits [B, S, V] at every position; no cache."""
        if input_ids.dim() != 2:
            raise ValueError(f"Transformer.forward expects input_ids [B, S], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        batch = ForwardBatch.from_sequences(list(input_ids.to(self.device)))
        return self.forward_batch(batch, None).logits.view(b, s, -1)

    def forward_batch(self, batch: ForwardBatch, cache: KVCache | None = None) -> ForwardOutput:
        """One varlen step (docs/contracts.md). With ``cache=None`` the forward is pure and differentiable."""
        if cache is not None:
            _check_cache(self.config, cache, batch)
        plan = BatchPlan(batch, self.device, cache is not None)
        x = self.embed(plan.input_ids)  # [N, D]
        x = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1)  # [N, M, D] identical streams
        for layer in self.layers:
            x = layer(x, plan, cache, plan.input_ids)
        return ForwardOutput(self.logits(x, batch.logits_indices), x)

    def logits(self, hidden: torch.Tensor, indices: torch.Tensor | None = None,
               hc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               norm: RMSNorm | None = None) -> torch.Tensor:
        """mHC streams [N, M, D] -> fp32 logits [M', V] for the selected rows (hc head, final norm, fp32 head)."""
        if indices is not None:
            hidden = hidden[indices.to(hidden.device)]
        fn, base, scale = hc if hc is not None else (self.hc_head_fn, self.hc_head_base, self.hc_head_scale)
        c = self.config
        y = (norm or self.norm)(hc_head(hidden, fn, base, scale, c.hc_eps, c.rms_norm_eps))  # [M', D]
        return ops.linear(y.float(), self.head.weight, getattr(self.head, "scale", None))

    def forward_mtp(self, batch: ForwardBatch, hidden: torch.Tensor, cache: KVCache | None = None, depth: int = 0
                    ) -> ForwardOutput:
        """MTP block ``depth``: ``batch`` holds, at each position t, the *next* token t+1 (same positions, slots and
        block tables as the main step); ``hidden`` [N, M, D] is the main model's output streams. Returns the draft
        logits for token t+2 and the MTP block's streams."""
        if not self.mtp:
            raise ValueError("this model has no MTP block (num_nextn_predict_layers = 0)")
        if cache is not None:
            _check_cache(self.config, cache, batch)
            if len(cache.window) <= self.config.n_layers + depth:
                raise ValueError("this KVCache has no MTP window; build it with KVCache(..., mtp=True)")
        plan = BatchPlan(batch, self.device, cache is not None)
        return self.mtp[depth](hidden, plan, cache, self, batch.logits_indices)

    def has_packed_weights(self) -> bool:
        """True when some projection holds a packed FP8/FP4 weight (load_model's ``weights``)."""
        return any(getattr(m, "scale", None) is not None for m in self.modules() if isinstance(m, nn.Linear))

    def stack_experts(self) -> Transformer:
        """Hold every MoE's routed experts in one block per weight kind (MoE.stack_experts), layer by layer."""
        for mod in self.modules():
            if isinstance(mod, MoE):
                mod.stack_experts()
        return self

    @torch.no_grad()
    def set_activation_dtype(self, dtype: torch.dtype) -> Transformer:
        """Compute in a wider ``dtype`` from now on, in place: every narrower floating parameter (bf16 / fp16) is
        widened to ``dtype`` (exact) except the matmul weights the ops read in their stored dtype (experts, attention
        projections), which stay as they are; fp32 parameters stay fp32. The activations follow the embedding, and
        the KV cache an engine builds afterwards takes their dtype."""
        kept = {id(self.head.weight)}
        for mod in self.modules():
            if isinstance(mod, MoE):
                for ex in [*mod.experts, *([mod.shared_experts] if mod.shared_experts is not None else [])]:
                    kept.update(id(lin.weight) for lin in (ex.w1, ex.w2, ex.w3))
            elif isinstance(mod, Attention):
                kept.update(id(lin.weight) for lin in (mod.wq_a, mod.wq_b, mod.wkv, mod.wo_a, mod.wo_b))
        for p in self.parameters():
            # packed weights and their ue8m0 scales (1-byte floats) are never converted
            if (p.is_floating_point() and p.element_size() >= 2 and p.dtype != dtype and id(p) not in kept
                    and p.dtype != torch.float32):
                p.data = p.data.to(dtype)
        self.compute_dtype = dtype
        return self

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> Transformer:
        """Random init for tests, benchmarks and training from scratch (materialises a meta-built model)."""
        if self.device.type == "meta":
            self.to_empty(device="cpu")
        g = torch.Generator(device="cpu").manual_seed(seed)
        std = self.config.initializer_range

        def normal_(t: torch.Tensor, s: float) -> None:
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32) * s)

        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf.endswith("_scale"):  # hc_*_scale: gating factors start at 1 (transformers' init)
                p.fill_(1.0)
            elif leaf.endswith("_base") or leaf in ("attn_sink", "ape", "bias"):
                p.zero_()
            else:  # projections, embedding, head, hc_*_fn
                normal_(p, std)
        for name, buf in self.named_buffers():
            if name.endswith("tid2eid"):
                # a random valid assignment: k distinct experts per token id
                e = self.config.n_routed_experts
                buf.copy_(torch.rand(buf.shape[0], e, generator=g).argsort(dim=-1)[:, : buf.shape[1]])
        return self


def _check_cache(config: ModelConfig, cache: KVCache, batch: ForwardBatch) -> None:
    """Cheap host-side checks that turn silent cache corruption into errors."""
    if cache.config is not config and cache.config != config:
        raise ValueError("KVCache was built for a different ModelConfig than this model")
    batch.validate(with_cache=True)
    bad = [s for s in batch.slots if not 0 <= s < cache.num_slots]
    if bad:
        raise ValueError(f"ForwardBatch slots {bad} are outside the KVCache's {cache.num_slots} slots")
    if not config.compressed_ratios:
        return  # sliding-window-only model: no paged entries
    # every page that will hold an entry of this step must be assigned (a -1 would alias page 0)
    bt = batch.block_tables
    ends_list = [s + n for s, n in zip(batch.start_pos, batch.seq_lens)]
    most = -(-max(ends_list) // cache.page_size)  # host ints: no sync (and no graph break under torch.compile)
    if most > bt.shape[1]:
        raise ValueError(f"block_tables has {bt.shape[1]} columns but a sequence reaches position "
                         f"{max(ends_list) - 1}, which needs {most} pages of {cache.page_size} tokens")
    ends = torch.tensor(ends_list, device=bt.device)
    need = (ends + cache.page_size - 1) // cache.page_size  # [B] pages covering positions < end
    # NOTE: reads the block table's values: the one remaining graph break of a compiled step
    cols = torch.arange(bt.shape[1], device=bt.device)
    missing = (cols[None] < need[:, None]) & ((bt < 0) | (bt >= cache.num_pages))
    if bool(missing.any()):
        b = int(missing.any(dim=1).nonzero()[0])
        raise ValueError(f"sequence {b} of the batch needs pages 0..{int(need[b]) - 1} in its block table row, but "
                         f"some are -1 or >= num_pages={cache.num_pages}: {bt[b, : int(need[b])].tolist()}")
