"""Parts ``env`` (versions, device, kernel paths, which third-party packages import) and
``correctness`` (every kernel against float64, one worker process ``cases`` per precision, plus a
bitwise repeat of both fused losses)."""

from __future__ import annotations

import os
import sys
import time

from device_parts.common import BENCH, ROOT, Part, optional_import, sizes, tf32
from device_parts.common import device as get_device

sys.path.insert(0, BENCH)
from device_report import load_part  # noqa: E402

# Distributions reported by env, and the third-party modules whose import env tries.
DISTS = ("torch", "triton", "numpy", "fastclip", "inf-cl", "open_clip_torch", "siglip-kernel", "memeff",
         "deepspeed", "pydantic", "webdataset", "sentence-transformers", "pytest")  # fmt: skip
THIRD_PARTY = ("inf_cl", "siglip_kernel", "memeff")


def _device(dry):
    return get_device(dry)


def part_env(p: Part) -> None:
    import importlib.metadata as md
    import platform

    import torch
    from fastclip.kernels import common, config, gemm

    from fastclip.bench import timing

    device = _device(p.dry)
    versions = {"python": platform.python_version()}
    for dist in DISTS:
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
    info["third_party_import"] = {m: optional_import(m)[1] or "ok" for m in THIRD_PARTY}
    p.save(status="ok", **info)


PRECISIONS = [("float32", False), ("float32", True), ("bfloat16", False), ("float16", False)]


def _groups(dry: bool) -> list:
    """Indices into PRECISIONS that run: on CPU (dry run) not fp32+TF32, since torch's CPU matmul, the
    reference the error budgets start from, has no TF32 mode to follow."""
    return [g for g, (_, tf) in enumerate(PRECISIONS) if not (dry and tf)]


def _correctness_cases(group: int, dry: bool) -> list:
    """The kernel cases of one precision (``PRECISIONS[group]``); they compile in their own process."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_kernels as tk  # noqa: E402  (the test helpers: same budgets as the test suite)

    dname, tf = PRECISIONS[group]
    if dry:  # the dry run exercises this code path, not the kernels (tests/test_kernels.py covers them)
        return [(loss, (70, 130, 33, 5), dname, tf, {}) for loss in ("clip", "siglip")]
    cases = [(loss, block, dname, tf, {}) for block in tk.BLOCKS for loss in ("clip", "siglip")]
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
    for group in _groups(p.dry):
        cmd = [sys.executable, os.path.join(BENCH, "device_check.py"), "cases", p.out, "--group", str(group)]
        cmd += ["--seconds", str(max(1.0, p.left() - 3))] + (["--dry-run"] if p.dry else [])
        workers.append(subprocess.Popen(cmd))
    rep = {"check": "repeat"}
    try:
        import fastclip
        from fastclip.bench.loss import make_inputs

        device = _device(p.dry)
        b, d = sizes("repeat", p.dry)
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
    for group in _groups(p.dry):
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
