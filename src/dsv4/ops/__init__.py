"""The op layer: every hot computation of the model as one ``torch.library`` op, ``dsv4::<name>``.

Each op is defined once here: its schema (the signature of the function below), a fake (meta) kernel for tracing and
``torch.compile``, an autograd formula, and its plain-PyTorch reference (ops/reference.py) as the default kernel of
every device. Backends register a kernel for their dispatch key: ops/cpu.py registers the native CPU kernels
(dsv4/kernels) for ``"cpu"``; a CUDA or NPU backend registers for ``"cuda"`` / ``"npu"``/``"privateuseone"`` the
same way (docs/architecture.md sec 6 "How to add a backend"). The model calls these functions unconditionally, for
training and inference alike; it never imports a backend.

Ops (signatures: the functions below; the table with the reference and CPU kernel of each: docs/architecture.md
sec 6): ``linear``, ``routed_experts``, ``hc_pre`` (+ the sub-layer's RMSNorm), ``hc_post``, ``attention_in``,
``attention_out``, ``sparse_attention``, ``indexer_topk``, ``argmax``, ``compressor_decode`` (in place: a decode
token's compressor state and entry page; no gradient, cache writes are inference-only).

**Choosing among registered kernels.** A device's kernel is the one registered for its key; where a backend offers
an opt-in choice it reads :data:`BACKENDS`, the one table of such choices (``{"cpu": "native"}``: the native CPU
kernels when they load here, else the reference, with the reason logged once). :func:`use_backend` overrides it for
the calling context (a ``contextvars`` scope: threads and engines do not leak choices into each other).

**Adding a dtype** (e.g. FP8 block-scaled weights for ``linear``): add a branch for the new ``weight.dtype`` /
``scale`` to the reference function (reference.py) and, where a backend computes on it natively, to that backend's
kernel; the schema, the fake kernel and the model stay as they are. Unhandled dtypes raise a TypeError that names
the op and the dtype.

Autograd: ``linear`` has its formula; the other ops are differentiated by recomputing their reference under autograd
in the backward (memory of one op's activations at a time, like activation checkpointing), so training runs the
same ops as inference. ``argmax`` and ``indexer_topk`` return integers and have no gradient.

Deliberately not here: the kernels (dsv4/kernels, built by its own loader), caches and their writes (model/).

Shape legend: see reference.py.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

from dsv4.ops import packed
from dsv4.ops import reference as ref

# Opt-in choices per device type: "native" = the native kernels where they load (reason logged otherwise),
# "reference" = the plain-PyTorch reference. Devices not listed run their registered kernel (reference by default).
BACKENDS: dict[str, str] = {"cpu": "native"}
_CHOICES = {"cpu": ("native", "reference")}
_override: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("dsv4_ops_backend", default=None)


def backend(device_type: str) -> str:
    """The choice in effect for ``device_type`` in this context ("native" / "reference", or "reference" for
    devices without choices)."""
    o = _override.get()
    if o is not None and device_type in o:
        return o[device_type]
    return BACKENDS.get(device_type, "reference")


@contextlib.contextmanager
def use_backend(device_type: str, name: str | None) -> Iterator[None]:
    """Run the block with backend ``name`` for ``device_type`` (None: keep the table's choice)."""
    if name is None:
        yield
        return
    if name not in _CHOICES.get(device_type, ("reference",)):
        raise ValueError(f"unknown backend {name!r} for {device_type}: choose one of "
                         f"{_CHOICES.get(device_type, ('reference',))}")
    token = _override.set({**(_override.get() or {}), device_type: name})
    try:
        yield
    finally:
        _override.reset(token)


# ---------------------------------------------------------------------------------------------------- autograd
def _float_leaves(args: tuple) -> list[tuple[int, int | None, torch.Tensor]]:
    """(arg index, list index or None, tensor) of every floating tensor input that requires grad."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if a.requires_grad and a.is_floating_point():
                out.append((i, None, a))
        elif isinstance(a, (list, tuple)):
            out.extend((i, j, t) for j, t in enumerate(a)
                       if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point())
    return out


def _recompute_autograd(op, fn) -> None:
    """Register a backward that recomputes ``fn`` (the reference) under autograd and differentiates it."""

    def setup_context(ctx, inputs, output) -> None:
        leaves = _float_leaves(inputs)
        ctx.where = [(i, j) for i, j, _ in leaves]
        # every tensor input is saved (the recomputation needs them all), lists flattened
        flat, spec = [], []
        for a in inputs:
            if isinstance(a, torch.Tensor):
                flat.append(a)
                spec.append(("t", None))
            elif isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
                spec.append(("l", [t is not None for t in a]))
                flat.extend(t for t in a if t is not None)
            else:
                spec.append(("v", a))
        ctx.save_for_backward(*flat)
        ctx.spec = spec

    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        args = []
        for kind, v in ctx.spec:
            if kind == "t":
                args.append(next(saved))
            elif kind == "l":
                args.append([next(saved) if present else None for present in v])
            else:
                args.append(v)
        where = set(ctx.where)
        with torch.enable_grad():
            leaves = []
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and (i, None) in where:
                    args[i] = a.detach().requires_grad_(True)
                    leaves.append(args[i])
                elif isinstance(a, list):
                    for j, t in enumerate(a):
                        if (i, j) in where:
                            a[j] = t.detach().requires_grad_(True)
                            leaves.append(a[j])
            out = fn(*args)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True) \
                if pairs and leaves else [None] * len(leaves)
        result: list = [None if not isinstance(a, list) else [None] * len(a) for a in args]
        for (i, j), g in zip(ctx.where, got):
            if j is None:
                result[i] = g
            else:
                result[i][j] = g
        return tuple(result)

    torch.library.register_autograd(op, backward, setup_context=setup_context, lib=_LIB)


# ---------------------------------------------------------------------------------------------------- the ops
# NOTE: the ops are defined with torch.library's define + impl, not ``torch.library.custom_op``: custom_op wraps every
# call of a kernel in Python layers of its own (a dynamo-disable wrapper, an aliasing check, and for a mutating op a
# version-bump kernel whose argument handling, torch._library.utils.fill_defaults, took about 0.15 ms a call), at
# ~90 op calls per decode step of the benchmark model. The schema is still inferred from the function's annotations
# (torch.library.infer_schema); fake kernels and autograd formulas register the same way.
_LIB = torch.library.Library("dsv4", "FRAGMENT")


def _define(fn, mutates_args: tuple[str, ...] = ()) -> torch._ops.OpOverload:
    """Define ``dsv4::<fn name without its leading _>`` from ``fn``'s annotations, with ``fn`` (the reference) as
    the kernel of every device; backends override it per dispatch key (ops/cpu.py)."""
    name = fn.__name__.lstrip("_")
    _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    return getattr(torch.ops.dsv4, name).default


def _linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return ref.linear(x, weight, scale)


_linear = _define(_linear)


@torch.library.register_fake("dsv4::linear", lib=_LIB)
def _(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output) -> None:
    x, weight, scale = inputs
    ctx.save_for_backward(x, weight, scale)
    ctx.w_grad = weight.requires_grad


def _linear_backward(ctx, g):
    x, weight, scale = ctx.saved_tensors
    # a packed weight (scale given) is a constant: only x gets a gradient, through the weight dequantised in chunks
    if scale is not None:
        return (packed.grad_input(g, weight, scale) if ctx.needs_input_grad[0] else None), None, None
    gx = (g @ weight.to(g.dtype)) if ctx.needs_input_grad[0] else None
    gw = (g.flatten(0, -2).t() @ x.flatten(0, -2).to(g.dtype)).to(weight.dtype) if ctx.w_grad else None
    return gx, gw, None


torch.library.register_autograd(_linear, _linear_backward, setup_context=_linear_setup, lib=_LIB)


def _routed_experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor, scales: list[torch.Tensor], shared: list[torch.Tensor],
                    shared_scales: list[torch.Tensor | None], limit: float) -> torch.Tensor:
    return ref.routed_experts(x, ids, weights, w1, w3, w2, scales, shared, shared_scales, limit)


_routed_experts = _define(_routed_experts)


@torch.library.register_fake("dsv4::routed_experts", lib=_LIB)
def _(x, ids, weights, w1, w3, w2, scales, shared, shared_scales, limit):
    return x.new_empty(x.shape, dtype=torch.float32)


def _routed_experts_backward(grad: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                             w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, scales: list[torch.Tensor],
                             shared: list[torch.Tensor], shared_scales: list[torch.Tensor | None], limit: float
                             ) -> list[torch.Tensor]:
    """Gradients [x, weights, w1, w3, w2, *shared] of routed_experts (zero rows for experts no token reached);
    packed (scaled) weights are constants and get none: w1, w3, w2 are left out when ``scales`` is given, ``shared``
    when ``shared_scales`` is. An op of its own: the recomputation syncs on the per-expert counts, which a traced
    backward cannot."""
    routed_const, shared_const = bool(scales), bool(shared_scales)

    # torch.func.vjp: a kernel of an op runs below autograd, where torch.autograd would record nothing
    def fn(x_, weights_, routed_, shared_):
        r1, r3, r2 = (w1, w3, w2) if routed_const else routed_
        return ref.routed_experts(x_, ids, weights_, r1, r3, r2, scales, shared if shared_const else shared_,
                                  shared_scales, limit)

    routed = [] if routed_const else [w1, w3, w2]
    _, vjp = torch.func.vjp(fn, x, weights, routed, [] if shared_const else list(shared))
    gx, gw, gr, gs = vjp(grad)
    return [gx, gw, *gr, *gs]


_routed_experts_backward = _define(_routed_experts_backward)


@torch.library.register_fake("dsv4::routed_experts_backward", lib=_LIB)
def _(grad, x, ids, weights, w1, w3, w2, scales, shared, shared_scales, limit):
    routed = [] if scales else [w1, w3, w2]
    return [torch.empty_like(t) for t in (x, weights, *routed, *([] if shared_scales else shared))]


def _experts_setup(ctx, inputs, output) -> None:
    x, ids, weights, w1, w3, w2, scales, shared, shared_scales, limit = inputs
    ctx.save_for_backward(x, ids, weights, w1, w3, w2, *shared, *scales, *shared_scales)
    ctx.n_shared, ctx.n_scales, ctx.n_shared_scales, ctx.limit = len(shared), len(scales), len(shared_scales), limit


def _experts_backward(ctx, grad):
    x, ids, weights, w1, w3, w2, *ws = ctx.saved_tensors
    ns, nsc = ctx.n_shared, ctx.n_scales
    shared, scales, shared_scales = ws[:ns], ws[ns:ns + nsc], ws[ns + nsc:]
    g = _routed_experts_backward(grad, x, ids, weights, w1, w3, w2, scales, shared, shared_scales, ctx.limit)
    gx, gw, rest = g[0], g[1], g[2:]
    if scales:  # packed routed experts: constants
        g1 = g3 = g2 = None
    else:
        (g1, g3, g2), rest = rest[:3], rest[3:]
    gs = [None] * ns if shared_scales else rest
    return gx, None, gw, g1, g3, g2, [None] * nsc, gs, [None] * ctx.n_shared_scales, None


torch.library.register_autograd(_routed_experts, _experts_backward, setup_context=_experts_setup, lib=_LIB)


def _hc_pre(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, norm_weight: torch.Tensor,
            sinkhorn_iters: int, hc_eps: float, norm_eps: float, out_eps: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ref.hc_pre(x, fn, base, scale, norm_weight, sinkhorn_iters, hc_eps, norm_eps, out_eps)


_hc_pre = _define(_hc_pre)


@torch.library.register_fake("dsv4::hc_pre", lib=_LIB)
def _(x, fn, base, scale, norm_weight, sinkhorn_iters, hc_eps, norm_eps, out_eps):
    n, m, d = x.shape
    return (x.new_empty((n, d)), x.new_empty((n, m), dtype=torch.float32),
            x.new_empty((n, m, m), dtype=torch.float32))


_recompute_autograd(_hc_pre, ref.hc_pre)


def _hc_post(f: torch.Tensor, res: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    return ref.hc_post(f, res, post, comb)


_hc_post = _define(_hc_post)


@torch.library.register_fake("dsv4::hc_post", lib=_LIB)
def _(f, res, post, comb):
    return torch.empty_like(res)


_recompute_autograd(_hc_post, ref.hc_post)


def _attention_in(x: torch.Tensor, wq_a: torch.Tensor, wq_a_scale: torch.Tensor | None, q_norm: torch.Tensor,
                  wq_b: torch.Tensor, wq_b_scale: torch.Tensor | None, wkv: torch.Tensor,
                  wkv_scale: torch.Tensor | None, kv_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  n_heads: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ref.attention_in(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, wkv, wkv_scale, kv_norm, cos, sin,
                            n_heads, eps)


_attention_in = _define(_attention_in)


@torch.library.register_fake("dsv4::attention_in", lib=_LIB)
def _(x, wq_a, wq_a_scale, q_norm, wq_b, wq_b_scale, wkv, wkv_scale, kv_norm, cos, sin, n_heads, eps):
    t = x.shape[0]
    return (x.new_empty((t, wq_a.shape[0])), x.new_empty((t, n_heads, wq_b.shape[0] // n_heads)),
            x.new_empty((t, wkv.shape[0])))


_recompute_autograd(_attention_in, ref.attention_in)


def _attention_out(o: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, wo_a: torch.Tensor,
                   wo_a_scale: torch.Tensor | None, groups: int, wo_b: torch.Tensor, wo_b_scale: torch.Tensor | None
                   ) -> torch.Tensor:
    return ref.attention_out(o, cos, sin, wo_a, wo_a_scale, groups, wo_b, wo_b_scale)


_attention_out = _define(_attention_out)


@torch.library.register_fake("dsv4::attention_out", lib=_LIB)
def _(o, cos, sin, wo_a, wo_a_scale, groups, wo_b, wo_b_scale):
    return o.new_empty((o.shape[0], wo_b.shape[0]))


_recompute_autograd(_attention_out, ref.attention_out)


def _sparse_attention(q: torch.Tensor, kv: torch.Tensor, start: torch.Tensor, lens: torch.Tensor,
                      ring: torch.Tensor, slots: torch.Tensor, entries: torch.Tensor | None,
                      block_tables: torch.Tensor | None, ratio: int, n_entries: int, topk: torch.Tensor | None,
                      sink: torch.Tensor, scale: float) -> torch.Tensor:
    return ref.sparse_attention(q, kv, start, lens, ring, slots, entries, block_tables, ratio, n_entries, topk,
                                sink, scale)


_sparse_attention = _define(_sparse_attention)


@torch.library.register_fake("dsv4::sparse_attention", lib=_LIB)
def _(q, kv, start, lens, ring, slots, entries, block_tables, ratio, n_entries, topk, sink, scale):
    return torch.empty_like(q)


_recompute_autograd(_sparse_attention, ref.sparse_attention)


def _indexer_topk(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, block_tables: torch.Tensor, ratio: int,
                  visible: torch.Tensor, n_entries: int, k: int) -> torch.Tensor:
    return ref.indexer_topk(q, w, keys, block_tables, ratio, visible, n_entries, k)


_indexer_topk = _define(_indexer_topk)


@torch.library.register_fake("dsv4::indexer_topk", lib=_LIB)
def _(q, w, keys, block_tables, ratio, visible, n_entries, k):
    return q.new_empty((q.shape[0], q.shape[1], k), dtype=torch.long)


def _compressor_decode(x: torch.Tensor, wkv: torch.Tensor, wgate: torch.Tensor, ape: torch.Tensor,
                       norm_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, state: torch.Tensor,
                       pages: torch.Tensor, ratio: int, overlap: bool) -> None:
    ref.compressor_decode(x, wkv, wgate, ape, norm_weight, eps, cos, sin, positions, slots, block_tables, state,
                          pages, ratio, overlap)


# the caches it writes never take part in autograd; the schema declares the mutation (Tensor(a!)) for tracing
_compressor_decode = _define(_compressor_decode, mutates_args=("state", "pages"))


@torch.library.register_fake("dsv4::compressor_decode", lib=_LIB)
def _(x, wkv, wgate, ape, norm_weight, eps, cos, sin, positions, slots, block_tables, state, pages, ratio, overlap):
    return None


def _argmax(x: torch.Tensor) -> torch.Tensor:
    return ref.argmax(x)


_argmax = _define(_argmax)


@torch.library.register_fake("dsv4::argmax", lib=_LIB)
def _(x):
    return x.new_empty(x.shape[:-1], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- public API
# The functions the model calls: the ops themselves (schema-checked, dispatched by device).
linear = _linear
routed_experts = _routed_experts
hc_pre = _hc_pre
hc_post = _hc_post
attention_in = _attention_in
attention_out = _attention_out
sparse_attention = _sparse_attention
indexer_topk = _indexer_topk
argmax = _argmax
compressor_decode = _compressor_decode
topk_lowest = ref.topk_lowest  # not an op: the tie rule, shared by the router and the reference indexer

OPS = {"linear": linear, "routed_experts": routed_experts, "hc_pre": hc_pre, "hc_post": hc_post,
       "attention_in": attention_in, "attention_out": attention_out, "sparse_attention": sparse_attention,
       "indexer_topk": indexer_topk, "argmax": argmax, "compressor_decode": compressor_decode}

from dsv4.ops import cpu as _cpu  # noqa: E402,F401  registers the CPU backend's kernels
