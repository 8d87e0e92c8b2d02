"""The engine on packed weights and on a bf16 KV cache (issue 11, items 1 and 4): a published-layout checkpoint
(FP8 dense + FP4 experts) served by LLM(path) decodes exactly as step-by-step decoding of the same packed model, on
the reference ops and on the native CPU kernels; kv_cache_dtype="bfloat16" halves the cache of an fp32 model."""

from __future__ import annotations

import pytest
import torch

from dsv4.config import ModelConfig
from dsv4.engine.llm import LLM
from dsv4.model import checkpoint_io as cio
from dsv4.model import quant
from dsv4.model.loader import load_model
from tests.engine.test_engine_model import PAGE, TINY, greedy, plain_greedy, prompts

# experts of 32 x 64: whole 1x32 FP4 blocks, so the loader stacks them and the native experts kernel runs
PACKED = dict(TINY, moe_intermediate_size=32)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    from dsv4.model.transformer import Transformer

    cfg = ModelConfig.from_dict(PACKED)
    torch.manual_seed(0)
    sd = Transformer(cfg, dtype=torch.float32).init_weights(0).state_dict()
    for name, t in sd.items():  # values the release formats hold exactly
        if cio.tensor_kind(name) == "fp8":
            sd[name] = quant.dequantize_fp8(*quant.quantize_fp8(t), torch.float32)
        elif cio.tensor_kind(name) == "fp4":
            sd[name] = quant.dequantize_fp4(*quant.quantize_fp4(t), torch.float32)
    root = tmp_path_factory.mktemp("packed")
    cio.save_checkpoint(root, sd, cfg, quantize=True)
    return root


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_packed_checkpoint_serves_like_step_by_step_decoding(packed_dir, backend):
    from dsv4 import ops

    with ops.use_backend("cpu", backend):
        llm = LLM(str(packed_dir), dtype=torch.float32, page_size=PAGE, max_num_seqs=4, cache_memory_gb=0.02,
                  backend=backend)
        model = llm.engine.model
        assert model.has_packed_weights() and model.layers[1].ffn.fp4_stacks() is not None
        ps = prompts(3, 20, 40, seed=5)
        outs = llm.generate(ps, greedy(10))
        assert [o.outputs[0].token_ids for o in outs] == plain_greedy(model, ps, [10] * 3)


def test_bf16_kv_cache_halves_the_cache_and_keeps_greedy_tokens(packed_dir):
    model = load_model(packed_dir, dtype=torch.float32, progress=False)
    exact = LLM(model, page_size=PAGE, max_num_seqs=2, num_pages=16)
    half = LLM(model, page_size=PAGE, max_num_seqs=2, num_pages=16, kv_cache_dtype="bfloat16")
    assert exact.engine.cache.window[0].dtype == torch.float32
    assert half.engine.cache.window[0].dtype == torch.bfloat16 and half.engine.cache.entries[1].dtype == torch.bfloat16
    def kv_bytes(cache):  # window rings + compressed entries + indexer keys (the compressor tails stay fp32)
        ts = [t for ts in (cache.window, cache.entries, cache.idx_entries) for t in ts if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    assert 2 * kv_bytes(half.engine.cache) == kv_bytes(exact.engine.cache) > 0
    ps = prompts(2, 30, 40, seed=6)
    a = [o.outputs[0].token_ids for o in exact.generate(ps, greedy(8))]
    b = [o.outputs[0].token_ids for o in half.generate(ps, greedy(8))]
    assert a == b  # bf16 rounding of keys/values moves logits by ~1e-3 here, far below the greedy margins
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(model, kv_cache_dtype="fp8")
