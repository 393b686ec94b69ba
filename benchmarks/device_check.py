"""The parts of ``benchmarks/device_check.sh``, one per call: ``python benchmarks/device_check.py PART OUT``.

PART is one of ``env``, ``correctness``, ``target``, ``phases``, ``million``, ``summary``. Each part
writes ``OUT/part_<PART>.json`` (rewritten as it goes, so a part stopped by its time limit still
leaves what it measured) and stops starting new work ``--seconds`` after it began. ``target`` also
writes ``OUT/results.json`` in the result-file schema of ``fastclip.bench.report`` (plus a CSV).
``summary`` prints one line per target and writes ``OUT/device_check.json``.

``collect BUNDLE DEST`` (on the machine the results come back to): unpacks the ``--bundle`` archive
of ``device_check.sh`` into DEST (a new folder), prints the summary, the target verdicts and a README
table, and draws the plots of ``results.json``.

``--dry-run``: the same code on CPU with the Triton interpreter and tiny sizes (CI runs it), so the
GPU time goes to measuring. Sizes on a GPU: the targets of docs/kernels.md (B = 32768 and 2**20, D = 768, bf16).

(About 500 lines: the six parts share the time-limit, logging and record helpers at the top and are
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
PARTS = ("env", "correctness", "target", "phases", "million", "summary")
WORKER_PARTS = ("cases",)  # started by "correctness", one process per precision
EXTRA_PARTS = ("vit",)  # run only when named (device_check.sh --parts)
# Sizes: (GPU, dry run on CPU).
SIZES = {
    "target": ((32768, 768), (256, 32)),
    "phases": ((32768, 768), (256, 32)),
    "million": ((2**20, 768), (1024, 16)),
    "repeat": ((16387, 768), (130, 33)),
    "matmul": (8192, 256),
}
GOAL_MATMUL_FRACTION = 0.60  # fwd+bwd of the fused CLIP loss against the bf16 matmul rate at B x B x D


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


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        part = _load(p.out, f"cases{group}")
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
        _sync(device)
        timer = gemm.PhaseTimer(device)
        t0 = time.perf_counter()
        fn(timer)
        _sync(device)
        total = (time.perf_counter() - t0) * 1e3
        out[name] = {"total_ms": round(total, 3), **{k: round(v, 3) for k, v in timer.totals_ms().items()}}
        p.save(**out)
    p.save(status="ok", **out)


def part_million(p: Part) -> None:
    """B = 2**20, D = 768, bf16: the fused losses complete (time, memory above the inputs)."""
    import torch

    import fastclip
    from fastclip.bench.loss import make_inputs

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
        _sync(device)
        row = {"loss": loss, "batch": b, "dim": d, "seconds": round(time.perf_counter() - t0, 3)}
        row["finite"] = bool(torch.isfinite(out).item() and torch.isfinite(x.grad).all().item())
        if device.type == "cuda":
            row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
        rows.append(row)
        p.save(rows=rows)
    ok = all(r.get("finite") for r in rows)
    p.save(status="ok" if ok else "failed", rows=rows)


def _fwd_bwd_ms(fn, device, reps: int) -> float:
    """Median milliseconds of ``fn()`` (forward and backward) after one warm-up call."""
    import statistics

    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(times), 4)


def _packed_attention(p: Part, device) -> dict:
    """The packed-sequence path (a block-diagonal T x T mask through SDPA today) against torch's
    ``torch.nn.attention.varlen.varlen_attn`` where it exists: fwd+bwd time and the largest difference."""
    import torch

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
    reps = 10 if not p.dry else 2
    out["mask_ms"] = _fwd_bwd_ms(lambda: run(mask_fn), device, reps)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        out["varlen"] = f"not in this torch: {exc}"
        return out
    var_fn = lambda a, b, c: varlen_attn(a[0], b[0], c[0], cu, cu, t, t).unsqueeze(0)  # noqa: E731
    try:
        out["varlen_ms"] = _fwd_bwd_ms(lambda: run(var_fn), device, reps)
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


# ----------------------------------------------------------------------------------------------------
# summary


def _load(out: str, name: str) -> dict:
    try:
        with open(os.path.join(out, f"part_{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def summary_lines(out: str) -> list[str]:
    lines = []  # one line per part that ran (device_check.sh --parts may leave some out)
    env = _load(out, "env")
    if env:
        lines.append(
            f"device: {env.get('device', '?')}; clocks {env.get('clocks')}; versions {env.get('versions')}"
        )
    c = _load(out, "correctness")
    results = c.get("results", [])
    ok = sum(1 for r in results if r.get("ok"))
    rep = c.get("repeat", {})
    if c:
        lines.append(
            f"correctness: {ok} of {len(results)} kernel cases within the float64 error budgets, "
            f"{c.get('not_run', '?')} not run; bitwise repeat {'same' if rep.get('ok') else 'DIFFERENT' if rep.get('ok') is False else 'not run'}; "
            f"{c.get('seconds', '?')} s incl. compilation [{c.get('status', 'missing')}]"
        )
    t = _load(out, "target")
    rates = t.get("matmul_tflops", {})
    for loss in ("clip", "siglip") if t else ():
        parts = []
        for r in t.get("rows", []):
            if r["loss"] != loss:
                continue
            if r["status"] == "ok":
                frac = r.get("fraction_of_bxbxd_matmul")
                mem = r["peak_mem_bytes"] / 2**30 if r.get("peak_mem_bytes") else float("nan")
                parts.append(
                    f"{r['provider']} {r['fwd_bwd_ms']:.4g} ms ({r['tflops']:.3g} TFLOP/s = {frac} of the BxBxD "
                    f"matmul rate, {mem:.3g} GiB above inputs)"
                )
            else:
                parts.append(f"{r['provider']} {r['status']}")
        lines.append(
            f"target {loss} bf16 B={t.get('batch')} D={t.get('dim')}: "
            + ("; ".join(parts) or "no result")
            + f" | matmul {rates.get('bxbxd', float('nan')):.3g} TFLOP/s at BxBxD, {rates.get('square', float('nan')):.3g} square"
            + (f" (goal fastclip >= {GOAL_MATMUL_FRACTION} of BxBxD)" if loss == "clip" else "")
        )
    ph = _load(out, "phases")
    for name in ("clip_lse", "clip_grad", "siglip_grad"):
        if name in ph:
            lines.append(
                f"phases {name} B={ph.get('batch')} chunk {ph.get('chunk')} gemm {ph.get('gemm_path')}: {ph[name]}"
            )
    m = _load(out, "million")
    for r in m.get("rows", []):
        if "error" in r:
            lines.append(f"million {r['loss']}: {r['error']}")
        else:
            peak = r.get("peak_extra_bytes")
            lines.append(
                f"million {r['loss']} B={r['batch']} D={r['dim']}: {r['seconds']} s, "
                f"{'finite' if r['finite'] else 'NOT finite'}"
                + (f", {peak / 2**30:.2f} GiB above inputs" if peak else "")
            )
    vit = _load(out, "vit")
    for r in vit.get("rows", []):
        if "error" in r:
            lines.append(f"vit {vit.get('model')} sdpa {r['sdpa']}: {r['error']}")
        else:
            lines.append(
                f"vit {vit.get('model')} bf16 batch {vit.get('batch')} sdpa {r['sdpa']}: {r['samples_per_s']:.4g} "
                f"images/s, {r['step_ms']:.4g} ms/step, peak {r['peak_mem_bytes'] / 2**30:.3g} GiB above inputs"
            )
    if vit.get("packed"):
        lines.append(f"packed attention: {vit['packed']}")
    if any(os.path.exists(os.path.join(out, f"{n}.log")) for n in ("pytest_gpu_kernels", "pytest_gpu_rest")):
        lines.append(
            f"pytest -m gpu: kernels {_pytest_result(out, 'pytest_gpu_kernels')}; "
            f"other {_pytest_result(out, 'pytest_gpu_rest')}"
        )
    return lines


def _pytest_result(out: str, name: str) -> str:
    try:
        with open(os.path.join(out, f"{name}.log")) as f:
            tail = [ln for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "no log"
    for ln in reversed(tail):
        if " in " in ln and any(w in ln for w in ("passed", "failed", "skipped", "error", "deselected")):
            return ln.strip("= ")
    return tail[-1] if tail else "empty log"


def part_summary(out: str) -> None:
    lines = summary_lines(out)
    status = {}
    try:
        with open(os.path.join(out, "status.txt")) as f:
            status = dict(ln.split() for ln in f if ln.strip())
    except (OSError, ValueError):
        pass
    doc = {name: _load(out, name) for name in PARTS[:-1] + EXTRA_PARTS}
    doc.update(exit_status=status, summary=lines)
    with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump(doc, f, indent=1, default=str)
    for ln in lines:
        print(ln)


def _safe_members(tar) -> list:
    """The archive's members, refused whole unless each is a plain file or folder at a relative path
    inside the archive (no links, devices, absolute paths or ``..``)."""
    members = []
    for m in tar.getmembers():
        name = m.name[2:] if m.name.startswith("./") else m.name
        if name in ("", "."):
            continue
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
            raise ValueError(f"bundle: refusing member {m.name!r} (only plain files and folders inside it)")
        members.append(m)
    return members


def collect(bundle: str, dest: str) -> list[str]:
    """Unpack a device-check bundle into ``dest`` (must not exist or be empty), write ``summary.md``
    (summary lines, target verdicts, README table) and the plots; returns the lines printed."""
    import tarfile

    if not os.path.isfile(bundle):
        raise FileNotFoundError(
            f"bundle: expected a .tar.gz written by device_check.sh --bundle, got {bundle!r}"
        )
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise FileExistsError(f"dest: expected a new or empty folder, got {dest!r} (not empty)")
    try:
        tar = tarfile.open(bundle, "r:gz")
    except (tarfile.TarError, OSError) as exc:
        raise ValueError(f"bundle: {bundle!r} is not a gzip tar archive ({exc})") from exc
    with tar:
        members = _safe_members(tar)
        os.makedirs(dest, exist_ok=True)
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kw)
    lines = summary_lines(dest)
    md = ["# Device check", "", "```", *lines, "```", ""]
    results = os.path.join(dest, "results.json")
    if os.path.isfile(results):
        from fastclip.bench import plot, report

        doc = report.load_document(results)
        checks = report.target_checks(doc["records"], doc.get("matmul_tflops"))
        lines += checks
        md += [
            "## Targets",
            "",
            *[f"- {c}" for c in checks],
            "",
            "## Table",
            "",
            report.markdown_summary(doc),
            "",
        ]
        for path in plot.plot_document(doc, os.path.join(dest, "results")):
            lines.append(f"plot: {path}")
    else:
        lines.append("no results.json in the bundle: the target part did not finish")
    with open(os.path.join(dest, "summary.md"), "w") as f:
        f.write("\n".join(md))
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["collect"]:
        cp = argparse.ArgumentParser(
            prog="device_check.py collect", description=collect.__doc__.split(";")[0]
        )
        cp.add_argument("bundle")
        cp.add_argument("dest")
        args = cp.parse_args(argv[1:])
        try:
            lines = collect(args.bundle, args.dest)
        except (OSError, ValueError) as exc:
            print(f"device_check.py collect: {exc}", file=sys.stderr)
            return 2
        for ln in lines:
            print(ln)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=PARTS + WORKER_PARTS + EXTRA_PARTS)
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--seconds", type=float, default=60.0, help="stop starting new work after this")
    ap.add_argument("--group", type=int, default=0, help="cases: index into PRECISIONS")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.part == "summary":
        part_summary(args.out)
        return 0
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
