"""The distillation-loss benchmark: fastclip's fused ``DistillClipLoss`` against open_clip's materialized one.

``fastclip bench loss --loss distill`` (or ``python -m fastclip.bench.distill``). Same inputs for every
provider: student features (B, D) that require grad, teacher features (B, D) that do not (as open_clip's
training loop computes the teacher under ``torch.no_grad()``; ``--teacher-grad`` makes them require
grad too), scales 1/0.07 (student) and 1/0.05 (teacher). Per provider: one profiled forward+backward
for the peak extra memory (``fastclip.bench.memory``), then timed forward+backward iterations,
interleaved between providers on CPU so that a shared machine slows them alike. Records follow the
loss benchmark's schema (``loss="distill"``); the ratio to open_clip is printed and stored.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from fastclip.bench import report, timing
from fastclip.bench.memory import peak_extra_bytes

PROVIDERS = ("fastclip-torch", "fastclip-triton", "open_clip", "reference")
STUDENT_SCALE, TEACHER_SCALE = 1.0 / 0.07, 1.0 / 0.05


def _provider(name: str, device: torch.device):
    """``fn(x, y, s, xt, yt, t) -> (contrastive, distill)``, or None with the reason it cannot run."""
    if name == "open_clip":
        from fastclip.bench.providers import load_open_clip_loss

        module = load_open_clip_loss()
        return (
            (None, "open_clip_torch is not installed") if module is None else (module.DistillClipLoss(), "")
        )
    from fastclip.losses_distill import DistillClipLoss

    impl = {"fastclip-torch": "torch", "fastclip-triton": "triton", "reference": "reference"}[name]
    if impl == "triton" and device.type != "cuda":
        return None, "needs a CUDA device"
    return DistillClipLoss(impl=impl), ""


def _inputs(batch, dim, dtype, device, teacher_grad):
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for k in range(4):
        t = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, device=device), dim=-1).to(
            dtype
        )
        out.append(t.requires_grad_(k < 2 or teacher_grad))
    x, y, xt, yt = out
    s = torch.tensor(STUDENT_SCALE, device=device, requires_grad=True)
    t = torch.tensor(TEACHER_SCALE, device=device, requires_grad=teacher_grad)
    return [x, y, s, xt, yt, t]


def run_distill_bench(
    providers, batch: int, dim: int, dtype_name: str, device: torch.device, *, repeats: int = 3,
    teacher_grad: bool = False, log=print,
) -> dict:  # fmt: skip
    """One configuration, every provider; returns the result document (``fastclip.bench.report`` schema)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
    inputs = _inputs(batch, dim, dtype, device, teacher_grad)

    def reset():
        for t in inputs:
            t.grad = None

    fns, records = {}, []
    for name in providers:
        fn, reason = _provider(name, device)
        if fn is None:
            log(f"skipping provider {name}: {reason}")
        else:
            fns[name] = fn
    peaks, samples = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        reset()
        peaks[name], _ = peak_extra_bytes(lambda fn=fn: sum(fn(*inputs)).backward(), device)
        log(f"{name}: peak extra memory {peaks[name] / 2**20:.1f} MiB")
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name] += timing.time_iterations(
                lambda fn=fn: sum(fn(*inputs)), lambda out: out.backward(), reset, device, 1
            )
    reset()
    for name in fns:
        total = [s[2] for s in samples[name]]
        rec = {k: None for k in (*report.REQUIRED_RECORD_KEYS, "repeats", "message")}
        rec.update(
            loss="distill", provider=name, batch=batch, dim=dim, dtype=dtype_name, status="ok",
            fwd_ms=statistics.median(s[0] for s in samples[name]),
            bwd_ms=statistics.median(s[1] for s in samples[name]),
            fwd_bwd_ms=statistics.median(total), fwd_bwd_ms_min=min(total), fwd_bwd_ms_max=max(total),
            peak_mem_bytes=int(peaks[name]), repeats=len(total),
            message="teacher requires grad" if teacher_grad else "teacher without grad",
        )  # fmt: skip
        records.append(rec)
    return {
        "device": timing.device_description(device),
        **timing.versions(),
        "date": timing.utc_now(),
        "matmul_tflops": None,
        "records": records,
    }


def ratio_lines(records: list[dict], baseline: str = "open_clip") -> list[str]:
    base = next((r for r in records if r["provider"] == baseline), None)
    if base is None:
        return []
    out = []
    for r in records:
        if r["provider"] == baseline:
            continue
        out.append(
            f"{r['provider']} / {baseline}: time {r['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}x, "
            f"peak extra memory {100 * r['peak_mem_bytes'] / base['peak_mem_bytes']:.1f}%"
        )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", default="fastclip-torch,open_clip", help=f"comma list of {PROVIDERS}")
    p.add_argument("--batch", type=int, default=16384)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations per provider")
    p.add_argument("--teacher-grad", action="store_true", help="teacher features require grad too")
    p.add_argument("--out", default=None, help="write the JSON result document here")


def run_from_args(args: argparse.Namespace) -> int:
    device = timing.resolve_device(args.device)
    providers = [v.strip() for v in args.providers.split(",") if v.strip()]
    for name in providers:
        if name not in PROVIDERS:
            print(f"providers: expected names from {PROVIDERS}, got {name!r}", file=sys.stderr)
            return 2
    doc = run_distill_bench(
        providers,
        args.batch,
        args.dim,
        args.dtype,
        device,
        repeats=args.repeats,
        teacher_grad=args.teacher_grad,
    )
    print(report.records_table(doc["records"]))
    print("\n".join(ratio_lines(doc["records"])))
    if args.out:
        print("wrote " + report.write_json(doc, args.out))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastclip.bench.distill", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())


def run_from_loss_args(args: argparse.Namespace) -> int:
    """``fastclip bench loss --loss distill`` with the loss options (``--providers``, ``--batch``, ``--dim``, ``--dtype``, ``--repeats``):
    the first value of each list option; the JSON goes to ``--out`` as ``distill_<date>_<device>.json``."""
    import os

    from fastclip.bench.loss import canonical_dtype

    ns = argparse.Namespace(
        providers=",".join(args.providers) if args.providers else "fastclip-torch,open_clip",
        batch=args.batch[0] if args.batch else 16384,
        dim=args.dim[0] if args.dim else 256,
        dtype=canonical_dtype(args.dtype[0]) if args.dtype else "float32",
        device=args.device,
        repeats=args.repeats or 3,
        teacher_grad=False,
        out=None,
    )
    if not args.no_save:
        tag = timing.device_tag(timing.resolve_device(args.device))
        ns.out = os.path.join(
            args.out, (args.name or report.result_stem("distill", tag, timing.utc_now())) + ".json"
        )
    return run_from_args(ns)
