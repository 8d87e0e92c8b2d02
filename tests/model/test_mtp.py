"""The MTP block equals architecture.md sec 10 written out directly, and works with the cache."""

from __future__ import annotations

import torch

from tests.conftest import make_tiny_config, random_model
from dsv4.model.batch import BatchPlan, ForwardBatch
from dsv4.model.cache import KVCache
from dsv4.model.hyper import hc_head


def test_mtp_matches_formula() -> None:
    cfg = make_tiny_config()
    model = random_model(cfg, seed=21)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (30,), generator=g)
    ids, nxt = tokens[:-1], tokens[1:]
    with torch.no_grad():
        main = model.forward_batch(ForwardBatch.from_sequences([ids]), None)
        out = model.forward_mtp(ForwardBatch.from_sequences([nxt]), main.hidden, None)

        # sec 10, directly: e = enorm(embed(next)); x = e_proj(e) + h_proj(hnorm(h)); x = Block(x);
        # logits = head(norm(hc_head_mtp(x)))
        mtp = model.mtp[0]
        e = mtp.enorm(model.embed(nxt))
        x = mtp.e_proj(e).unsqueeze(1) + mtp.h_proj(mtp.hnorm(main.hidden))
        plan = BatchPlan(ForwardBatch.from_sequences([nxt]), torch.device("cpu"), False)
        x = super(type(mtp), mtp).forward(x, plan, None, nxt)  # the plain Block (SWA attention + MoE)
        y = mtp.norm(hc_head(x, mtp.hc_head_fn, mtp.hc_head_base, mtp.hc_head_scale, cfg.hc_eps, cfg.rms_norm_eps))
        want = y.float() @ model.head.weight.float().t()
    assert mtp.attn.compressor is None and not mtp.ffn.gate.hash  # SWA, routed (non-hash) gate
    torch.testing.assert_close(out.logits, want)
    torch.testing.assert_close(out.hidden, x)


def test_mtp_with_cache_matches_pure() -> None:
    """Drafting token by token with the MTP's window in the cache equals the MTP over the whole sequence."""
    cfg = make_tiny_config()
    model = random_model(cfg, seed=22)
    tokens = torch.randint(0, cfg.vocab_size, (25,), generator=torch.Generator().manual_seed(1))
    ids, nxt = tokens[:-1], tokens[1:]
    with torch.no_grad():
        main = model.forward_batch(ForwardBatch.from_sequences([ids]), None)
        want = model.forward_mtp(ForwardBatch.from_sequences([nxt]), main.hidden, None).logits
        cache = KVCache(cfg, num_slots=1, num_pages=2, page_size=16, dtype=torch.float32)
        bt = torch.tensor([[0, 1]])
        got = []
        for i, n in ((0, 7), *((p, 1) for p in range(7, 24))):
            b_main = ForwardBatch.from_sequences([ids[i:i + n]], [i], [0], bt)
            h = model.forward_batch(b_main, cache).hidden
            b_mtp = ForwardBatch.from_sequences([nxt[i:i + n]], [i], [0], bt)
            got.append(model.forward_mtp(b_mtp, h, cache).logits)
    torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=1e-4)
