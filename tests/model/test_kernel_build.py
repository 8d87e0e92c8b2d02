"""The native kernels' build and load (dsv4/kernels/build.py): one compile for many concurrent processes and threads,
a failed compile cached with its reason, the ISA picked from the CPU flags or forced by DSV4_KERNEL_ISA. Builds run
in subprocesses with their own cache folder and a wrapper compiler that counts its compiles."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dsv4.kernels import build

ROOT = Path(__file__).resolve().parents[2]
needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")

_PROBE = """
import threading
from dsv4 import kernels
seen = []
def probe():
    seen.append((kernels.available(), kernels.why_unavailable(), kernels.isa()))
threads = [threading.Thread(target=probe) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(repr(seen))
"""


def _compiler(tmp: Path, body: str) -> Path:
    """A shell script standing in for cc: answers --version, appends a line to tmp/compiles per compile."""
    cc = tmp / "cc.sh"
    cc.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "wrapped cc 1"; exit 0; fi\n'
                  f'echo compile >> {tmp}/compiles\n{body}\n')
    cc.chmod(0o755)
    return cc


def _env(tmp: Path, cc: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSV4_")}
    env.update(CC=str(cc), DSV4_KERNEL_CACHE=str(tmp / "cache"), PYTHONPATH=f"{ROOT / 'src'}:{ROOT}", **extra)
    return env


def _compiles(tmp: Path) -> int:
    f = tmp / "compiles"
    return len(f.read_text().splitlines()) if f.exists() else 0


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """This process's build/load state emptied (as in a new process) and a cache folder of its own; restored after."""
    orig_cache = os.environ.get("DSV4_KERNEL_CACHE")
    for k in [k for k in os.environ if k.startswith("DSV4_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("DSV4_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_libs", {})
    monkeypatch.setattr(build, "_errors", {})
    monkeypatch.setattr(build, "_active", None)
    monkeypatch.setattr(build, "_active_error", None)
    monkeypatch.setattr(build, "_resolved", False)

    def new_process() -> None:
        build._libs.clear()
        build._errors.clear()
        build._active, build._active_error, build._resolved = None, None, False

    new_process.orig_cache = orig_cache  # the session's cache folder (reuse its builds)
    return new_process


def _threads_probe(n: int = 6) -> list[tuple[bool, str | None, str | None]]:
    seen = []

    def probe() -> None:
        seen.append((build.available(), build.why_unavailable(), build.isa()))

    threads = [threading.Thread(target=probe) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return seen


@needs_cc
@pytest.mark.skipif(not build.supported_isas(), reason="this CPU runs no ISA build")
def test_concurrent_threads_build_once_and_none_sees_unavailable(fresh, tmp_path, monkeypatch):
    real = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", str(_compiler(tmp_path, f'sleep 1\nexec {real} "$@"')))  # a slow compile: a wide race
    best = build.supported_isas()[0]
    assert _threads_probe() == [(True, None, best)] * 6
    assert _compiles(tmp_path) == 1
    fresh()  # a later process loads the cached library
    assert _threads_probe(2) == [(True, None, best)] * 2 and _compiles(tmp_path) == 1


@pytest.mark.slow
@needs_cc
@pytest.mark.skipif(not build.supported_isas(), reason="this CPU runs no ISA build")
def test_concurrent_processes_build_once_under_the_file_lock(tmp_path):
    real = shutil.which("cc") or shutil.which("gcc")
    cc = _compiler(tmp_path, f'sleep 2\nexec {real} "$@"')
    env = _env(tmp_path, cc)
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    best = build.supported_isas()[0]
    for (out, err), p in zip(outs, procs):
        assert p.returncode == 0, err
        assert eval(out.strip()) == [(True, None, best)] * 4
    assert _compiles(tmp_path) == 1
    assert len(list((tmp_path / "cache").glob(f"dsv4_cpu_{best}_*.so"))) == 1


@pytest.mark.skipif(not build.supported_isas(), reason="this CPU runs no ISA build")
def test_a_failed_build_is_cached_with_its_reason_and_retried_on_request(fresh, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(_compiler(tmp_path, 'echo "cpu_kernels.c:1:1: error: no such intrinsic" >&2\nexit 1')))
    monkeypatch.setenv("DSV4_KERNEL_ISA", build.supported_isas()[-1])
    seen = _threads_probe()
    ok, why, isa = seen[0]
    assert len(set(seen)) == 1 and not ok and isa is None  # every thread got the same answer, with the reason
    assert "failed to build" in why and "no such intrinsic" in why
    assert _compiles(tmp_path) == 1
    fresh()  # a later process: the cached reason, no compile
    ok, why, _ = _threads_probe(1)[0]
    assert not ok and "no such intrinsic" in why and "cached" in why and "DSV4_KERNEL_REBUILD=1" in why
    assert _compiles(tmp_path) == 1
    fresh()
    monkeypatch.setenv("DSV4_KERNEL_REBUILD", "1")
    assert not build.available() and _compiles(tmp_path) == 2


def test_no_compiler_says_what_to_do(fresh, tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "missing-cc"))
    assert not build.available() and build.isa() is None
    assert "does not run" in build.why_unavailable() and "set CC" in build.why_unavailable()


def test_the_isa_comes_from_the_cpu_flags_or_the_env(monkeypatch):
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"}
    monkeypatch.delenv("DSV4_KERNEL_ISA", raising=False)
    monkeypatch.setattr(build, "_cpu_flags", lambda: avx512 | {"sse4_2"})
    assert build.supported_isas() == ["avx512", "avx2"] and build._wanted() == ["avx512", "avx2"]
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"avx2", "fma", "f16c", "avx512f"})  # F without BW/DQ/VL
    assert build._wanted() == ["avx2"]
    monkeypatch.setenv("DSV4_KERNEL_ISA", "avx512")
    with pytest.raises(RuntimeError, match="lacks avx512bw avx512dq avx512vl"):
        build._wanted()
    monkeypatch.setenv("DSV4_KERNEL_ISA", "avx2")
    assert build._wanted() == ["avx2"]
    monkeypatch.setenv("DSV4_KERNEL_ISA", "sse2")
    with pytest.raises(RuntimeError, match="not one of auto, avx512, avx2"):
        build._wanted()
    monkeypatch.setenv("DSV4_KERNEL_ISA", "auto")
    monkeypatch.setattr(build, "_cpu_flags", lambda: {"avx", "fma"})
    with pytest.raises(RuntimeError, match="neither AVX-512"):
        build._wanted()
    # a process that has not loaded it yet (other tests, e.g. the packed kernels', may have loaded avx2 already)
    monkeypatch.setattr(build, "_libs", {})
    monkeypatch.setattr(build, "_errors", {})
    with pytest.raises(RuntimeError, match="cannot run the avx2 build"):
        build.load("avx2")  # never loaded on a CPU that cannot execute it


@needs_cc
@pytest.mark.skipif("avx2" not in build.supported_isas(), reason="this CPU cannot execute the avx2 build")
def test_the_env_forces_the_avx2_build(fresh, monkeypatch):
    if fresh.orig_cache is None:
        monkeypatch.delenv("DSV4_KERNEL_CACHE")
    else:
        monkeypatch.setenv("DSV4_KERNEL_CACHE", fresh.orig_cache)
    monkeypatch.setenv("DSV4_KERNEL_ISA", "avx2")
    assert build.isa() == "avx2" and build.library().dsv4_isa() == 256
