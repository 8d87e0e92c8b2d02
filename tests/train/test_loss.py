from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv4.train.loss import ExpertLoad, sequence_balance_loss, token_ce_sum, update_gate_biases


def test_balance_loss_matches_v3_formula():
    torch.manual_seed(0)
    n_exp, k = 6, 2
    scores = torch.rand(7, n_exp) + 0.1
    idx = scores.topk(k, dim=-1).indices
    seq_lens = [3, 4]
    got = sequence_balance_loss(scores, idx, seq_lens, n_exp)
    want = 0.0
    for s, i in zip(scores.split(seq_lens), idx.split(seq_lens)):
        t = s.shape[0]
        for e in range(n_exp):
            f = n_exp / (k * t) * float((i == e).any(-1).sum())
            p = float((s[:, e] / s.sum(-1)).mean())
            want += f * p
    assert abs(float(got) - want) < 1e-5
    # perfectly uniform routing and affinities give exactly 1 per sequence (the loss's minimum)
    uni = torch.ones(4, 4)
    assert abs(float(sequence_balance_loss(uni, torch.tensor([[0], [1], [2], [3]]), [4], 4)) - 1.0) < 1e-6


def test_balance_loss_gradient_pushes_down_overloaded_expert():
    logits = torch.zeros(8, 4, requires_grad=True)
    scores = F.softplus(logits).sqrt()
    idx = torch.zeros(8, 1, dtype=torch.long)  # everyone picks expert 0
    sequence_balance_loss(scores, idx, [8], 4).backward()
    assert logits.grad[:, 0].gt(0).all() and logits.grad[:, 1:].lt(0).all()


def test_bias_updates_move_load_toward_balance():
    torch.manual_seed(0)
    n_exp, k, n_tok = 8, 2, 512
    # Skewed affinities: experts 0 and 1 win most tokens without a bias.
    scores = F.softplus(torch.randn(n_tok, n_exp) + torch.linspace(1.5, -1.5, n_exp)).sqrt()
    bias = torch.zeros(n_exp)
    imbalance = []
    for _ in range(300):
        idx = (scores + bias).topk(k, dim=-1).indices  # the bias only affects selection (report sec. 9)
        load = ExpertLoad()
        load.add("layers.0.ffn.gate", idx, n_exp)
        imbalance.append(load.imbalance()["layers.0.ffn.gate"])
        update_gate_biases({"layers.0.ffn.gate": bias}, load, speed=0.01)
    assert imbalance[0] > 2.0
    assert max(imbalance[-20:]) < 1.3
    assert bias[0] < 0 < bias[-1]


def test_ce_sum_ignores_padding_targets():
    logits = torch.randn(4, 5)
    tgt = torch.tensor([1, -100, 3, 0])
    want = F.cross_entropy(logits[[0, 2, 3]], tgt[[0, 2, 3]], reduction="sum")
    torch.testing.assert_close(token_ce_sum(logits, tgt), want)


def test_bias_updates_balance_a_real_v4_gate():
    """Through the trainer's router hooks on a tiny V4: an expert made to win most tokens loses them to the bias."""
    from dsv4.config import ModelConfig
    from dsv4.model.transformer import Transformer
    from dsv4.train.loss import RouterRecorder
    from dsv4.train.trainer import gate_biases
    from tests.train.conftest import TINY_TRAIN

    model = Transformer(ModelConfig.from_dict({**TINY_TRAIN, "vocab_size": 64})).init_weights(0).eval()
    gate = model.layers[1].ffn.gate
    ids = torch.randint(3, 64, (4, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    h = gate.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(ids)
    h.remove()
    x = seen[0].float()
    with torch.no_grad():  # expert 0's row along the tokens' common direction: it wins most tokens (74 of 96)
        gate.weight[0] = 10 * x.mean(0) / x.mean(0).norm()
    biases = gate_biases(model)
    assert set(biases) == {"layers.1.ffn.gate", "layers.2.ffn.gate", "mtp.0.ffn.gate"}
    history = []
    # a coarse then a fine speed: a sign update settles into a band of width ~speed around balance
    for speed in [0.05] * 50 + [0.01] * 30:
        load = ExpertLoad()
        with torch.no_grad(), RouterRecorder(model) as rec:
            model(ids)
        for key, scores, idx in rec.stats:
            load.add(key, idx, scores.size(-1))
        history.append(load.imbalance()["layers.1.ffn.gate"])
        update_gate_biases(biases, load, speed=speed)
    assert history[0] > 1.5
    assert sum(history[-10:]) / 10 < 1.25
    assert gate.bias[0] < 0
