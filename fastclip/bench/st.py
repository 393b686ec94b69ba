"""``fastclip bench st``: the loss stage alone (embeddings given) of sentence-transformers' MNRL
classes against fastclip's drop-in, side by side in one run.

Providers (forward + backward to the embeddings, the same inputs):

* ``fastclip``: ``fastclip.integrations.sentence_transformers.MultipleNegativesRankingLoss``'s
  ``compute_loss_from_embeddings`` (the cached drop-in's ``calculate_loss`` is the same one fused call);
* ``st_mnrl``: sentence-transformers' ``MultipleNegativesRankingLoss.compute_loss_from_embeddings``
  (the B x B·(1+K) scores materialized);
* ``st_cached``: sentence-transformers' ``CachedMultipleNegativesRankingLoss.calculate_loss(...,
  with_backward=True)`` on the mini-batched embeddings (``mini_batch_size`` row chunks of the scores,
  a backward per chunk) -- the loss stage of its GradCache step (2).

Time: median wall seconds (min and max beside it) of ``reps`` calls after ``warmup`` calls. Memory: the
peak *extra* bytes of one call (:func:`fastclip.bench.memory.peak_extra_bytes`: the profiler's
allocation replay on CPU), which includes the embeddings' gradients (every provider produces them).
Results: ``<out>/st_loss_stage_<date>_<device>.json`` and ``.log``.

    fastclip bench st                                   # B=16384, D=384, K=0,1, fp32, CPU
    fastclip bench st --batch 4096 --negatives 0 --reps 2
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from typing import Callable

import torch

PROVIDERS = ("fastclip", "st_mnrl", "st_cached")


def _dummy_model():
    # The loss classes keep a model for their embedding passes; the loss stage never calls it.
    return torch.nn.Sequential(torch.nn.Identity())


def make_step(
    provider: str, embeddings: list[torch.Tensor], mini_batch_size: int
) -> Callable[[], torch.Tensor]:
    """A callable running one forward + backward of ``provider``'s loss stage on ``embeddings``."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    from fastclip.integrations import sentence_transformers as fc

    leaves = [e.detach().clone().requires_grad_() for e in embeddings]
    if provider in ("fastclip", "st_mnrl"):
        ns = fc if provider == "fastclip" else st_losses
        loss = ns.MultipleNegativesRankingLoss(_dummy_model())

        def step():
            for t in leaves:
                t.grad = None
            value = loss.compute_loss_from_embeddings(leaves, None)
            value.backward()
            return value.detach()

        return step
    if provider == "st_cached":
        loss = st_losses.CachedMultipleNegativesRankingLoss(_dummy_model(), mini_batch_size=mini_batch_size)
        reps = [[c.detach().requires_grad_() for c in e.detach().split(mini_batch_size)] for e in embeddings]

        def step():
            for column in reps:
                for t in column:
                    t.grad = None
            return loss.calculate_loss(reps, None, with_backward=True)

        return step
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def run_bench(
    batch: int = 16384,
    dim: int = 384,
    negatives=(0, 1),
    providers=PROVIDERS,
    reps: int = 3,
    mini_batch_size: int = 32,
    seed: int = 0,
    log=print,
    warmup: int = 1,
    big_batch: int | None = None,
    big_negatives: int = 1,
) -> dict:
    from fastclip.bench.memory import peak_extra_bytes
    from fastclip.bench.timing import device_description, utc_now, versions

    device = torch.device("cpu")
    records = []
    for k in negatives:
        g = torch.Generator().manual_seed(seed)
        embeddings = [torch.randn(batch, dim, generator=g) for _ in range(2 + k)]  # (B, D) per column
        losses = {}
        for provider in providers:
            step = make_step(provider, embeddings, mini_batch_size)
            for _ in range(warmup):
                step()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            peak, value = peak_extra_bytes(step, device)
            losses[provider] = value.item()
            times.sort()
            rec = {
                "provider": provider,
                "batch": batch,
                "dim": dim,
                "negatives": k,
                "dtype": "float32",
                "median_s": times[len(times) // 2],
                "min_s": times[0],
                "max_s": times[-1],
                "reps": reps,
                "warmup": warmup,
                "peak_extra_bytes": int(peak),
                "loss": value.item(),
            }
            if provider == "st_cached":
                rec["mini_batch_size"] = mini_batch_size
            records.append(rec)
            log(f"B={batch} D={dim} K={k} {provider:10s} {rec['median_s']:8.3f} s "
                f"[{rec['min_s']:.3f}, {rec['max_s']:.3f}]  peak {peak / 2**20:9.1f} MiB  loss {value.item():.6f}")  # fmt: skip
        ref = losses.get("st_mnrl")
        if ref is not None:
            for provider, v in losses.items():
                if abs(v - ref) > 1e-4 * max(1.0, abs(ref)):
                    log(f"WARNING K={k}: {provider} loss {v} differs from st_mnrl's {ref}")
    if big_batch:
        records += _big_batch(records, big_batch, dim, big_negatives, mini_batch_size, seed, log)
    import sentence_transformers

    return {
        "kind": "st_loss_stage",
        "date": utc_now(),
        "device": device_description(device),
        "versions": {**versions(), "sentence_transformers": sentence_transformers.__version__},
        "records": records,
    }


def _big_batch(records, batch, dim, k, mini_batch_size, seed, log) -> list[dict]:
    """fastclip alone at ``batch`` (one call: time and peak), beside sentence-transformers' MNRL peak
    *estimated* from its measured one, scaled by (batch / measured batch)^2 (its B x B(1+K) score
    matrices dominate): the batch at which the materialized loss cannot run where fastclip does."""
    from fastclip.bench.memory import peak_extra_bytes

    measured = [r for r in records if r["provider"] == "st_mnrl" and r["negatives"] == k]
    g = torch.Generator().manual_seed(seed)
    embeddings = [torch.randn(batch, dim, generator=g) for _ in range(2 + k)]
    step = make_step("fastclip", embeddings, mini_batch_size)
    t0 = time.perf_counter()
    peak, value = peak_extra_bytes(step, torch.device("cpu"))
    seconds = time.perf_counter() - t0
    rec = {"provider": "fastclip", "batch": batch, "dim": dim, "negatives": k, "dtype": "float32",
           "median_s": seconds, "min_s": seconds, "max_s": seconds, "reps": 1, "peak_extra_bytes": int(peak),
           "loss": value.item(), "big_batch": True, "time_includes_profiler": True}  # fmt: skip
    if measured:
        m = measured[0]
        rec["st_mnrl_estimated_peak_bytes"] = int(m["peak_extra_bytes"] * (batch / m["batch"]) ** 2)
    est = rec.get("st_mnrl_estimated_peak_bytes")
    log(f"B={batch} D={dim} K={k} fastclip   {seconds:8.1f} s (one call, under the profiler)  peak "
        f"{peak / 2**20:9.1f} MiB  loss {value.item():.6f}; ST MNRL estimated peak "
        + (f"{est / 2**30:.1f} GiB" if est else "(not measured at this K)"))  # fmt: skip
    return [rec]


def ratio_table(records: list[dict]) -> str:
    """Markdown rows: per K, each provider's time and peak against sentence-transformers' MNRL."""
    lines = [
        "| loss stage (B, D, K) | provider | fwd+bwd time | vs ST MNRL | peak extra memory | vs ST MNRL |",
        "|---|---|---|---|---|---|",
    ]
    by_k: dict = {}
    big = [r for r in records if r.get("big_batch")]
    for r in records:
        if not r.get("big_batch"):
            by_k.setdefault(r["negatives"], {})[r["provider"]] = r
    names = {"fastclip": "fastclip (drop-in)", "st_mnrl": "ST MultipleNegativesRankingLoss",
             "st_cached": "ST CachedMNRL loss stage"}  # fmt: skip
    for k, group in by_k.items():
        ref = group.get("st_mnrl")
        for provider, r in group.items():
            t = f"{r['median_s']:.2f} s"
            m = f"{r['peak_extra_bytes'] / 2**20:.0f} MiB"
            tr = f"{r['median_s'] / ref['median_s']:.2f}x" if ref else "-"
            mr = f"{100 * r['peak_extra_bytes'] / ref['peak_extra_bytes']:.1f}%" if ref else "-"
            label = names.get(provider, provider)
            if provider == "st_cached":
                label += f" (mini_batch_size={r['mini_batch_size']})"
            lines.append(f"| {r['batch']}, {r['dim']}, {k} | {label} | {t} | {tr} | {m} | {mr} |")
    for r in big:
        est = r.get("st_mnrl_estimated_peak_bytes")
        lines.append(f"| {r['batch']}, {r['dim']}, {r['negatives']} | fastclip (drop-in), one call | "
                     f"{r['median_s']:.1f} s | - | {r['peak_extra_bytes'] / 2**20:.0f} MiB | "
                     + (f"ST MNRL est. {est / 2**30:.1f} GiB |" if est else "- |"))  # fmt: skip
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=16384, help="rows B (default 16384)")
    p.add_argument("--dim", type=int, default=384, help="embedding dim D (default 384, MiniLM's)")
    p.add_argument("--negatives", default="0,1", help="hard negatives per row K, comma list (default 0,1)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list of {', '.join(PROVIDERS)}")
    p.add_argument("--reps", type=int, default=3, help="timed calls per provider (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument(
        "--mini-batch-size", type=int, default=32, help="st_cached's mini_batch_size (ST's default 32)"
    )
    p.add_argument("--big-batch", type=int, help="also run fastclip alone once at this batch, beside ST's "
                   "MNRL peak estimated from the measured one (x (big/B)^2)")  # fmt: skip
    p.add_argument("--big-negatives", type=int, default=1, help="K of the --big-batch run (default 1)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="results folder")
    p.add_argument("--no-save", action="store_true", help="print only")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        negatives = [int(v) for v in str(args.negatives).split(",") if v.strip()]
        providers = [v.strip() for v in str(args.providers).split(",") if v.strip()]
    except ValueError:
        print(f"fastclip bench st: --negatives: expected ints, got {args.negatives!r}", file=sys.stderr)
        return 2
    bad = [p for p in providers if p not in PROVIDERS]
    checks = [
        (bad, f"--providers: expected some of {PROVIDERS}, got {bad}"),
        (args.batch < 1 or args.dim < 1 or args.reps < 1 or args.mini_batch_size < 1,
         "--batch, --dim, --reps, --mini-batch-size: expected positive ints"),
        (any(k < 0 for k in negatives) or not negatives, f"--negatives: expected ints >= 0, got {negatives}"),
    ]  # fmt: skip
    for failed, message in checks:
        if failed:
            print(f"fastclip bench st: {message}", file=sys.stderr)
            return 2
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        print(
            "fastclip bench st: needs sentence-transformers (pip install 'fastclip-contrastive[st]')",
            file=sys.stderr,
        )
        return 2
    buf = io.StringIO()

    def log(line: str) -> None:
        print(line, flush=True)
        buf.write(line + "\n")

    log(f"fastclip bench st: B={args.batch} D={args.dim} K={negatives} providers={providers} reps={args.reps} "
        f"threads={torch.get_num_threads()}")  # fmt: skip
    if args.warmup < 0:
        print("fastclip bench st: --warmup: expected an int >= 0", file=sys.stderr)
        return 2
    if args.big_batch is not None and (args.big_batch < 1 or args.big_negatives < 0):
        print(
            "fastclip bench st: --big-batch: expected a positive int, --big-negatives >= 0", file=sys.stderr
        )
        return 2
    doc = run_bench(args.batch, args.dim, negatives, providers, args.reps, args.mini_batch_size, log=log,
                    big_batch=args.big_batch, warmup=args.warmup, big_negatives=args.big_negatives)  # fmt: skip
    log("")
    log(ratio_table(doc["records"]))
    if not args.no_save:
        os.makedirs(args.out, exist_ok=True)
        stamp = doc["date"].replace("-", "").replace(":", "")[:13]
        stem = os.path.join(args.out, f"st_loss_stage_{stamp}_cpu")
        with open(stem + ".json", "w") as f:
            json.dump(doc, f, indent=2)
        with open(stem + ".log", "w") as f:
            f.write(buf.getvalue())
        print(f"wrote {stem}.json, {stem}.log")
    return 0 if doc["records"] and all(math.isfinite(r["loss"]) for r in doc["records"]) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastclip bench st", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
