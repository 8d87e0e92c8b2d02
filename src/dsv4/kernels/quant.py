"""Native CPU backend of the ops on packed weights (``ops/packed.py``): ctypes wrappers of ``quant_kernels.c``.

* :func:`linear` ``(x, weight, scale)``: x @ W^T for an FP8 e4m3 weight with ue8m0 128x128 scales, or an FP4 e2m1
  weight (int8, two per byte) with ue8m0 1x32 scales -> fp32;
* :func:`experts` ``(x, ids, weights, w1, s1, w3, s3, w2, s2, limit)``: the routed experts on stacked FP4 weights
  (``MoE.fp4_stacks``) -> fp32, summed per token in ascending expert id like the reference.

The C file is compiled with the other kernel sources by ``dsv4/kernels/build.py`` (one library per ISA, AVX-512
or AVX2, picked from the CPU flags; file lock, cached failures). ``DSV4_NATIVE_KERNELS=0`` disables it;
:func:`why_unavailable` says why it is off. Not here: the build, when the model uses it (``dsv4.ops``).

Shape legend: M rows, K in-features, N out-features, T tokens, k experts per token, E experts, D dim, F expert dim.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from dsv4.kernels import build
from dsv4.model import quant

_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
SIGNATURES = {
    "dsv4_quant_isa": ([], _C),
    "dsv4_quant_set_sgemm": ([_P], None),
    "dsv4_qlinear": ([_P, _I, _I, _P, _P, _C, _I, _P, _C], None),
    "dsv4_qexperts": ([_P, _I, _I, _I, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _F, _P, _C], _C),
}
_FP8, _FP4 = 0, 1

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_errors: dict[str, str] = {}
_forced: list[str] = []  # use_isa stack
_default: list[ctypes.CDLL] = []  # the library picked for this CPU, once resolved


def supported_isas() -> list[str]:
    """The ISA builds this CPU can execute, best first (build.py's)."""
    return build.supported_isas()


def _torch_sgemm() -> int | None:
    if os.environ.get("DSV4_KERNEL_BLAS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return ctypes.cast(lib.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _load(isa: str) -> ctypes.CDLL:
    lib = build.load(isa)
    for name, (args, res) in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    lib.dsv4_quant_set_sgemm(_torch_sgemm())
    return lib


def library(isa: str | None = None) -> ctypes.CDLL | None:
    """The library for ``isa`` (default: the best this CPU runs, or the one :func:`use_isa` chose), or None."""
    if isa is None and not _forced and _default:  # the per-call fast path
        return _default[0]
    if os.environ.get("DSV4_NATIVE_KERNELS", "1") == "0":
        _errors["*"] = "disabled by DSV4_NATIVE_KERNELS=0"
        return None
    names = [isa] if isa else (_forced[-1:] or supported_isas())
    if not names:
        _errors["*"] = "this CPU has neither AVX-512 (F/BW/DQ/VL) nor AVX2 + FMA + F16C"
        return None
    with _lock:
        for name in names:
            if name in _libs:
                if isa is None and not _forced and not _default:
                    _default.append(_libs[name])
                return _libs[name]
            if name in _errors:
                continue
            try:
                _libs[name] = _load(name)
                if isa is None and not _forced:
                    _default.append(_libs[name])
                return _libs[name]
            except (RuntimeError, OSError, AttributeError) as e:
                _errors[name] = str(e)
    return None


def available() -> bool:
    return library() is not None


def why_unavailable() -> str | None:
    if available():
        return None
    return "; ".join(f"{k}: {v}" for k, v in _errors.items()) or "unknown"


@contextlib.contextmanager
def use_isa(isa: str) -> Iterator[ctypes.CDLL]:
    """Make the wrappers call the ``isa`` build inside the block (tests run every build the CPU can execute)."""
    lib = library(isa)
    if lib is None:
        raise RuntimeError(f"the {isa} build of the packed-weight kernels is unavailable: {_errors.get(isa)}")
    _forced.append(isa)
    try:
        yield lib
    finally:
        _forced.pop()


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"dsv4 packed-weight kernels are unavailable: {why_unavailable()}")
    return lib


def _format(weight: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    """(format code, in-features) after checking the layout the C code reads."""
    if weight.device.type != "cpu" or not weight.is_contiguous() or not scale.is_contiguous() or weight.dim() != 2:
        raise ValueError(f"the native packed linear takes contiguous 2-D CPU weights and scales, got "
                         f"{tuple(weight.shape)} on {weight.device}")
    if quant.is_fp8(weight):
        fmt, k = _FP8, weight.shape[1]
        want = quant.fp8_scale_shape(weight.shape)
    elif quant.is_packed_fp4(weight):
        fmt, k = _FP4, 2 * weight.shape[1]
        want = quant.fp4_scale_shape(weight.shape)
    else:
        raise ValueError(f"the native packed linear takes FP8 or packed FP4 weights, got {weight.dtype}")
    if tuple(scale.shape) != want or scale.element_size() != 1:
        raise ValueError(f"weight {tuple(weight.shape)} needs a ue8m0 scale of shape {want}, got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    return fmt, k


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ W^T -> fp32 [..., N] for a packed W (see the module docstring)."""
    lib = _lib()
    fmt, k = _format(weight, scale)
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} features, the weight expects {k}")
    n = weight.shape[0]
    xf = x.reshape(-1, k).float().contiguous()
    y = torch.empty(xf.shape[0], n, dtype=torch.float32)
    lib.dsv4_qlinear(xf.data_ptr(), xf.shape[0], k, weight.data_ptr(), scale.data_ptr(), fmt, n, y.data_ptr(),
                     torch.get_num_threads())
    return y.view(*x.shape[:-1], n)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, s1: torch.Tensor,
            w3: torch.Tensor, s3: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor, limit: float) -> torch.Tensor:
    """Routed experts on stacked FP4 weights: x [T, D], ids [T, k], routing weights [T, k] -> fp32 [T, D]."""
    lib = _lib()
    e, f, half_d = w1.shape
    d = 2 * half_d
    stacks = (w1, s1, w3, s3, w2, s2)
    if not all(t.is_contiguous() and t.device.type == "cpu" and t.element_size() == 1 for t in stacks) or \
            not quant.is_packed_fp4(w1) or w2.shape != (e, d, f // 2) or s1.shape != (e, f, d // quant.FP4_BLOCK):
        raise ValueError(f"experts: stacked FP4 weights w1/w3 [E, F, D/2], w2 [E, D, F/2] with ue8m0 scales are "
                         f"required, got w1 {tuple(w1.shape)} {w1.dtype}, w2 {tuple(w2.shape)}, s1 {tuple(s1.shape)}")
    xf = x.float().contiguous()
    if xf.shape[-1] != d:
        raise ValueError(f"experts: x has dim {xf.shape[-1]}, the experts {d}")
    ids = ids.to(torch.int64).contiguous()
    rw = weights.float().contiguous()
    t = xf.shape[0]
    y = torch.empty(t, d, dtype=torch.float32)
    rc = lib.dsv4_qexperts(xf.data_ptr(), t, d, f, ids.data_ptr(), rw.data_ptr(), ids.shape[1], e,
                           w1.data_ptr(), s1.data_ptr(), w3.data_ptr(), s3.data_ptr(), w2.data_ptr(), s2.data_ptr(),
                           float(limit), y.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"experts: expert ids must lie in [0, {e})")
    return y
