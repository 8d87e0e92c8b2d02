"""Checkpoint files in the published DeepSeek-V4 layout: a streaming safetensors reader and the writer.

Layout (architecture.md sec. 12): ``model-0000k-of-0000n.safetensors`` shards, ``model.safetensors.index.json``
(``weight_map``: tensor name -> shard file) and ``config.json``. Tensor names are the official keys
(``layers.{L}.attn.wq_a.weight``); a release checkpoint stores, per tensor kind,

=========  ==============================================================================================
``fp8``    e4m3 + ``<name>.scale`` ue8m0 per 128x128 block: attention wq_a, wq_b, wkv, wo_a, wo_b, indexer wq_b,
           shared experts w1/w2/w3, MTP e_proj/h_proj
``fp4``    e2m1 packed two per byte in int8 ``[out, in/2]`` + ue8m0 scale per 1x32 block: routed experts
``fp32``   mHC ``hc_*``, ``attn_sink``, compressor ``ape``, gate ``bias``
``int``    ``tid2eid`` (int64)
``bf16``   everything else: embed, head, norms, compressor wkv/wgate, gate weight, indexer weights_proj
=========  ==============================================================================================

:class:`SafetensorsFile` reads one ``.safetensors`` file through a private mmap: it validates the header against the
file size when opened (so a truncated download fails before anything is loaded), hands out zero-copy tensor views,
and :meth:`SafetensorsFile.release` drops a tensor's pages from the process afterwards (``MADV_DONTNEED``), so
streaming a checkpoint never holds more than one tensor of file pages resident. The ``safetensors`` package's own
``safe_open`` keeps every touched page mapped until the file is closed, which would double the peak memory of a
single-file checkpoint.

Deliberately not here: model building and name mapping (loader.py), the number formats themselves (quant.py).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors.torch import save_file

from dsv4.model import quant

if TYPE_CHECKING:
    from dsv4.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

TensorKind = Literal["fp8", "fp4", "fp32", "int", "bf16"]

# safetensors dtype string -> torch dtype. "F4" (float4_e2m1fn_x2) counts 4-bit elements in its shape.
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
if hasattr(torch, "float4_e2m1fn_x2"):
    _ST_DTYPES["F4"] = torch.float4_e2m1fn_x2

_FP8_RE = re.compile(
    r"(^|\.)attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$"
    r"|(^|\.)attn\.indexer\.wq_b\.weight$"
    r"|(^|\.)ffn\.shared_experts\.w[123]\.weight$"
    r"|^mtp\.\d+\.(e_proj|h_proj)\.weight$"
)
_FP4_RE = re.compile(r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$")
_FP32_RE = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$|\.attn_sink$|\.ape$|\.gate\.bias$")
_INT_RE = re.compile(r"\.tid2eid$")


class CheckpointError(RuntimeError):
    """A checkpoint on disk is missing, incomplete, corrupt or does not fit the model; the message says what to do."""


def tensor_kind(name: str) -> TensorKind:
    """How the release stores the official tensor ``name`` (module docstring table)."""
    if _FP4_RE.search(name):
        return "fp4"
    if _FP8_RE.search(name):
        return "fp8"
    if _INT_RE.search(name):
        return "int"
    if _FP32_RE.search(name):
        return "fp32"
    return "bf16"


# ----------------------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # torch shape (F4: the packed shape, last dim halved)
    begin: int  # absolute byte offsets in the file
    end: int


class SafetensorsFile:
    """One ``.safetensors`` file: validated header, zero-copy tensor views over a private mmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {self.path} does not exist") from None
        self._mmap: mmap.mmap | None = None
        try:
            self.size = os.fstat(self._fd).st_size
            self.entries = self._read_header()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint file {self.path} is truncated or corrupt: {why}. Re-download or re-export this file."
        )

    def _read_header(self) -> dict[str, TensorEntry]:
        if self.size < 8:
            raise self._corrupt(f"it has {self.size} bytes, fewer than the 8-byte header length")
        header_len = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if header_len > self.size - 8 or header_len > 100 * 2**20:
            raise self._corrupt(f"the header claims {header_len} bytes but the file has {self.size}")
        try:
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"the header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("the header is not a JSON object")
        data_start = 8 + header_len
        entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                st_dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"tensor {name!r} has a malformed header entry {info!r}") from None
            if st_dtype not in _ST_DTYPES:
                raise CheckpointError(
                    f"tensor {name!r} in {self.path} has dtype {st_dtype}, which dsv4 cannot read; convert the "
                    f"checkpoint to bf16/fp32 or the release formats (FP8 e4m3, FP4 int8, ue8m0 scales)"
                )
            dtype = _ST_DTYPES[st_dtype]
            if st_dtype == "F4":  # shape counts 4-bit values; torch holds two per element
                if not shape or shape[-1] % 2:
                    raise self._corrupt(f"F4 tensor {name!r} has odd last dimension {shape}")
                shape = shape[:-1] + [shape[-1] // 2]
            nbytes = math.prod(shape) * dtype.itemsize
            if any(s < 0 for s in shape) or not 0 <= begin <= end or end - begin != nbytes:
                raise self._corrupt(
                    f"tensor {name!r} ({st_dtype} {shape}) needs {nbytes} bytes but its offsets are [{begin}, {end}]"
                )
            if data_start + end > self.size:
                raise self._corrupt(
                    f"tensor {name!r} ends at byte {data_start + end} but the file has only {self.size} bytes"
                )
            entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
        return entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy CPU view of ``name``; valid until :meth:`release` / :meth:`close`. Do not write to it."""
        e = self.entries[name]
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=e.dtype)
        if self._mmap is None:
            # ACCESS_COPY (MAP_PRIVATE) gives a writable buffer torch.frombuffer accepts without copying; pages are
            # only ever read, so nothing is copied and the file is never modified.
            self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        raw = torch.frombuffer(self._mmap, dtype=torch.uint8, count=e.end - e.begin, offset=e.begin)
        return raw.view(e.dtype).view(e.shape)

    def release(self, name: str) -> None:
        """Drop the pages of ``name`` from this process (they stay in the OS page cache)."""
        e = self.entries[name]
        self.release_bytes(e.begin, e.end)

    def release_bytes(self, begin: int, end: int) -> None:
        """Drop the pages covering file bytes [begin, end); a view touching them later simply re-reads them."""
        if self._mmap is None or not hasattr(self._mmap, "madvise"):
            return
        start = begin // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, min(end, len(self._mmap)) - start)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # A tensor view is still alive (the caller kept one): let the GC unmap it with the last view.
                pass
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()


def find_weight_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> shard path for a checkpoint directory (sharded via the index, or single-file).

    Only the index is read here; every listed shard must exist.
    """
    root = Path(path)
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index} is not a valid safetensors index ({e!r}); it needs a 'weight_map' object. Re-download it."
            ) from None
        missing: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not (root / shard).is_file():
                missing.setdefault(shard, []).append(name)
        if missing:
            shard, names = next(iter(missing.items()))
            raise CheckpointError(
                f"shard file {root / shard} listed in {index} is missing ({len(missing)} missing shard(s) in all; it "
                f"holds {len(names)} tensors, e.g. {names[0]!r}). Download the missing shard(s) into {root}."
            )
        return {name: root / shard for name, shard in weight_map.items()}
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no weights in {root}: expected {INDEX_NAME} with its shards, or {SINGLE_NAME}. Point the path at a "
            f"checkpoint directory."
        )
    if len(files) > 1 and (root / SINGLE_NAME) not in files:
        raise CheckpointError(
            f"{root} holds {len(files)} .safetensors files but no {INDEX_NAME}; restore the index file so dsv4 knows "
            f"which files belong to the checkpoint."
        )
    single = root / SINGLE_NAME if (root / SINGLE_NAME).is_file() else files[0]
    with SafetensorsFile(single) as f:
        return {name: single for name in f.keys()}


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _stored_tensors(name: str, t: torch.Tensor, quantize: bool, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """The tensor(s) the release layout stores for one official tensor (weight [+ .scale])."""
    t = t.detach().to("cpu")
    kind = tensor_kind(name)
    if kind == "int":
        return [(name, t.to(torch.int64).contiguous())]
    if not t.is_floating_point():
        raise CheckpointError(f"tensor {name!r} is {t.dtype}, but the published layout stores it as a float tensor")
    if kind == "fp32":
        return [(name, t.to(torch.float32, copy=True).contiguous())]
    if quantize and kind == "fp8":
        w, s = quant.quantize_fp8(t)
        return [(name, w), (name[: -len("weight")] + "scale", s)]
    if quantize and kind == "fp4":
        w, s = quant.quantize_fp4(t)
        return [(name, w), (name[: -len("weight")] + "scale", s)]
    return [(name, t.to(dtype, copy=True).contiguous())]


def release_config(config: ModelConfig | Mapping[str, Any], quantize: bool) -> dict[str, Any]:
    """The config.json dict for a checkpoint written by :func:`save_checkpoint` (HF key set)."""
    d = dict(config) if isinstance(config, Mapping) else config.to_dict()
    d.pop("quantization_config", None)
    d.pop("expert_dtype", None)
    d.setdefault("architectures", ["DeepseekV4ForCausalLM"])
    d.setdefault("model_type", "deepseek_v4")
    d["torch_dtype"] = "bfloat16"
    if quantize:
        # What the release ships (architecture.md sec. 12 and reference/configs/v4-flash/config.json).
        d["quantization_config"] = {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
            "weight_block_size": [quant.FP8_BLOCK, quant.FP8_BLOCK],
        }
        d["expert_dtype"] = "fp4"
    return d


def save_checkpoint(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    config: ModelConfig | Mapping[str, Any],
    *,
    quantize: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write an official-name ``state_dict`` as a checkpoint directory in the published layout.

    ``quantize=False``: every float tensor the release keeps in fp32 stays fp32, all others are stored in ``dtype``
    (bf16 by default; fp32 gives a lossless export). ``quantize=True``: additionally FP8 e4m3 + 128x128 scales and
    FP4 + 1x32 scales exactly like the release. ``config`` is a ``ModelConfig`` (or a config.json dict).
    Shards hold at most ``max_shard_bytes`` each (a single larger tensor gets its own shard).
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for old in list(root.glob("model-*-of-*.safetensors")) + [root / INDEX_NAME, root / SINGLE_NAME]:
        old.unlink(missing_ok=True)  # a stale shard from an earlier export would confuse the index
    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    total = 0
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(root / f".shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for name, tensor in state_dict.items():
        if name.endswith(".scale") and tensor_kind(name[: -len("scale")] + "weight") in ("fp8", "fp4"):
            raise CheckpointError(f"{name!r}: pass dequantised weights; the writer makes the .scale tensors itself")
        stored = _stored_tensors(name, tensor, quantize, dtype)
        nbytes = sum(t.numel() * t.element_size() for _, t in stored)
        if pending and pending_bytes + nbytes > max_shard_bytes:
            flush()
        for k, t in stored:
            pending[k] = t
            weight_map[k] = len(shards)
        pending_bytes += nbytes
        total += nbytes
    flush()
    n = len(shards)
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    for k in range(n):
        os.replace(root / f".shard-{k:05d}.tmp", root / names[k])
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in weight_map.items()}}
    (root / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (root / CONFIG_NAME).write_text(json.dumps(release_config(config, quantize), indent=2) + "\n")
    return root


def read_state_dict(path: str | Path, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Every stored tensor of a checkpoint directory as it is on disk (copies; for tests and tools, not for loading
    big models: use ``dsv4.load_model``)."""
    files = find_weight_files(path)
    wanted = set(files) if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    for file, file_names in by_file.items():
        with SafetensorsFile(file) as f:
            for name in file_names:
                out[name] = f.tensor(name).clone()
    return out
