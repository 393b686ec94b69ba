"""Part ``tune``: sweep the candidate tile configurations of the three kernels, write the table that
``kernels/config.py`` then holds, and measure the issue's targets with it (``fastclip.kernels.tune``
does the work: parallel ahead-of-time compilation, a float64 check of every candidate, then timing).

Opt-in (not in device_check.sh's default list): run it as its own call,
``bash benchmarks/device_check.sh OUT --parts env,tune --bundle FILE``. Writes ``part_tune.json``
(every candidate's row, the winners, the ``TUNED`` snippet, the targets) and ``tuned_table.json``;
prints the snippet. Dry run: the same code under the interpreter at tiny sizes, two candidates per
kernel, and the parallel compilation for sm_90 of two of them (no GPU needed).

Part ``tune_family`` (opt-in too): the same sweep for the contrastive family's own kernels
(``family-lse``, ``family-grad``; ``fastclip/bench/tune_family.py`` checks each candidate on two variants
against float64 and times sentence-transformers' MNRL with one hard negative), then that call's time
with the shipped and the tuned table. Writes ``part_tune_family.json`` and ``tuned_table_family.json``."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

from device_parts.common import Part, error_text, optional_import
from device_parts.common import device as get_device

# (GPU, dry run): tuning batch, float64-check batch, D, candidates per kernel
SIZES = ((32768, 1024, 768, 16), (128, 64, 32, 2))
# The targets (ms, bf16, D = 768, forward + backward unless said)
TARGETS = (
    ("clip", 32768, "fwd_bwd", 12.0),
    ("clip", 32768, "forward kernel (clip_lse)", 3.0),
    ("siglip", 32768, "fwd_bwd", 9.0),
    ("siglip", 65536, "fwd_bwd", 36.0),
)
SWEEP_SHARE = 0.8  # of the part's time for compiling and sweeping; the rest measures the targets


def _fwd_bwd(loss, b, d, dev):
    import torch

    import fastclip
    from fastclip.bench.inputs import make_inputs
    from fastclip.bench.loss import CLIP_SCALE, SIGLIP_BIAS, SIGLIP_SCALE

    x, y = make_inputs(b, d, torch.bfloat16, dev)
    s = torch.tensor(CLIP_SCALE if loss == "clip" else SIGLIP_SCALE, device=dev, requires_grad=True)
    bias = torch.tensor(SIGLIP_BIAS, device=dev, requires_grad=True)

    def run():
        for t in (x, y, s, bias):
            t.grad = None
        if loss == "clip":
            out = fastclip.clip_loss(x, y, s, impl="triton")
        else:
            out = fastclip.siglip_loss(x, y, s, bias, impl="triton")
        out.backward()

    return run, (x, y, s)


def _targets(p: Part, dev, dim: int, batches: dict, label: str) -> list:
    """Each target measured with the configurations now in ``config`` (``label``: shipped / tuned)."""
    from fastclip.kernels import clip
    from fastclip.kernels import tune as kt

    rows = []
    for loss, b, what, limit in TARGETS:
        b = batches.get(b, b)
        row = {"table": label, "loss": loss, "batch": b, "what": what, "target_ms": limit}
        if p.left() < 5:
            rows.append({**row, "error": "not run: time limit"})
            continue
        try:
            run, feats = _fwd_bwd(loss, b, dim, dev)
            if what.startswith("forward"):
                fn = functools.partial(clip.clip_lse, *(t.detach() for t in feats))
            else:
                fn = run
            fn()  # compile / warm up
            ms = kt.time_ms(fn, dev)
            row.update(ms=round(ms, 3), met=ms <= limit)
            del run, feats, fn
        except Exception as exc:  # noqa: BLE001  (out of memory at 65536 on a smaller GPU, ...)
            row["error"] = error_text(exc)
        rows.append(row)
        print(
            f"target {label} {loss} B={b} {what}: {row.get('ms', row.get('error'))} ms (<= {limit})",
            flush=True,
        )
    return rows


def _siglip_kernel_row(dev, b: int, dim: int):
    """siglip-kernel's fused SigLIP loss at B = ``b`` (the issue asks fastclip to be faster), or why not."""
    if dev.type != "cuda":
        return {"skipped": "siglip-kernel needs a CUDA device"}
    mod, why = optional_import("siglip_kernel")
    if mod is None or not hasattr(mod, "fused_siglip_loss"):
        return {"skipped": why or "siglip_kernel has no fused_siglip_loss"}
    import torch
    from fastclip.kernels import tune as kt

    from fastclip.bench.inputs import make_inputs

    x, y = make_inputs(b, dim, torch.bfloat16, dev)
    s, bias = torch.tensor(10.0, device=dev).log(), torch.tensor(-10.0, device=dev)

    def run():
        x.grad = y.grad = None
        mod.fused_siglip_loss(x, y, s, bias).backward()

    run()
    return {"batch": b, "ms": round(kt.time_ms(run, dev), 3)}


def _sweep_kernels(
    p: Part, dev, cands: dict, dim, batch, check_batch, sweep_end, table_file, workload=None
) -> dict:
    """Each kernel of ``cands`` swept in turn (``fastclip.kernels.tune.sweep``; ``workload(kernel)`` what to
    check and time, None: the block primitives), sharing what is left until ``sweep_end``; the winners
    saved as ``table_file`` and as a ``TUNED`` snippet. Returns the winners by ``TUNED`` key."""
    from fastclip.kernels import config
    from fastclip.kernels import tune as kt

    rows, winners = [], {}
    for i, kernel in enumerate(cands):
        deadline = time.perf_counter() + (sweep_end - time.perf_counter()) / (len(cands) - i)
        r, best = kt.sweep(kernel, "bfloat16", dim, batch, cands[kernel], dev, check_batch=check_batch,
                           deadline=deadline, log=lambda m: print(m, flush=True),
                           workload=None if workload is None else workload(kernel))  # fmt: skip
        rows += r
        if best is not None:
            winners[(config.arch(dev), kernel, "bfloat16", config.d_bucket(dim))] = best
        p.save(rows=rows)
    snippet = kt.tuned_snippet(winners)
    table = [{"key": list(k), "config": dataclasses.asdict(c), "name": c.name()} for k, c in winners.items()]
    with open(os.path.join(p.out, table_file), "w") as f:
        json.dump(table, f, indent=1)
    print(snippet, flush=True)
    p.save(winners=table, tuned_snippet=snippet)
    return winners


def part_tune(p: Part) -> None:
    import torch
    from fastclip.kernels import config
    from fastclip.kernels import tune as kt

    dev = get_device(p.dry)
    batch, check_batch, dim, per_kernel = SIZES[1 if p.dry else 0]
    arch = config.arch(dev)
    cands = {k: config.AUTOTUNE_CANDIDATES[k][:per_kernel] for k in config.KERNELS}
    if arch == "interpreter":  # the interpreter's one tile shape with each candidate's variant flags
        base = {k: config.tile_config(k, dev, torch.bfloat16, dim) for k in config.KERNELS}
        cands = {k: [dataclasses.replace(c, **{f: getattr(base[k], f) for f in ("block_m", "block_n", "block_k",
                 "num_warps", "num_stages")}) for c in v] for k, v in cands.items()}  # fmt: skip
    p.save(arch=arch, batch=batch, check_batch=check_batch, dim=dim,
           candidates={k: [c.name() for c in v] for k, v in cands.items()})  # fmt: skip
    sweep_end = p.start + SWEEP_SHARE * (p.deadline - p.start)
    # 1. compile every candidate at once in worker processes (on CPU, for the GPU's target)
    cap = 90
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        cap = 10 * major + minor
    jobs = [
        [k, "bfloat16", dim, dataclasses.asdict(c)]
        for k in config.KERNELS
        for c in config.AUTOTUNE_CANDIDATES[k]
    ]
    if p.dry:
        jobs = jobs[:1] + [j for j in jobs if j[3].get("tma")][:1]  # the plumbing: two jobs for sm_90
    t0 = time.perf_counter()
    workers = min(16, os.cpu_count() or 1)
    pre = kt.precompile(jobs, cap, workers, timeout=max(5.0, 0.35 * (sweep_end - time.perf_counter())))
    p.save(precompile={"jobs": len(jobs), "workers": workers, "cap": cap, "seconds": round(time.perf_counter() - t0, 1),
                       "ok": sum(1 for r in pre if r.get("ok")), "rows": pre})  # fmt: skip
    # 2. check each candidate against float64, then time it; kernels share what is left of the sweep time
    winners = _sweep_kernels(p, dev, cands, dim, batch, check_batch, sweep_end, "tuned_table.json")
    # 3. the targets: the shipped table, then the tuned one
    batches = {32768: 128, 65536: 256} if p.dry else {}
    targets = _targets(p, dev, dim, batches, "shipped")
    config.TUNED.update(winners)
    try:
        targets += _targets(p, dev, dim, batches, "tuned")
    finally:
        for k in winners:
            config.TUNED.pop(k, None)
    sk = _siglip_kernel_row(dev, 65536, dim) if p.left() > 10 else {"skipped": "time limit"}
    p.save(status="ok", targets=targets, siglip_kernel=sk)


# (GPU, dry run): tuning batch, float64-check batch, D
FAMILY_SIZES = ((32768, 1024, 768), (128, 48, 32))


def part_tune_family(p: Part) -> None:
    import torch
    from fastclip.kernels import config
    from fastclip.kernels import tune as kt

    from fastclip.bench.tune_family import KERNELS, FamilyWorkload

    dev = get_device(p.dry)
    batch, check_batch, dim = FAMILY_SIZES[1 if p.dry else 0]
    arch = config.arch(dev)
    cands = {k: list(config.AUTOTUNE_CANDIDATES[k]) for k in KERNELS}
    if arch == "interpreter":  # the interpreter's one tile shape, two candidates per kernel
        cands = {k: [config.tile_config(k, dev, torch.bfloat16, dim)] * 2 for k in KERNELS}
    p.save(arch=arch, batch=batch, check_batch=check_batch, dim=dim,
           candidates={k: [c.name() for c in v] for k, v in cands.items()})  # fmt: skip
    sweep_end = p.start + SWEEP_SHARE * (p.deadline - p.start)
    if dev.type == "cuda":  # compile every candidate at once in worker processes (no GPU touched)
        major, minor = torch.cuda.get_device_capability(dev)
        jobs = [[k, "bfloat16", dim, dataclasses.asdict(c)] for k in KERNELS for c in cands[k]]
        t0, workers = time.perf_counter(), min(16, os.cpu_count() or 1)
        pre = kt.precompile(jobs, 10 * major + minor, workers, timeout=max(5.0, 0.4 * (sweep_end - time.perf_counter())),
                            module=FamilyWorkload.precompile_module)  # fmt: skip
        p.save(precompile={"jobs": len(jobs), "seconds": round(time.perf_counter() - t0, 1),
                           "ok": sum(1 for r in pre if r.get("ok")), "rows": pre})  # fmt: skip
    winners = _sweep_kernels(p, dev, cands, dim, batch, check_batch, sweep_end, "tuned_table_family.json",
                             workload=FamilyWorkload)  # fmt: skip
    # The whole MNRL call (forward and backward) with the shipped table, then the tuned one.
    timing = []
    for label in ("shipped", "tuned"):
        if p.left() < 5:
            timing.append({"table": label, "error": "not run: time limit"})
            continue
        if label == "tuned":
            config.TUNED.update(winners)
        try:
            work = FamilyWorkload("family-grad")
            work.setup(batch, 2, dim, torch.bfloat16, dev)
            work.run()
            ms = kt.time_ms(work.run, dev)
            timing.append(
                {"table": label, "batch": batch, "what": "info_nce K=1 fwd_bwd", "ms": round(ms, 3)}
            )
            print(f"tune_family {label} table: info_nce K=1 B={batch} fwd+bwd {ms:.3f} ms", flush=True)
        except Exception as exc:  # noqa: BLE001
            timing.append({"table": label, "error": error_text(exc)})
        finally:
            for k in winners:
                config.TUNED.pop(k, None)
    p.save(status="ok", timing=timing)
