"""A packed checkpoint at full V4-Flash width is resident at its own size (issue 11, item 5).

One CSA layer at V4-Flash width (dim 4096, 64 heads x 512, q/o ranks 1024, 8 output groups, Lightning Indexer 64 x
128 with its compressor, the layer's overlapping compressor, 256 FP4 experts of 2048 + a shared FP8 expert, mHC with
4 streams) and an fp32 head; the vocabulary is cut to 8192 (the head and embedding are plain tensors whose size does
not depend on the packed formats). The checkpoint is written directly in the published layout from random bytes
(FP8 codes of a bounded exponent, FP4 codes, ue8m0 scales; no quantisation), streamed tensor by tensor, ~3.5 GB.

A fresh child process loads it (fp32 compute) and reports: its resident weight bytes (<= 1.05x the checkpoint's
bytes), the peak RSS the load added (VmHWM after, the watermark reset to VmRSS before: <= 1.2x), and the logits of a
short prompt on the native CPU kernels and on the reference ops (dequantisation on the fly, fp32), which must agree
within 2e-3. Needs ~4.5 GB of memory for ~1 minute; the checkpoint is deleted at the end.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.model import checkpoint_io as cio
from dsv4.model import quant

FLASH_WIDTH = dict(
    vocab_size=8192, hidden_size=4096, num_hidden_layers=1, num_attention_heads=64, head_dim=512,
    qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128, compress_ratios=[4, 0],
    index_n_heads=64, index_head_dim=128, index_topk=512, moe_intermediate_size=2048, n_routed_experts=256,
    num_experts_per_tok=6, n_shared_experts=1, num_hash_layers=0, hc_mult=4, hc_sinkhorn_iters=20,
    routed_scaling_factor=1.5, swiglu_limit=10.0, scoring_func="sqrtsoftplus", num_nextn_predict_layers=0,
    rope_theta=10000, compress_rope_theta=160000, max_position_embeddings=1048576,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                  "beta_slow": 1},
)

CHILD = r"""
import json, sys
import torch
from dsv4 import ops
from dsv4.config import ModelConfig
from dsv4.model.transformer import Transformer
from dsv4.model.loader import load_model

torch.set_num_threads(2)
with torch.device("meta"):  # warm-up: the first meta build imports torch._dynamo (~150 MB), not the load's memory
    Transformer(ModelConfig.from_dict(dict(json.loads(sys.argv[2]), hidden_size=64, head_dim=64, q_lora_rank=64,
                                           o_lora_rank=64, moe_intermediate_size=32, n_routed_experts=8)))

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

baseline = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
model = load_model(sys.argv[1], dtype=torch.float32, progress=False)
peak = status("VmHWM")
resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
stacked = model.layers[0].ffn.fp4_stacks() is not None
ids = torch.tensor([[3, 1000, 77, 4095, 12, 5, 900, 8000]])
with torch.no_grad():
    native = model(ids)
    with ops.use_backend("cpu", "reference"):
        ref = model(ids)
print(json.dumps({"baseline": baseline, "peak": peak, "resident": resident, "stacked": stacked,
                  "max_abs_diff": (native - ref).abs().max().item(), "ref_abs_max": ref.abs().max().item(),
                  "finite": bool(torch.isfinite(ref).all())}))
"""


def _tensors(config: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every stored tensor of the published layout for ``config``."""
    from dsv4.model.transformer import Transformer

    with torch.device("meta"):
        shapes = Transformer(config, dtype=torch.bfloat16).state_dict()
    out = []
    for name, t in shapes.items():
        kind = cio.tensor_kind(name)
        if kind == "fp8":
            out += [(name, "F8_E4M3", tuple(t.shape)),
                    (name[: -len("weight")] + "scale", "F8_E8M0", quant.fp8_scale_shape(t.shape))]
        elif kind == "fp4":
            out += [(name, "I8", (t.shape[0], t.shape[1] // 2)),
                    (name[: -len("weight")] + "scale", "F8_E8M0", quant.fp4_scale_shape((t.shape[0], t.shape[1] // 2)))]
        elif kind == "fp32" or name == "head.weight":
            out.append((name, "F32", tuple(t.shape)))
        elif kind == "int":
            out.append((name, "I64", tuple(t.shape)))
        else:
            out.append((name, "BF16", tuple(t.shape)))
    return out


_ITEMSIZE = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "F32": 4, "BF16": 2, "I64": 8}


def _value(name: str, st: str, shape: tuple[int, ...], pool: torch.Tensor, salt: int) -> torch.Tensor:
    """Bytes of one tensor: packed codes are windows of a random byte pool (a different window per tensor), scales
    keep the dequantised weights O(0.01), float parameters are small random values (norm weights 1)."""
    n = math.prod(shape)
    if st in ("F8_E4M3", "I8"):
        start = (salt * 7919) % (pool.numel() - n)
        codes = pool[start:start + n]
        return (codes & 0xBF) if st == "F8_E4M3" else codes  # FP8: exponent <= 7, so |value| < 2 and never NaN
    if st == "F8_E8M0":  # FP8 block scale 2^-6, FP4 1x32 scale 2^-8
        return torch.full((n,), 121 if cio.tensor_kind(name[: -len("scale")] + "weight") == "fp8" else 119,
                          dtype=torch.uint8)
    g = torch.Generator().manual_seed(salt)
    if "norm" in name or name.endswith(("_scale", "hc_head_scale")):
        t = torch.ones(n)
    elif name.endswith(("_base", "attn_sink", "ape", "gate.bias")):
        t = torch.zeros(n)
    else:
        t = torch.randn(n, generator=g) * (1.0 if name == "embed.weight" else 0.02)
    return (t.to(torch.bfloat16) if st == "BF16" else t).view(torch.uint8)


def write_random_checkpoint(root: Path, config: ModelConfig, raw_config: dict) -> int:
    """One safetensors file written tensor by tensor (peak memory: one tensor); returns its tensor bytes."""
    tensors = _tensors(config)
    header, offset = {}, 0
    for name, st, shape in tensors:
        nbytes = math.prod(shape) * _ITEMSIZE[st]
        header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    pool = torch.empty(40 << 20, dtype=torch.uint8).random_(generator=torch.Generator().manual_seed(0))
    root.mkdir(parents=True, exist_ok=True)
    with open(root / cio.SINGLE_NAME, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for salt, (name, st, shape) in enumerate(tensors):
            f.write(_value(name, st, shape, pool, salt).numpy().tobytes())
    (root / cio.CONFIG_NAME).write_text(json.dumps(raw_config))
    return offset


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS accounting")
def test_flash_width_checkpoint_is_resident_at_its_size_with_reference_logits(tmp_path):
    root = tmp_path / "flash_width"
    try:
        ckpt_bytes = write_random_checkpoint(root, ModelConfig.from_dict(FLASH_WIDTH), FLASH_WIDTH)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(root), json.dumps(FLASH_WIDTH)], capture_output=True,
                              text=True, timeout=900)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # ~3.5 GB: never left behind
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"checkpoint {ckpt_bytes / 2**30:.2f} GiB, resident {r['resident'] / ckpt_bytes:.3f}x, load peak "
          f"{(r['peak'] - r['baseline']) / ckpt_bytes:.3f}x, logits native vs reference max |diff| "
          f"{r['max_abs_diff']:.2e} (|logits| <= {r['ref_abs_max']:.2f})")
    assert ckpt_bytes > 3 * 2**30
    assert r["stacked"] and r["finite"] and r["ref_abs_max"] > 0.1
    assert r["resident"] <= 1.05 * ckpt_bytes
    assert r["peak"] - r["baseline"] <= 1.2 * ckpt_bytes
    assert r["max_abs_diff"] <= 2e-3
