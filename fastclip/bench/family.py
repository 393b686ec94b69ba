"""The contrastive-family benchmark: fused ``info_nce_loss`` against the materialized MNRL computation.

``fastclip bench loss --loss mnrl`` (or ``python -m fastclip.bench.family``). The baseline is the
computation sentence-transformers' ``MultipleNegativesRankingLoss`` performs (``cos_sim`` of the
queries against all positives and hard negatives, times the scale, cross-entropy): it builds the
n x n(1+K) score matrix. Inputs: queries, positives and K hard-negative groups (B, D) requiring grad,
scale 20. Per configuration: one profiled forward+backward per provider for the peak extra memory
(``fastclip.bench.memory``), then timed forward+backward iterations interleaved between providers so
that a shared machine slows them alike. A provider whose estimated peak exceeds the machine's free
memory is recorded as "not run" with the estimate, never started (it would be killed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from fastclip.bench import report, timing
from fastclip.bench.memory import peak_extra_bytes

PROVIDERS = ("fastclip-torch", "fastclip-triton", "materialized")
SCALE = 20.0
# "mnrl": MultipleNegativesRankingLoss (query->document). "all": every direction, duplicate ids (pairs
# share an id with probability ~1/2: ids drawn from B/2 values) and the in-batch-negatives hardness
# shift; its materialized baseline is fastclip.reference_family.info_nce_reference (dense masks).
VARIANTS = ("mnrl", "all")
ALL_OPTIONS = dict(
    directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
    hardness="in_batch_negatives",
    hardness_strength=1.0,
)


def materialized_mnrl(q, p, negs, scale=SCALE):
    """sentence-transformers' MNRL maths, materialized: (B, B(1+K)) scores, cross-entropy."""
    docs = torch.cat([p, *negs], 0)
    scores = scale * (F.normalize(q, p=2, dim=-1) @ F.normalize(docs, p=2, dim=-1).T)
    return F.cross_entropy(scores, torch.arange(q.shape[0], device=q.device))


def _ids(batch: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(1)
    return torch.randint(0, max(1, batch // 2), (batch,), generator=g, device=device)


def _all_kwargs(q, negs) -> dict:
    """The "all" variant's keyword arguments (ids shared by queries, documents and negatives)."""
    ids = _ids(q.shape[0], q.device)
    return dict(
        scale=SCALE,
        query_ids=ids,
        doc_ids=ids,
        negative_ids=[ids] * len(negs) if negs else None,
        **ALL_OPTIONS,
    )


def _provider(name, device, variant="mnrl"):
    if name == "materialized" and variant == "mnrl":
        return materialized_mnrl, ""
    if name == "materialized":
        from fastclip.reference_family import info_nce_reference

        return (lambda q, p, negs: info_nce_reference(q, p, negs, **_all_kwargs(q, negs))), ""
    from fastclip.functional import info_nce_loss

    impl = "torch" if name == "fastclip-torch" else "triton"
    if impl == "triton" and device.type != "cuda":
        return None, "needs a CUDA device"
    if variant == "mnrl":
        return (lambda q, p, negs: info_nce_loss(q, p, negs, scale=SCALE, impl=impl)), ""
    return (lambda q, p, negs: info_nce_loss(q, p, negs, impl=impl, **_all_kwargs(q, negs))), ""


def estimated_peak_bytes(name: str, batch: int, dim: int, k: int, itemsize: int = 4, variant="mnrl") -> int:
    """A lower bound of the provider's peak extra memory: the materialized scores, their softmax and
    their gradient (three B x B(1+K) fp32 matrices; "all": both row groups' B x B(2+K) scores and their
    masks); the fused loss's gradients and one chunk."""
    cols = batch * (1 + k)
    if name == "materialized":
        return 3 * batch * cols * 4 if variant == "mnrl" else 2 * 4 * batch * (cols + batch) * 4
    return (batch + cols) * dim * 4 * 2 + 2**24 * 4 * 2


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _inputs(batch, dim, k, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    return [
        torch.randn(batch, dim, generator=g, device=device).to(dtype).requires_grad_() for _ in range(k + 2)
    ]


def run_family_bench(
    providers, batch, dim, negatives, dtype_name, device, *, repeats=3, log=print, variant="mnrl"
) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    records = []
    for k in negatives:
        ts = _inputs(batch, dim, k, dtype, device)

        def reset(ts=ts):
            for t in ts:
                t.grad = None

        def call(fn, ts=ts):
            return fn(ts[0], ts[1], ts[2:])

        fns, skipped = {}, {}
        for name in providers:
            fn, reason = _provider(name, device, variant)
            est = estimated_peak_bytes(name, batch, dim, k, variant=variant)
            if fn is not None and device.type == "cpu" and est > 0.9 * _available_bytes():
                fn, reason = (
                    None,
                    f"not run: needs at least {est / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} GiB free",
                )
            if fn is None:
                log(f"B={batch} K={k} {name}: {reason}")
                skipped[name] = reason
            else:
                fns[name] = fn
        peaks, samples = {}, {name: [] for name in fns}
        for name, fn in fns.items():
            reset()
            peaks[name], _ = peak_extra_bytes(lambda fn=fn: call(fn).backward(), device)
            log(f"B={batch} K={k} {name}: peak extra memory {peaks[name] / 2**20:.1f} MiB")
        for it in range(repeats):
            for name, fn in fns.items():
                samples[name] += timing.time_iterations(
                    lambda fn=fn: call(fn), lambda out: out.backward(), reset, device, 1
                )
                log(f"B={batch} K={k} {name}: iteration {it + 1}/{repeats}: {samples[name][-1][2]:.0f} ms")
        reset()
        for name in providers:
            rec = {key: None for key in (*report.REQUIRED_RECORD_KEYS, "repeats", "message")}
            rec.update(
                loss="mnrl",
                provider=name,
                batch=batch,
                dim=dim,
                dtype=dtype_name,
                negatives=k,
                variant=variant,
            )
            if name in skipped:
                rec.update(status="skipped", message=skipped[name])
            else:
                total = [s[2] for s in samples[name]]
                rec.update(
                    status="ok", fwd_ms=statistics.median(s[0] for s in samples[name]),
                    bwd_ms=statistics.median(s[1] for s in samples[name]), fwd_bwd_ms=statistics.median(total),
                    fwd_bwd_ms_min=min(total), fwd_bwd_ms_max=max(total), peak_mem_bytes=int(peaks[name]),
                    repeats=len(total), message=f"K={k} hard negatives per row, variant {variant}",
                )  # fmt: skip
            records.append(rec)
    return {
        "device": timing.device_description(device),
        **timing.versions(),
        "date": timing.utc_now(),
        "matmul_tflops": None,
        "records": records,
    }


def ratio_lines(records, baseline="materialized") -> list[str]:
    out = []
    for r in records:
        if r["provider"] == baseline or r["status"] != "ok":
            continue
        base = next(
            (
                b
                for b in records
                if b["provider"] == baseline and b["negatives"] == r["negatives"] and b["batch"] == r["batch"]
            ),
            None,
        )
        if base is None or base["status"] != "ok":
            why = base["message"] if base else "no baseline"
            out.append(
                f"B={r['batch']} K={r['negatives']} {r['provider']}: {r['fwd_bwd_ms']:.0f} ms, peak extra "
                f"{r['peak_mem_bytes'] / 2**20:.0f} MiB; {baseline}: {why}"
            )
            continue
        out.append(
            f"B={r['batch']} K={r['negatives']} {r['provider']} / {baseline}: time {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x "
            f"({r['fwd_bwd_ms']:.0f} / {base['fwd_bwd_ms']:.0f} ms), peak extra memory "
            f"{100 * r['peak_mem_bytes'] / base['peak_mem_bytes']:.1f}% "
            f"({r['peak_mem_bytes'] / 2**20:.0f} / {base['peak_mem_bytes'] / 2**20:.0f} MiB)"
        )
    return out


def negatives_list(text: str) -> list[int]:
    """``0,1,7`` -> [0, 1, 7] (ints >= 0); argparse reports the error."""
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        out = []
    if not out or any(k < 0 for k in out):
        raise argparse.ArgumentTypeError(f"expected ints >= 0 separated by commas, got {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", default="fastclip-torch,materialized", help=f"comma list of {PROVIDERS}")
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument(
        "--negatives", type=negatives_list, default=[0, 1, 7], help="hard negatives per row, comma list"
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per provider")
    p.add_argument(
        "--variant", default="mnrl", choices=VARIANTS,
        help="mnrl: query->document; all: every direction, duplicate ids, in-batch hardness shift",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="write the JSON result document here")


def run_from_args(args: argparse.Namespace) -> int:
    device = timing.resolve_device(args.device)
    providers = [v.strip() for v in args.providers.split(",") if v.strip()]
    for name in providers:
        if name not in PROVIDERS:
            print(f"providers: expected names from {PROVIDERS}, got {name!r}", file=sys.stderr)
            return 2
    if args.batch < 1 or args.dim < 1 or any(k < 0 for k in args.negatives) or args.repeats < 1:
        print("batch, dim, repeats: expected positive ints; negatives: ints >= 0", file=sys.stderr)
        return 2
    doc = run_family_bench(
        providers, args.batch, args.dim, args.negatives, args.dtype, device, repeats=args.repeats,
        variant=getattr(args, "variant", "mnrl"),
    )  # fmt: skip
    print(report.records_table(doc["records"]))
    print("\n".join(ratio_lines(doc["records"])))
    if args.out:
        print("wrote " + report.write_json(doc, args.out))
    return 0


def run_from_loss_args(args: argparse.Namespace) -> int:
    """``fastclip bench loss --loss mnrl`` with the loss options (first value of ``--batch``/``--dim``/
    ``--dtype``; ``--negatives``); the JSON goes to ``--out`` as ``mnrl_<date>_<device>.json``."""
    from fastclip.bench.loss import canonical_dtype

    ns = argparse.Namespace(
        providers=",".join(args.providers) if args.providers else "fastclip-torch,materialized",
        batch=args.batch[0] if args.batch else 16384,
        dim=args.dim[0] if args.dim else 384,
        negatives=args.negatives if args.negatives is not None else [0, 1, 7],
        dtype=canonical_dtype(args.dtype[0]) if args.dtype else "float32",
        device=args.device,
        repeats=args.repeats or 3,
        out=None,
    )
    if not args.no_save:
        tag = timing.device_tag(timing.resolve_device(args.device))
        ns.out = os.path.join(
            args.out, (args.name or report.result_stem("mnrl", tag, timing.utc_now())) + ".json"
        )
    return run_from_args(ns)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastclip.bench.family", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
