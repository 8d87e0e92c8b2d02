from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dsv4.train.optim import (
    Muon,
    OptimConfig,
    build_optimizers,
    decay_start,
    hybrid_newton_schulz,
    lr_at,
    param_groups,
)


def reference_muon_step(w, g, m, lr, mu=0.95, wd=0.1, rms=0.18):
    """Report Alg. 1, written out literally for one matrix (float64, no shortcuts)."""
    m = mu * m + g
    x = mu * m + g  # Nesterov
    x = x / x.norm()  # Frobenius
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for i in range(10):
        a, b, c = (3.4445, -4.7750, 2.0315) if i < 8 else (2.0, -1.5, 0.5)
        xxt = x @ x.T
        x = a * x + b * xxt @ x + c * xxt @ xxt @ x
    if tall:
        x = x.T
    o = x * math.sqrt(max(w.shape)) * rms
    return w * (1 - lr * wd) - lr * o, m


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5), (3, 7, 5)])
def test_muon_matches_transcription(shape):
    torch.manual_seed(0)
    w0 = torch.randn(shape, dtype=torch.float64)
    p = nn.Parameter(w0.clone().float())
    opt = Muon([p], lr=0.05)
    ref_w, ref_m = w0.clone(), torch.zeros_like(w0)
    for _ in range(3):
        g = torch.randn(shape, dtype=torch.float64)
        p.grad = g.float()
        opt.step()
        mats = [(ref_w, ref_m)] if len(shape) == 2 else [(ref_w[e], ref_m[e]) for e in range(shape[0])]
        outs = [reference_muon_step(w, gg, m, 0.05) for (w, m), gg in zip(mats, g if len(shape) == 3 else [g])]
        ref_w = outs[0][0] if len(shape) == 2 else torch.stack([o[0] for o in outs])
        ref_m = outs[0][1] if len(shape) == 2 else torch.stack([o[1] for o in outs])
        torch.testing.assert_close(p.detach().double(), ref_w, atol=2e-5, rtol=1e-4)


def test_newton_schulz_flattens_singular_values():
    torch.manual_seed(0)
    g = torch.randn(32, 16) @ torch.diag(torch.logspace(-2, 1, 16))
    s = torch.linalg.svdvals(hybrid_newton_schulz(g))
    # The 2 final (2, -1.5, 0.5) steps pull the singular values close to 1 (the fast steps alone leave 0.7..1.2).
    assert s.max() < 1.1 and s.min() > 0.5
    # update RMS: an orthogonal [n, m] matrix has RMS 1/sqrt(max(n, m)), so the scaled update has RMS ~0.18.
    rms = (hybrid_newton_schulz(torch.randn(64, 32)) * math.sqrt(64) * 0.18).pow(2).mean().sqrt()
    assert 0.14 < rms < 0.2


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.norm = nn.RMSNorm(4)
        self.hc_head_fn = nn.Parameter(torch.zeros(4, 16))
        self.hc_head_base = nn.Parameter(torch.zeros(4))
        self.hc_head_scale = nn.Parameter(torch.zeros(1))
        self.wq_a = nn.Linear(4, 4, bias=False)
        self.ape = nn.Parameter(torch.zeros(4, 4))


def test_param_groups_by_official_name():
    muon, adamw = param_groups(_Named())
    assert {n for n, _ in muon} == {"hc_head_fn", "wq_a.weight"}
    assert {n for n, _ in adamw} == {
        "embed.weight", "head.weight", "norm.weight", "hc_head_base", "hc_head_scale", "ape"
    }
    opts = build_optimizers(_Named(), OptimConfig(optimizer="adamw"))
    assert len(opts) == 1 and isinstance(opts[0], torch.optim.AdamW)


def test_schedules():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 104, cfg) == pytest.approx(0.25)
    assert lr_at(4, 104, cfg) == pytest.approx(1.0)
    assert lr_at(54, 104, cfg) == pytest.approx(0.55)
    assert lr_at(104, 104, cfg) == pytest.approx(0.1)
    assert lr_at(50, 104, OptimConfig(lr=1.0, schedule="constant")) == 1.0
    # warmup-stable-decay: constant until the last 20% of the steps, then cosine to min_lr_ratio
    wsd = OptimConfig(lr=1.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    assert decay_start(100, wsd) == 80
    assert lr_at(79, 100, wsd) == 1.0 and lr_at(80, 100, wsd) == 1.0
    assert lr_at(90, 100, wsd) == pytest.approx(0.55) and lr_at(100, 100, wsd) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 10, OptimConfig(schedule="linear"))
