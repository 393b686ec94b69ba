"""Parts ``target`` (fastclip against the materialized loss, open_clip's ClipLoss / SigLipLoss under
bf16 autocast, then Inf-CL, siglip-kernel and memeff where they import), ``phases`` (the backward's
tile kernel / dX GEMM / dY GEMM) and ``million`` (B = 2**20 completes)."""

from __future__ import annotations

import os
import time

from device_targets import GOAL_MATMUL_FRACTION  # noqa: E402  (benchmarks/ is on sys.path)

from device_parts.common import Part, autocast, error_text, optional_import, sizes
from device_parts.common import device as get_device

CORE = ["fastclip-triton", "reference", "open_clip"]
THIRD = ["inf_cl", "siglip_kernel", "memeff"]


def _fused_triton(loss, x, y, scale, bias):
    import fastclip

    if loss == "clip":
        return fastclip.clip_loss(x, y, scale, impl="triton")
    return fastclip.siglip_loss(x, y, scale, bias, impl="triton")


def _open_clip_autocast(dev):
    """open_clip's ClipLoss / SigLipLoss (its loss.py alone) under bf16 autocast, as its training
    loop calls them."""
    from fastclip.bench.providers import Provider, load_open_clip_loss

    try:
        module = load_open_clip_loss()
    except Exception as exc:
        return None, f"skipped: open_clip's loss.py failed to load ({error_text(exc, 200)})"
    if module is None:
        return None, "skipped: open_clip_torch is not installed"
    clip, siglip = module.ClipLoss(), module.SigLipLoss()

    def fn(loss, x, y, scale, bias):
        with autocast(dev):
            return clip(x, y, scale) if loss == "clip" else siglip(x, y, scale, bias)

    return Provider("open_clip", fn), ""


def _siglip_kernel(dev):
    """siglip-kernel's ``fused_siglip_loss(img, txt, log_temperature, bias)``: its router takes the
    chunked cuBLAS + Triton BCE path for bf16. It wants log(scale); sum over pairs / B, as open_clip."""
    from fastclip.bench.providers import Provider

    if dev.type != "cuda":
        return None, "skipped: siglip-kernel needs a CUDA device"
    mod, why = optional_import("siglip_kernel")
    if mod is None:
        return None, why
    if not hasattr(mod, "fused_siglip_loss"):
        return None, "skipped: siglip_kernel has no fused_siglip_loss"

    def fn(loss, x, y, scale, bias):
        return mod.fused_siglip_loss(x, y, scale.log(), bias)

    return Provider("siglip_kernel", fn, losses=("siglip",)), ""


def _memeff(dev):
    """memeff's ``MemoryEfficientCLIPLoss`` (fixed temperature = 1/scale, inputs already normalized,
    stable=False: the textbook gradient scale)."""
    from fastclip.bench.providers import Provider

    if dev.type != "cuda":
        return None, "skipped: memeff needs a CUDA device"
    mod, why = optional_import("memeff")
    if mod is None:
        return None, why
    cache = {}

    def fn(loss, x, y, scale, bias):
        t = 1.0 / float(scale)
        if t not in cache:
            try:
                cache[t] = mod.MemoryEfficientCLIPLoss(temperature=t, normalized_inputs=True, stable=False)
            except TypeError:  # an older signature without stable=
                cache[t] = mod.MemoryEfficientCLIPLoss(temperature=t, normalized_inputs=True)
        return cache[t](x, y)

    return Provider("memeff", fn, losses=("clip",)), ""


def _rows(doc, rates) -> list:
    rows = []
    for r in doc["records"]:
        row = {
            k: r.get(k)
            for k in ("loss", "batch", "provider", "status", "fwd_bwd_ms", "tflops", "peak_mem_bytes")
        }
        row.update(repeats=r.get("repeats"), message=r.get("message"), kernel_path=r.get("kernel_path"))
        if r.get("tflops") and rates.get(r["batch"]):
            row["fraction_of_bxbxd_matmul"] = round(r["tflops"] / rates[r["batch"]], 4)
        rows.append(row)
    return rows


def part_target(p: Part) -> None:
    """B = 32768 and 65536, D = 768, bf16, both losses: fused vs materialized vs open_clip (autocast);
    then, at B = 32768, Inf-CL (clip), siglip-kernel (siglip) and memeff (clip) where they import."""
    from fastclip.bench import report, timing
    from fastclip.bench.loss import LossSweep, run_loss_sweep
    from fastclip.bench.providers import Provider

    dev = get_device(p.dry)
    batches, d = sizes("target", p.dry)
    rates = {}
    for b in batches:
        rates[b] = timing.gemm_tflops(dev, b, b, d)
    p.save(matmul_tflops={str(b): v for b, v in rates.items()}, batches=batches, dim=d)
    extra, skipped = {}, {}
    for name, make in (
        ("open_clip", _open_clip_autocast),
        ("siglip_kernel", _siglip_kernel),
        ("memeff", _memeff),
    ):
        prov, why = make(dev)
        if prov is None:
            skipped[name] = why
        else:
            extra[name] = prov
    if dev.type != "cuda":
        skipped["inf_cl"] = "skipped: Inf-CL's kernels need a CUDA device"
    else:
        mod, why = optional_import("inf_cl")
        if mod is None or not hasattr(mod, "cal_inf_loss"):
            skipped["inf_cl"] = why or "skipped: inf_cl has no cal_inf_loss"
    if p.dry:  # the bench refuses to time the interpreter; the dry run only exercises the code path
        extra["fastclip-triton"] = Provider("fastclip-triton", _fused_triton)
    log = lambda m: print(m, flush=True)  # noqa: E731
    docs = []
    plans = [(CORE, batches), (["fastclip-triton", *THIRD], [sizes("third_party", p.dry)[0]])]
    for i, (provs, bs) in enumerate(plans):
        provs = [n for n in provs if n not in skipped]
        reserve = 20.0 if i == 0 and not p.dry else 0.0  # keep time for the third-party sweep
        cfg = LossSweep(
            providers=provs, batches=bs, dims=[d], dtypes=["bfloat16"], losses=["clip", "siglip"],
            device=str(dev), warmup=2 if not p.dry else 1, min_repeats=5 if not p.dry else 2,
            max_repeats=(15 if i == 0 else 5) if not p.dry else 2,
            time_budget_s=2.0 if not p.dry else 0.3, max_seconds=max(3.0, p.left() - reserve - 3.0),
            matmul_size=sizes("matmul", p.dry), max_batch={"inf_cl": 32768},
        )  # fmt: skip
        if i == 1:  # fastclip's own numbers at this size are in the first sweep
            cfg.providers = [n for n in provs if n != "fastclip-triton"]
            if not cfg.providers:
                break
        ex = {k: v for k, v in extra.items() if k in cfg.providers}
        doc = run_loss_sweep(cfg, progress=False, log=log, extra_providers=ex)
        docs.append(doc)
        merged = dict(docs[0], records=[r for dd in docs for r in dd["records"]])
        merged["matmul_tflops"] = docs[0]["matmul_tflops"]
        report.write_json(merged, os.path.join(p.out, "results.json"))
        report.write_csv(merged["records"], os.path.join(p.out, "results.csv"), {"device": merged["device"]})
        p.save(rows=_rows(merged, rates), skipped=skipped)
        if p.left() < 8:
            break
    square = docs[0]["matmul_tflops"] if docs else None
    p.save(status="ok", matmul_tflops={**{str(b): v for b, v in rates.items()}, "square": square},
           goal_fraction=GOAL_MATMUL_FRACTION, skipped=skipped)  # fmt: skip


def part_phases(p: Part) -> None:
    """Per-phase times of the backward (tile kernel, dX GEMM, dY GEMM) and of the forward."""
    import torch
    from fastclip.kernels import clip, config, gemm, siglip

    from fastclip.bench.loss import make_inputs
    from fastclip.bench.timing import synchronize

    device = get_device(p.dry)
    b, d = sizes("phases", p.dry)
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
    """B = 2**20, D = 768, bf16: the fused losses complete (time, memory above the inputs): CLIP, SigLIP
    and info_nce with one hard-negative group (K = 1: 2**21 columns per row)."""
    import torch

    import fastclip
    from fastclip.bench.loss import make_inputs
    from fastclip.bench.timing import synchronize

    device = get_device(p.dry)
    b, d = sizes("million", p.dry)
    x, y = make_inputs(b, d, torch.bfloat16, device, seed=5)
    s = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    rows = []
    neg = None
    for loss in ("clip", "siglip", "info_nce_k1"):
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
        elif loss == "siglip":
            out = fastclip.siglip_loss(x, y, s, bias, impl="triton")
        else:
            if neg is None:
                neg = make_inputs(b, d, torch.bfloat16, device, seed=6)[0]
            out = fastclip.info_nce_loss(x, y, [neg], scale=s, impl="triton")
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
