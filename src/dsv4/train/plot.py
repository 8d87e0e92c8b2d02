"""`dsv4 plot RUN_DIR`: loss curve and per-layer expert load from a run's metrics.jsonl, as PNG (matplotlib, Agg).

Writes `loss.png` (train loss, CE, MTP CE and held-out CE against step) and `expert_load.png` (one heat-map row per
routed layer: the share of routed tokens each expert received in the last logged step, relative to a uniform share).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    p = p / "metrics.jsonl" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"no metrics log at {p}; pass a training output dir (with metrics.jsonl)")
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_loss(records: list[dict], out: str | Path, title: str = "dsv4 training") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if r.get("eval_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        steps = [r["step"] for r in train]
        ax.plot(steps, [r["ce"] for r in train], label="train CE (next token)", lw=1.4)
        if any(r.get("mtp") for r in train):
            ax.plot(steps, [r["mtp"] for r in train], label="train CE (MTP, token after next)", lw=1.0, alpha=0.8)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out CE", ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_expert_load(records: list[dict], out: str | Path) -> Path | None:
    loads = [r["expert_load"] for r in records if r.get("expert_load")]
    if not loads:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    last = loads[-1]
    keys = sorted(last)
    mat = np.array([np.asarray(last[k], dtype=float) / max(1e-9, np.mean(last[k])) for k in keys])
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(keys)), dpi=110)
    im = ax.imshow(mat, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
    ax.set_yticks(range(len(keys)), keys, fontsize=7)
    ax.set_xlabel("routed expert")
    ax.set_title("expert load / uniform share (last logged step)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv4 plot", description="render loss curve and expert load PNGs from a run")
    p.add_argument("run", type=Path, help="training output dir (or its metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None, help="output dir (default: the run dir)")
    args = p.parse_args(argv)
    try:
        records = read_metrics(args.run)
    except FileNotFoundError as e:
        p.error(str(e))
    out = args.out or (args.run if args.run.is_dir() else args.run.parent)
    out.mkdir(parents=True, exist_ok=True)
    print(plot_loss(records, out / "loss.png"))
    load = plot_expert_load(records, out / "expert_load.png")
    if load is not None:
        print(load)
    return 0
