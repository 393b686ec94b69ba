"""Plots drawn from a result document: forward+backward time and peak extra memory against the batch.

One panel per (loss, dtype, dim), one line per provider, log-log axes; points that ran out of memory
are marked with an "x" on the panel's lower edge so a missing line is never silent.
"""

from __future__ import annotations

import os

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
METRICS = {
    "time": ("fwd_bwd_ms", "forward+backward, ms (median; bars: min-max)"),
    "memory": ("peak_mem_bytes", "peak extra memory, MiB"),
}


def plot_document(doc: dict, stem: str, metrics: tuple[str, ...] = ("time", "memory")) -> list[str]:
    """Write ``{stem}_{metric}.png`` for each metric; returns the paths written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"metrics: expected names from {tuple(METRICS)}, got {m!r}")
    records = doc["records"]
    panels = sorted({(r["loss"], r["dtype"], r["dim"]) for r in records})
    providers = list(dict.fromkeys(r["provider"] for r in records))
    if not panels:
        return []
    os.makedirs(os.path.dirname(os.path.abspath(stem)) or ".", exist_ok=True)
    paths = []
    for metric in metrics:
        key, ylabel = METRICS[metric]
        ncols = 2 if len(panels) == 4 else min(len(panels), 3)
        nrows = (len(panels) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
        for ax, (loss, dtype, dim) in zip(axes.flat, panels):
            for i, prov in enumerate(providers):
                recs = sorted(
                    (
                        r
                        for r in records
                        if (r["loss"], r["dtype"], r["dim"], r["provider"]) == (loss, dtype, dim, prov)
                    ),
                    key=lambda r: r["batch"],
                )
                ok = [r for r in recs if r["status"] == "ok" and r[key]]
                color = f"C{i}"
                if ok:
                    xs = [r["batch"] for r in ok]
                    ys = [_scale(metric, r[key]) for r in ok]
                    if metric == "time":
                        lo = [y - r["fwd_bwd_ms_min"] for y, r in zip(ys, ok)]
                        hi = [r["fwd_bwd_ms_max"] - y for y, r in zip(ys, ok)]
                        ax.errorbar(
                            xs, ys, yerr=[lo, hi], marker="o", ms=3, color=color, label=prov, capsize=2
                        )
                    else:
                        ax.plot(xs, ys, marker="o", ms=3, color=color, label=prov)
                oom = [r["batch"] for r in recs if r["status"] == "oom"]
                if oom:
                    ax.plot(oom, [None] * len(oom))  # keeps the x range
                    ax.scatter(oom, [0.0] * len(oom), marker="x", color=color, transform=ax.get_xaxis_transform(),
                               clip_on=False, label=f"{prov}: out of memory" if not ok else None)  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{loss}, {SHORT_DTYPE.get(dtype, dtype)}, D={dim}")
            ax.set_xlabel("batch B")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.suptitle(f"{doc.get('device', '')} — {doc.get('date', '')}", fontsize=9)
        fig.tight_layout()
        path = f"{stem}_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _scale(metric: str, value: float | None) -> float | None:
    if value is None:
        return None
    return value / 2**20 if metric == "memory" else value
