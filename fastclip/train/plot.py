"""Loss and evaluation curves of a run (matplotlib, headless).

plot_metrics("runs/a/metrics.jsonl", "runs/a/curves.png")
"""

from __future__ import annotations

import os

from fastclip.train.metrics import read_rows


def plot_metrics(metrics_path: str, png_path: str) -> str | None:
    """Loss and evaluation curves from a metrics.jsonl file -> a PNG (None when there is nothing to plot)."""
    if not os.path.isfile(metrics_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, _ = read_rows(metrics_path)  # unreadable lines are left out
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if any(k.endswith(("top1", "_r1")) for k in r)]
    if not train_rows and not eval_rows:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if train_rows:
        a.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=1.2)
    a.set(xlabel="step", ylabel="training loss", title="loss")
    a.grid(alpha=0.3)
    keys = [
        k
        for k in ("zeroshot_top1", "zeroshot_top5", "seen_zeroshot_top1", "i2t_r1", "t2i_r1")
        if any(k in r for r in eval_rows)
    ]
    for k in keys:
        pts = [(r["step"], r[k]) for r in eval_rows if k in r]
        b.plot(*zip(*pts), marker="o", ms=3, label=k)
    chance = next((r["zeroshot_chance"] for r in eval_rows if "zeroshot_chance" in r), None)
    if chance is not None:
        b.axhline(chance, color="gray", ls="--", lw=1, label="chance")
    b.set(xlabel="step", ylabel="accuracy / recall", title="evaluation", ylim=(0, 1))
    b.grid(alpha=0.3)
    if keys:
        b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
