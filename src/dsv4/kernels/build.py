"""Build and load of the native CPU kernels: every ``*.c`` in this folder compiled into one shared library per ISA,
once per machine, and the library this CPU runs picked at load.

ISA builds (``ISAS``, best first): ``avx512`` (AVX-512 F/BW/DQ/VL + AVX2/FMA/F16C) and ``avx2`` (AVX2 + FMA + F16C).
The C sources pick their vector layer from the compiler's ISA macros (``simd.h``), so one source serves both. At the
first use the best ISA that the CPU flags allow (``/proc/cpuinfo``, else torch's CPU capability) is built and
loaded; ``DSV4_KERNEL_ISA=avx512|avx2`` forces one (refused, with the reason, when this CPU cannot run it).

The build (``cc -O3 -fopenmp`` + the ISA flags; about 2 s) goes to ``$DSV4_KERNEL_CACHE`` (default
``~/.cache/dsv4/kernels``), keyed by the sources, the compiler (path and version) and the flags. It runs under a
file lock, so of many processes and threads starting together one compiles and the others wait and load its result.
A failed compile is cached next to it (``*.failed``, same key, holding the compiler's message): later processes
report that reason instead of recompiling every time; a changed source, compiler or flag set is a new key and builds
again, and ``DSV4_KERNEL_REBUILD=1`` (or deleting the ``.failed`` file) retries the same one.

Not here: the Python wrappers around the C functions (``dsv4/kernels/__init__.py``) and any choice of when the model
uses them. ``SIGNATURES`` lists the exported C functions with their ctypes argument types: a new C function is
declared there.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: builders still never see a half-written library (atomic rename), only no lock
    fcntl = None

_DIR = Path(__file__).parent
_COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-Wl,-Bsymbolic")  # Bsymbolic: two ISA builds in one process


@dataclass(frozen=True)
class Isa:
    name: str
    flags: tuple[str, ...]  # compiler flags that enable it
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags a CPU needs to run the build
    torch_capability: tuple[str, ...]  # torch.backends.cpu.get_cpu_capability() values that imply it


ISAS = (
    Isa("avx512", ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma", "-mf16c"),
        ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"), ("AVX512",)),
    Isa("avx2", ("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c"), ("AVX512", "AVX2")),
)
_BY_NAME = {i.name: i for i in ISAS}

_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# Exported C functions -> ctypes argument types (restype None unless listed in _RETURNS_INT). Dtype codes (int):
# 0 = fp32, 1 = bf16.
SIGNATURES = {
    "dsv4_set_sgemm": [_P],
    "dsv4_isa": [],
    "dsv4_linear": [_P, _I, _I, _P, _C, _I, _P, _C],
    "dsv4_moe": [_P, _I, _I, _I, _I, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _C, _F, _P, _C],
    "dsv4_chunk_attn": [_P, _P, _I, _I, _I, _I, _P, _P, _P, _C, _I, _P, _P, _C, _P, _I, _P, _F, _P, _C],
    "dsv4_attn_in": [_P, _I, _I, _P, _I, _P, _P, _I, _I, _P, _P, _P, _P, _I, _F, _C, _P, _P, _P, _C],
    "dsv4_attn_out": [_P, _I, _I, _I, _P, _P, _I, _P, _I, _I, _P, _I, _C, _P, _C],
    "dsv4_hc_post": [_P, _P, _P, _P, _I, _I, _I, _P, _C],
    "dsv4_indexer_topk": [_P, _P, _I, _I, _I, _P, _C, _P, _I, _I, _I, _I, _P, _I, _P, _C],
    "dsv4_compress_decode": [_P, _I, _I, _P, _P, _C, _P, _I, _I, _I, _C, _P, _P, _P, _I, _P, _F, _P, _P, _I,
                             _P, _C, _P, _I, _I, _C],
    "dsv4_argmax_rows": [_P, _I, _I, _P, _C],
    "dsv4_hc_pre": [_P, _I, _I, _I, _P, _P, _P, _C, _F, _F, _P, _F, _P, _P, _P, _C],
}
_RETURNS_INT = {"dsv4_moe", "dsv4_isa"}

_lock = threading.RLock()  # one builder/loader per process; the file lock orders processes
_libs: dict[str, ctypes.CDLL] = {}  # isa -> loaded library
_errors: dict[str, str] = {}  # isa -> why it is not loaded
_active: tuple[str, ctypes.CDLL] | None = None
_active_error: str | None = None
_resolved = False


# ---------------------------------------------------------------- which ISA this CPU runs

def _cpu_flags() -> set[str] | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def supported_isas() -> list[str]:
    """The ISA builds this CPU can execute, best first (from /proc/cpuinfo; elsewhere torch's CPU capability)."""
    flags = _cpu_flags()
    if flags is not None:
        return [i.name for i in ISAS if set(i.cpu_flags) <= flags]
    cap = torch.backends.cpu.get_cpu_capability()
    return [i.name for i in ISAS if cap in i.torch_capability]


def _wanted() -> list[str]:
    """ISAs to try, in order, under DSV4_KERNEL_ISA (raises RuntimeError with the reason when none is possible)."""
    forced = os.environ.get("DSV4_KERNEL_ISA", "auto").strip().lower() or "auto"
    runnable = supported_isas()
    if forced == "auto":
        if not runnable:
            raise RuntimeError("this CPU has neither AVX-512 (F/BW/DQ/VL) nor AVX2 + FMA + F16C, which the native "
                               "kernels need; the PyTorch path runs instead")
        return runnable
    if forced not in _BY_NAME:
        raise RuntimeError(f"DSV4_KERNEL_ISA={forced!r} is not one of auto, {', '.join(_BY_NAME)}")
    if forced not in runnable:
        raise RuntimeError(f"DSV4_KERNEL_ISA={forced} but this CPU lacks "
                           f"{' '.join(sorted(set(_BY_NAME[forced].cpu_flags) - (_cpu_flags() or set())))}; "
                           f"it runs: {', '.join(runnable) or 'none'}")
    return [forced]


# ---------------------------------------------------------------- build (cached, under a file lock)

def _compiler() -> tuple[str, str]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH; install one (e.g. apt-get install gcc) to build the "
                           "native kernels")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"the C compiler {cc} does not run ({e}); set CC to a working one") from e
    return cc, version.splitlines()[0] if version else ""


def sources() -> list[Path]:
    """Every C source compiled into the library (all ``*.c`` here, sorted), for the build and its key."""
    return sorted(_DIR.glob("*.c"))


def _paths(isa: Isa, cc: str, version: str) -> tuple[Path, Path, list[str]]:
    flags = [*_COMMON_FLAGS, *isa.flags]
    h = hashlib.sha256()
    for f in [*sources(), *sorted(_DIR.glob("*.h"))]:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update("\0".join([os.path.realpath(shutil.which(cc) or cc), version, *flags]).encode())
    cache = Path(os.environ.get("DSV4_KERNEL_CACHE") or Path.home() / ".cache" / "dsv4" / "kernels")
    stem = f"dsv4_cpu_{isa.name}_{h.hexdigest()[:16]}"
    return cache / f"{stem}.so", cache / f"{stem}.failed", flags


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes (also if this process dies)
        yield


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _build(isa: Isa) -> Path:
    """The library file for ``isa``, compiled here unless a build (or a failed one) is cached; raises RuntimeError
    with the reason when it cannot be built."""
    cc, version = _compiler()
    so, failed, flags = _paths(isa, cc, version)
    retry = os.environ.get("DSV4_KERNEL_REBUILD", "0") == "1"

    def cached() -> Path | None:
        if so.exists():
            return so
        if failed.exists() and not retry:
            raise RuntimeError(f"{failed.read_text().strip()} (cached: {failed}; DSV4_KERNEL_REBUILD=1 retries)")
        return None

    if (done := cached()) is not None:
        return done
    so.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(so.with_suffix(".lock")):
        if (done := cached()) is not None:  # another process built (or failed) while this one waited
            return done
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=so.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, "-o", tmp, *map(str, sources()), "-lm"], capture_output=True,
                                  text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            os.unlink(tmp)
            raise RuntimeError(f"{cc} could not build the {isa.name} kernels: {e}") from e  # not cached: transient
        if proc.returncode != 0:
            os.unlink(tmp)
            reason = (f"{cc} failed to build the {isa.name} kernels ({' '.join(flags)}): "
                      f"{' '.join(proc.stderr.split())[-400:]}")
            _atomic_write(failed, reason.encode())
            raise RuntimeError(reason)
        os.replace(tmp, so)  # atomic: a reader sees no file or the whole library
        failed.unlink(missing_ok=True)
    return so


def _torch_sgemm() -> int | None:
    """Address of the BLAS ``sgemm_`` that torch's CPU library exports (MKL in the x86 wheels), or None: the kernels
    then use their own micro-kernels for every size. ``DSV4_KERNEL_BLAS=0`` opts out."""
    if os.environ.get("DSV4_KERNEL_BLAS", "1") == "0":
        return None
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return ctypes.cast(torch_cpu.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def load(isa: str) -> ctypes.CDLL:
    """The ``isa`` build, compiled if needed and loaded once per process. Raises RuntimeError with the reason
    (unknown ISA, this CPU cannot run it, no compiler, the build failed now or before)."""
    with _lock:
        if isa in _libs:
            return _libs[isa]
        if isa in _errors:
            raise RuntimeError(_errors[isa])
        try:
            if isa not in _BY_NAME:
                raise RuntimeError(f"unknown ISA {isa!r}; one of {', '.join(_BY_NAME)}")
            if isa not in supported_isas():
                raise RuntimeError(f"this CPU cannot run the {isa} build (it lacks one of "
                                   f"{' '.join(_BY_NAME[isa].cpu_flags)})")
            lib = ctypes.CDLL(str(_build(_BY_NAME[isa])))
            for name, args in SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, (ctypes.c_int if name in _RETURNS_INT else None)
            lib.dsv4_set_sgemm(_torch_sgemm())
        except (RuntimeError, OSError, AttributeError) as e:
            _errors[isa] = str(e)
            raise RuntimeError(str(e)) from e
        _libs[isa] = lib
        return lib


# ---------------------------------------------------------------- the library the wrappers call

def _resolve() -> None:
    global _active, _active_error, _resolved
    with _lock:
        if _resolved:
            return
        try:
            if os.environ.get("DSV4_NATIVE_KERNELS", "1") == "0":
                raise RuntimeError("disabled by DSV4_NATIVE_KERNELS=0")
            reasons = []
            for isa in _wanted():
                try:
                    _active = (isa, load(isa))
                    break
                except RuntimeError as e:
                    reasons.append(f"{isa}: {e}")
            else:
                raise RuntimeError("; ".join(reasons))
        except RuntimeError as e:
            _active_error = str(e)
        _resolved = True  # last: a thread that sees it also sees _active / _active_error


def library() -> ctypes.CDLL | None:
    """The loaded library for this CPU (built on first call; thread-safe), or None (:func:`why_unavailable`)."""
    if not _resolved:
        _resolve()
    return _active[1] if _active is not None else None


def lib_or_raise() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"dsv4 native CPU kernels are unavailable: {_active_error}")
    return lib


def loaded() -> bool:
    """True when the kernels are already built and loaded in this process (no build is attempted)."""
    return _resolved and _active is not None


def available() -> bool:
    """True when the native kernels are built (or can be) for this CPU."""
    return library() is not None


def why_unavailable() -> str | None:
    """None when :func:`available`, else the reason in one line."""
    library()
    return _active_error


def isa() -> str | None:
    """The ISA build the wrappers call (``avx512`` / ``avx2``), None when unavailable."""
    library()
    return _active[0] if _active is not None else None


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[ctypes.CDLL]:
    """Make the wrappers call the ``name`` build inside the block (tests and benchmarks run every build this CPU
    executes this way). Process-wide, not per thread: not for use while other threads call the kernels."""
    global _active
    lib = load(name)
    library()
    with _lock:
        saved = _active
        _active = (name, lib)
    try:
        yield lib
    finally:
        with _lock:
            _active = saved
