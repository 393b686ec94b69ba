"""The parts of ``benchmarks/device_check.sh``, one per call: ``python benchmarks/device_check.py PART OUT``.

PART is one of ``env``, ``correctness``, ``target``, ``phases``, ``million`` and, only when named,
``vit``. Each part
writes ``OUT/part_<PART>.json`` (rewritten as it goes, so a part stopped by its time limit still
leaves what it measured) and stops starting new work ``--seconds`` after it began. ``target`` also
writes ``OUT/results.json`` in the result-file schema of ``fastclip.bench.report`` (plus a CSV).
The summary of what the parts wrote, and unpacking a ``--bundle`` archive where the results come
back to: ``benchmarks/device_report.py``.

``--dry-run``: the same code on CPU with the Triton interpreter and tiny sizes (CI runs it), so the
GPU time goes to measuring. Sizes on a GPU: the targets of docs/kernels.md (B = 32768 and 2**20, D = 768, bf16).

(About 500 lines: the parts share the time-limit, logging and record helpers at the top and are
read as one procedure, in the order the shell script runs them.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # device_check.sh sets PYTHONSAFEPATH
from device_report import GOAL_MATMUL_FRACTION, load_part  # noqa: E402

PARTS = ("env", "correctness", "target", "phases", "million")
WORKER_PARTS = ("cases",)  # started by "correctness", one process per precision
EXTRA_PARTS = ("vit", "family")  # run only when named (device_check.sh --parts)
# Sizes: (GPU, dry run on CPU).
SIZES = {
    "target": ((32768, 768), (256, 32)),
    "phases": ((32768, 768), (256, 32)),
    "million": ((2**20, 768), (1024, 16)),
    "repeat": ((16387, 768), (130, 33)),
    "matmul": (8192, 256),
    "family": ((16384, 768), (96, 24)),
}


def _sizes(name: str, dry: bool):
    return SIZES[name][1 if dry else 0]


class Part:
    """Writes ``part_<name>.json`` after every step; knows how much of its time is left."""

    def __init__(self, name: str, out: str, seconds: float, dry: bool):
        self.name, self.out, self.dry = name, out, dry
        self.start = time.perf_counter()
        self.deadline = self.start + seconds
        self.data: dict = {"part": name, "dry_run": dry, "status": "running", "limit_s": seconds}
        self.save()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self, **update) -> None:
        self.data.update(update, seconds=round(time.perf_counter() - self.start, 2))
        path = os.path.join(self.out, f"part_{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


def _device(dry: bool):
    import torch

    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a machine without a GPU")
    return torch.device("cuda")


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for fp32 matmuls through whichever precision API this torch has."""
    import torch

    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = enabled
        try:
            yield
        finally:
            m.allow_tf32 = old


# ----------------------------------------------------------------------------------------------------
# parts


def part_env(p: Part) -> None:
    import importlib.metadata as md
    import platform

    import torch
    from fastclip.kernels import common, config, gemm

    from fastclip.bench import timing

    device = _device(p.dry)
    versions = {"python": platform.python_version()}
    for dist in ("torch", "triton", "numpy", "fastclip", "inf-cl", "open_clip_torch", "pytest"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    info = {"versions": versions, "device": timing.device_description(device), "clocks": timing.gpu_clocks()}
    import fastclip.kernels  # binds fastclip too

    info["imported_from"] = {"fastclip": fastclip.__file__, "fastclip.kernels": fastclip.kernels.__file__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            capability=list(torch.cuda.get_device_capability(device)), sms=props.multi_processor_count
        )
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    info["kernel_arch"] = config.arch(device)
    info["interpreter"] = config.interpreting()
    info["paths"] = {
        str(dt).split(".")[-1]: {"dot": common.dot_path(dt), "gemm": gemm.gemm_path(device, dt)}
        for dt in (torch.bfloat16, torch.float16, torch.float32)
    }
    p.save(status="ok", **info)


PRECISIONS = [("float32", False), ("float32", True), ("bfloat16", False), ("float16", False)]


def _correctness_cases(group: int, dry: bool) -> list:
    """The kernel cases of one precision (``PRECISIONS[group]``); they compile in their own process."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_kernels as tk  # noqa: E402  (the test helpers: same budgets as the test suite)

    dname, tf = PRECISIONS[group]
    blocks = tk.BLOCKS if not dry else [(7, 7, 3, 0), (70, 130, 33, 5), (130, 70, 33, -3)]
    cases = [(loss, block, dname, tf, {}) for block in blocks for loss in ("clip", "siglip")]
    # Forced row chunks x column panels and column splits (the merge paths).
    if dname == "float32" and not tf:
        cases.append(("clip", (257, 230, 40, -3), dname, tf, {"rows_per_chunk": 100, "splits": 2}))
    if dname == "bfloat16":
        cases.append(
            ("siglip", (257, 230, 40, -3), dname, tf, {"rows_per_chunk": 100, "cols_per_panel": 128})
        )
    return cases


def part_cases(p: Part, group: int) -> None:
    """Worker of ``correctness``: the cases of one precision against float64."""
    import torch

    cases = _correctness_cases(group, p.dry)  # also puts tests/ on sys.path
    import test_kernels as tk  # noqa: E402

    device = _device(p.dry)
    results = []
    p.save(cases=len(cases), results=results)
    for loss, block, dname, tf, kw in cases:
        rec = {"loss": loss, "block": list(block), "dtype": dname, "tf32": tf, "options": kw}
        if p.left() <= 0:
            rec.update(ok=None, error="not run: time limit")
            results.append(rec)
            continue
        t0 = time.perf_counter()
        try:
            with tf32(tf):
                dtype = getattr(torch, dname)
                if loss == "clip":
                    grad_kw = {"rows_per_chunk": kw["rows_per_chunk"]} if kw else None
                    tk._check_clip_block(*block, dtype, device=device, grad_kw=grad_kw, **kw)
                else:
                    tk._check_siglip_block(*block, dtype, device=device, **kw)
                    tk._check_siglip_block(*block, dtype, device=device, need_grad=False, bias=None, **kw)
            rec["ok"] = True
        except AssertionError as exc:
            rec.update(ok=False, error=str(exc)[:400])
        except Exception as exc:  # a crash is a failed case, recorded; the other cases still run
            rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        results.append(rec)
        p.save(results=results)
    p.save(status="ok")


def part_correctness(p: Part) -> None:
    """Every kernel against float64 (error budgets of tests/test_kernels.py), compiled on the GPU: one
    process per precision (compilation, most of this part's time, then runs on several CPU cores),
    while this process checks that both fused losses repeat bitwise."""
    import subprocess

    import torch

    workers = []
    for group in range(len(PRECISIONS)):
        cmd = [sys.executable, os.path.abspath(__file__), "cases", p.out, "--group", str(group)]
        cmd += ["--seconds", str(max(1.0, p.left() - 3))] + (["--dry-run"] if p.dry else [])
        workers.append(subprocess.Popen(cmd))
    rep = {"check": "repeat"}
    try:
        import fastclip
        from fastclip.bench.loss import make_inputs

        device = _device(p.dry)
        b, d = _sizes("repeat", p.dry)
        x, y = make_inputs(b, d, torch.bfloat16, device, seed=3)
        s = torch.tensor(50.0, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        outs = []
        for _ in range(2):
            for t in (x, y, s, bias):
                t.grad = None
            c = fastclip.clip_loss(x, y, s, impl="triton")
            g = fastclip.siglip_loss(x, y, s, bias, impl="triton")
            (c + g).backward()
            outs.append(
                [c.detach(), g.detach(), x.grad.clone(), y.grad.clone(), s.grad.clone(), bias.grad.clone()]
            )
        rep.update(batch=b, dim=d, ok=all(torch.equal(a, c) for a, c in zip(*outs)))
    except Exception as exc:
        rep.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:400])
    p.save(repeat=rep)
    for w in workers:
        try:
            w.wait(timeout=max(1.0, p.left()))
        except subprocess.TimeoutExpired:
            w.kill()
            w.wait()
    results = []
    for group in range(len(PRECISIONS)):
        part = load_part(p.out, f"cases{group}")
        got = part.get("results", [])
        results += got
        for loss, block, dname, tf, kw in _correctness_cases(group, p.dry)[len(got) :]:
            results.append({"loss": loss, "block": list(block), "dtype": dname, "tf32": tf, "options": kw,
                            "ok": None, "error": "not run: its process ended early"})  # fmt: skip
    failed = [r for r in results if r.get("ok") is False] + ([rep] if rep.get("ok") is False else [])
    skipped = [r for r in results if r.get("ok") is None]
    p.save(
        status="ok" if not failed and not skipped else "failed",
        results=results,
        repeat=rep,
        failed=len(failed),
        not_run=len(skipped),
    )


def part_target(p: Part) -> None:
    """B = 32768, D = 768, bf16, both losses: fused vs materialized reference vs Inf-CL."""
    from fastclip.bench import report, timing
    from fastclip.bench.loss import LossSweep, run_loss_sweep
    from fastclip.bench.providers import Provider

    device = _device(p.dry)
    b, d = _sizes("target", p.dry)
    t0 = time.perf_counter()
    rates = {"bxbxd": timing.gemm_tflops(device, b, b, d)}
    p.save(matmul_tflops=rates, batch=b, dim=d)
    cfg = LossSweep(
        providers=["fastclip-triton", "reference", "inf_cl"], batches=[b], dims=[d], dtypes=["bfloat16"],
        losses=["clip", "siglip"], device=str(device), warmup=2, min_repeats=5, max_repeats=20,
        time_budget_s=3.0 if not p.dry else 0.5,
        max_seconds=max(5.0, p.left() - 2 * (time.perf_counter() - t0) - 5.0),
        matmul_size=_sizes("matmul", p.dry),
    )  # fmt: skip
    extra = {}
    if p.dry:  # the bench refuses to time the interpreter; the dry run only exercises the code path
        extra["fastclip-triton"] = Provider("fastclip-triton", _fused_triton)
    doc = run_loss_sweep(cfg, progress=False, log=lambda m: print(m, flush=True), extra_providers=extra)
    rates["square"] = doc["matmul_tflops"]
    report.write_json(doc, os.path.join(p.out, "results.json"))
    report.write_csv(doc["records"], os.path.join(p.out, "results.csv"), {"device": doc["device"]})
    rows = []
    for r in doc["records"]:
        row = {k: r.get(k) for k in ("loss", "provider", "status", "fwd_bwd_ms", "tflops", "peak_mem_bytes")}
        row.update(repeats=r.get("repeats"), message=r.get("message"), kernel_path=r.get("kernel_path"))
        if r.get("tflops"):
            row["fraction_of_bxbxd_matmul"] = round(r["tflops"] / rates["bxbxd"], 4)
        rows.append(row)
    p.save(status="ok", matmul_tflops=rates, rows=rows, goal_fraction=GOAL_MATMUL_FRACTION)


def _fused_triton(loss, x, y, scale, bias):
    import fastclip

    if loss == "clip":
        return fastclip.clip_loss(x, y, scale, impl="triton")
    return fastclip.siglip_loss(x, y, scale, bias, impl="triton")


def part_phases(p: Part) -> None:
    """Per-phase times of the backward (tile kernel, dX GEMM, dY GEMM) and of the forward."""
    import torch
    from fastclip.kernels import clip, config, gemm, siglip

    from fastclip.bench.loss import make_inputs
    from fastclip.bench.timing import synchronize

    device = _device(p.dry)
    b, d = _sizes("phases", p.dry)
    x, y = make_inputs(b, d, torch.bfloat16, device)
    x, y = x.detach(), y.detach()
    s, bias = torch.tensor(1 / 0.07, device=device), torch.tensor(-10.0, device=device)
    coef = 1.0 / (2 * b)
    cfg = config.tile_config("tile", device, x.dtype, d)
    out = {
        "batch": b,
        "dim": d,
        "chunk": list(config.grad_tiles(b, b, config.GRAD_WORKSPACE_ELEMENTS, cfg.block_m, cfg.block_n)),
    }
    out["gemm_path"] = gemm.gemm_path(device, x.dtype)
    runs = {
        "clip_lse": lambda t: clip.clip_lse(x, y, s),
        "clip_grad": lambda t: clip.clip_grad(x, y, s, *lse, coef, coef, 0, 2 * coef, timer=t),
        "siglip_grad": lambda t: siglip.siglip_block(x, y, s, bias, 0, True, timer=t),
    }
    lse = clip.clip_lse(x, y, s)
    for name, fn in runs.items():
        if p.left() <= 0:
            out[name] = {"error": "not run: time limit"}
            continue
        fn(gemm.PhaseTimer.disabled())  # warm-up: compilation, cuBLAS heuristics
        synchronize(device)
        timer = gemm.PhaseTimer(device)
        t0 = time.perf_counter()
        fn(timer)
        synchronize(device)
        total = (time.perf_counter() - t0) * 1e3
        out[name] = {"total_ms": round(total, 3), **{k: round(v, 3) for k, v in timer.totals_ms().items()}}
        p.save(**out)
    p.save(status="ok", **out)


def part_million(p: Part) -> None:
    """B = 2**20, D = 768, bf16: the fused losses complete (time, memory above the inputs)."""
    import torch

    import fastclip
    from fastclip.bench.loss import make_inputs
    from fastclip.bench.timing import synchronize

    device = _device(p.dry)
    b, d = _sizes("million", p.dry)
    x, y = make_inputs(b, d, torch.bfloat16, device, seed=5)
    s = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    rows = []
    for loss in ("clip", "siglip"):
        if p.left() <= 0:
            rows.append({"loss": loss, "error": "not run: time limit"})
            continue
        for t in (x, y, s, bias):
            t.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if loss == "clip":
            out = fastclip.clip_loss(x, y, s, impl="triton")
        else:
            out = fastclip.siglip_loss(x, y, s, bias, impl="triton")
        out.backward()
        synchronize(device)
        row = {"loss": loss, "batch": b, "dim": d, "seconds": round(time.perf_counter() - t0, 3)}
        row["finite"] = bool(torch.isfinite(out).item() and torch.isfinite(x.grad).all().item())
        if device.type == "cuda":
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        rows.append(row)
        p.save(rows=rows)
    ok = all(r.get("finite") for r in rows)
    p.save(status="ok" if ok else "failed", rows=rows)


def _packed_attention(p: Part, device) -> dict:
    """The packed-sequence path (a block-diagonal T x T mask through SDPA today) against torch's
    ``torch.nn.attention.varlen.varlen_attn`` where it exists: fwd+bwd time and the largest difference."""
    import torch

    from fastclip.bench import timing
    from fastclip.models.attention import attention

    n_seq, t, h, dh = (64, 197, 12, 64) if not p.dry else (4, 9, 2, 8)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, n_seq * t, h, dh, generator=g, device=device, dtype=dtype) for _ in range(3))
    cu = torch.arange(0, (n_seq + 1) * t, t, device=device, dtype=torch.int32)
    out = {"sequences": n_seq, "tokens_each": t, "heads": h, "head_dim": dh}

    def run(fn):
        leaves = [a.detach().requires_grad_() for a in (q, k, v)]
        o = fn(*leaves)
        o.float().square().sum().backward()
        return o.detach(), [a.grad for a in leaves]

    mask_fn = lambda a, b, c: attention(a, b, c, impl="sdpa", cu_seqlens=cu, max_seqlen=t)  # noqa: E731

    def ms(fn):  # median of fwd+bwd after one warm-up call
        return round(
            timing.median_seconds(lambda: run(fn), device, warmup=1, reps=10 if not p.dry else 2) * 1e3, 4
        )

    out["mask_ms"] = ms(mask_fn)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        out["varlen"] = f"not in this torch: {exc}"
        return out
    var_fn = lambda a, b, c: varlen_attn(a[0], b[0], c[0], cu, cu, t, t).unsqueeze(0)  # noqa: E731
    try:
        out["varlen_ms"] = ms(var_fn)
        (o1, g1), (o2, g2) = run(mask_fn), run(var_fn)
        out["max_abs_diff"] = max(
            float((a.float() - b.float()).abs().max()) for a, b in zip([o1, *g1], [o2, *g2])
        )
    except Exception as exc:  # CUDA only in torch 2.11, say so rather than fail the part
        out["varlen"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def part_vit(p: Part) -> None:
    """One ViT-B/16 CLIP training step (bf16 autocast, batch 256, fused loss, AdamW) with
    ``attn_impl="sdpa"``: images/s and peak memory with SDPA forced onto its flash backend, then with
    SDPA's own choice; then the packed-sequence attention path against ``varlen_attn``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from fastclip.bench import train as tb

    device = _device(p.dry)
    name, batch = ("ViT-B-16", 256) if not p.dry else ("tiny", 8)
    model, opt = tb.build(name, device)
    model.set_attn_impl("sdpa")
    step = tb.plain_step(model, opt, tb.make_loss(model, "fastclip"), device, "bf16")
    rows = []
    p.save(model=name, batch=batch, rows=rows)
    for label, backends in (("flash", [SDPBackend.FLASH_ATTENTION]), ("sdpa default", None)):
        if p.left() <= 0:
            rows.append({"sdpa": label, "error": "not run: time limit"})
            continue
        try:
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                r = tb.measure_step(step, model, batch, device, warmup=2, steps=5 if not p.dry else 1)
            rows.append({"sdpa": label, **r})
        except Exception as exc:
            rows.append({"sdpa": label, "error": f"{type(exc).__name__}: {exc}"[:400]})
        p.save(rows=rows)
    packed = _packed_attention(p, device) if p.left() > 0 else {"error": "not run: time limit"}
    ok = all("error" not in r for r in rows)
    p.save(status="ok" if ok else "failed", rows=rows, packed=packed)


def part_family(p: Part) -> None:
    """The contrastive family's Triton epilogue on the GPU: its numbers against the chunked PyTorch
    implementation for the variants real calls get (bf16 and fp32), then info_nce_loss with K = 0, 1
    and 7 hard negatives, bf16, forward+backward: Triton vs the torch implementation vs the
    materialized MNRL maths (time and peak extra memory, side by side)."""
    import torch

    from fastclip import functional as F
    from fastclip.bench import family as bf
    from fastclip.bench import timing
    from fastclip.bench.memory import peak_extra_bytes

    device = _device(p.dry)
    b, d = _sizes("family", p.dry)
    all_dirs = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    variants = {
        "mnrl": {},
        "hard+all directions": dict(
            directions=all_dirs, hardness="in_batch_negatives", hardness_strength=2.0
        ),
        "ids positive+smoothing": dict(
            directions=all_dirs, duplicates="positive", label_smoothing=0.1, ids=True
        ),
    }
    checks = []
    p.save(batch=b, dim=d, checks=checks)
    impl_fused = "triton"
    for dtype in (torch.bfloat16, torch.float32):
        for name, kw in variants.items():
            g = torch.Generator(device=device).manual_seed(0)
            n = min(b, 4096) if not p.dry else b
            ts = [torch.randn(n, d, generator=g, device=device).to(dtype) for _ in range(4)]
            kw = dict(kw)
            if kw.pop("ids", False):
                kw["query_ids"] = torch.randint(0, n // 4, (n,), device=device, generator=g)
            outs = {}
            for impl in (impl_fused, "torch"):
                leaves = [t.clone().requires_grad_() for t in ts]
                loss = F.info_nce_loss(leaves[0], leaves[1], leaves[2:], impl=impl, **kw)
                grads = torch.autograd.grad(loss, leaves)
                outs[impl] = [loss.detach().float(), *(x.float() for x in grads)]
            err = max(float((a - c).abs().max()) for a, c in zip(outs[impl_fused], outs["torch"]))
            scale = max(float(x.abs().max()) for x in outs["torch"])
            checks.append(
                {"variant": name, "dtype": str(dtype), "n": n, "max_abs_diff": err, "max_abs": scale}
            )
            p.save(checks=checks)
    rows = []
    providers = {
        "fastclip-triton": lambda q, pos, negs: F.info_nce_loss(
            q, pos, negs, scale=bf.SCALE, impl=impl_fused
        ),
        "fastclip-torch": lambda q, pos, negs: F.info_nce_loss(q, pos, negs, scale=bf.SCALE, impl="torch"),
        "materialized": bf.materialized_mnrl,
    }
    for k in (0, 1, 7):
        if p.left() <= 10:
            rows.append({"negatives": k, "error": "not run: time limit"})
            continue
        ts = [torch.randn(b, d, device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(k + 2)]

        def reset(ts=ts):
            for t in ts:
                t.grad = None

        for pname, fn in providers.items():
            if p.dry and pname == "fastclip-triton":
                continue  # the interpreter is not timed
            try:
                reset()
                peak, _ = peak_extra_bytes(lambda fn=fn, ts=ts: fn(ts[0], ts[1], ts[2:]).backward(), device)
                samples = timing.time_iterations(
                    lambda fn=fn, ts=ts: fn(ts[0], ts[1], ts[2:]),
                    lambda out: out.backward(),
                    reset,
                    device,
                    3 if not p.dry else 1,
                )
                ms = sorted(s[2] for s in samples)[len(samples) // 2]
                rows.append(
                    {"negatives": k, "provider": pname, "fwd_bwd_ms": ms, "peak_mem_bytes": int(peak)}
                )
            except Exception as exc:  # e.g. the materialized loss out of memory at K = 7
                rows.append(
                    {"negatives": k, "provider": pname, "error": f"{type(exc).__name__}: {exc}"[:300]}
                )
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            p.save(rows=rows)
        del ts
    tol_ok = all(c["max_abs_diff"] <= 3e-2 * max(1.0, c["max_abs"]) for c in checks)
    p.save(status="ok" if tol_ok else "failed", checks=checks, rows=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=PARTS + WORKER_PARTS + EXTRA_PARTS)
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--seconds", type=float, default=60.0, help="stop starting new work after this")
    ap.add_argument("--group", type=int, default=0, help="cases: index into PRECISIONS")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    name = args.part + (str(args.group) if args.part == "cases" else "")
    p = Part(name, args.out, args.seconds, args.dry_run)
    try:
        if args.part == "cases":
            part_cases(p, args.group)
        else:
            globals()[f"part_{args.part}"](p)
    except Exception as exc:
        p.save(
            status="error",
            error=f"{type(exc).__name__}: {exc}"[:1000],
            traceback=traceback.format_exc()[-3000:],
        )
        raise
    return 0 if p.data.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
