"""Parts ``family`` (info_nce_loss: the Triton epilogue against torch per variant, then K = 0, 1, 7
bf16 fused vs the materialized MNRL maths vs sentence-transformers' MNRL under bf16 autocast where it
imports) and ``distill`` (distill_clip_loss fused vs open_clip's DistillClipLoss under bf16 autocast vs
the materialized reference: a small check of the numbers, then time and memory)."""

from __future__ import annotations

from device_parts.common import Part, autocast, error_text, optional_import, sizes
from device_parts.common import device as get_device

ALL_DIRS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
VARIANTS = {
    "mnrl": {},
    "hard+all directions": dict(directions=ALL_DIRS, hardness="in_batch_negatives", hardness_strength=2.0),
    "ids positive+smoothing": dict(directions=ALL_DIRS, duplicates="positive", label_smoothing=0.1, ids=True),
}


def _st_mnrl(dev):
    """sentence-transformers' MultipleNegativesRankingLoss, its loss stage alone (the embeddings are
    given), under bf16 autocast as its trainer runs it with bf16=True; or None and why not."""
    mod, why = optional_import("sentence_transformers")
    if mod is None:
        return None, why
    import torch

    try:
        try:
            from sentence_transformers.sentence_transformer import losses as st_losses
        except ImportError:
            from sentence_transformers import losses as st_losses
        loss = st_losses.MultipleNegativesRankingLoss(torch.nn.Sequential(torch.nn.Identity()))
        if not hasattr(loss, "compute_loss_from_embeddings"):
            return (
                None,
                f"skipped: this sentence-transformers ({mod.__version__}) has no compute_loss_from_embeddings",
            )
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, KeyboardInterrupt):
            raise
        return None, f"skipped: sentence-transformers' MNRL unavailable ({error_text(exc, 200)})"

    def fn(q, pos, negs):
        with autocast(dev):
            return loss.compute_loss_from_embeddings([q, pos, *negs], None)

    return fn, ""


def _timed(fn, ts, dev, reps):
    """Peak extra memory of one forward+backward, then the median of ``reps`` timed ones."""
    from fastclip.bench import timing
    from fastclip.bench.memory import peak_extra_bytes

    def reset():
        for t in ts:
            t.grad = None

    reset()
    peak, _ = peak_extra_bytes(lambda: fn(*ts).backward(), dev)
    samples = timing.time_iterations(lambda: fn(*ts), lambda out: out.backward(), reset, dev, reps)
    reset()
    return sorted(s[2] for s in samples)[len(samples) // 2], int(peak)


def part_family(p: Part) -> None:
    import torch

    from fastclip import functional as F
    from fastclip.bench import family as bf

    dev = get_device(p.dry)
    b, d = sizes("family", p.dry)
    checks, rows = [], []
    p.save(batch=b, dim=d, checks=checks)
    # The timed rows first (the targets), then the variant checks with what is left: each check
    # variant compiles its own kernels (seconds each on a fresh machine).
    providers = {
        "fastclip-triton": lambda q, pos, *negs: F.info_nce_loss(q, pos, list(negs), scale=bf.SCALE, impl="triton"),
        "fastclip-torch": lambda q, pos, *negs: F.info_nce_loss(q, pos, list(negs), scale=bf.SCALE, impl="torch"),
        "materialized": lambda q, pos, *negs: bf.materialized_mnrl(q, pos, list(negs)),
    }  # fmt: skip
    st, why = _st_mnrl(dev)
    skipped = {} if st is not None else {"st_mnrl": why}
    if st is not None:
        providers["st_mnrl"] = lambda q, pos, *negs: st(q, pos, list(negs))
    p.save(skipped=skipped)
    for k in (0, 1, 7):
        ts = [torch.randn(b, d, device=dev, dtype=torch.bfloat16).requires_grad_() for _ in range(k + 2)]
        for pname, fn in providers.items():
            if p.dry and pname == "fastclip-triton":
                continue  # the interpreter is not timed
            if p.left() <= (4 if k < 7 else 8) and not p.dry:
                rows.append({"negatives": k, "provider": pname, "error": "not run: time limit"})
                continue
            try:
                ms, peak = _timed(fn, ts, dev, 3 if not p.dry else 1)
                rows.append({"negatives": k, "provider": pname, "fwd_bwd_ms": ms, "peak_mem_bytes": peak})
            except Exception as exc:  # e.g. the materialized loss out of memory at K = 7
                rows.append({"negatives": k, "provider": pname, "error": error_text(exc)})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            p.save(rows=rows)
        del ts
    for dtype in (torch.bfloat16, torch.float32) if not p.dry else (torch.bfloat16,):
        for name, kw in VARIANTS.items():
            if p.left() <= 6 and not p.dry:
                checks.append({"variant": name, "dtype": str(dtype), "error": "not run: time limit"})
                continue
            g = torch.Generator(device=dev).manual_seed(0)
            n = min(b, 4096) if not p.dry else b
            ts = [torch.randn(n, d, generator=g, device=dev).to(dtype) for _ in range(4)]
            kw = dict(kw)
            if kw.pop("ids", False):
                kw["query_ids"] = torch.randint(0, n // 4, (n,), device=dev, generator=g)
            outs = {}
            for impl in ("triton", "torch"):
                leaves = [t.clone().requires_grad_() for t in ts]
                loss = F.info_nce_loss(leaves[0], leaves[1], leaves[2:], impl=impl, **kw)
                grads = torch.autograd.grad(loss, leaves)
                outs[impl] = [loss.detach().float(), *(x.float() for x in grads)]
            err = max(float((a - c).abs().max()) for a, c in zip(outs["triton"], outs["torch"]))
            scale = max(float(x.abs().max()) for x in outs["torch"])
            rel = max(
                float((a - c).norm() / c.norm().clamp_min(1e-30))
                for a, c in zip(outs["triton"], outs["torch"])
            )
            checks.append(
                {
                    "variant": name,
                    "dtype": str(dtype),
                    "n": n,
                    "max_abs_diff": err,
                    "max_abs": scale,
                    "max_rel_err": rel,
                }
            )
            p.save(checks=checks)
    # Relative error per output (loss, each gradient): bf16 outputs round at ~4e-3; fp32 far under 1e-3.
    tol_ok = all(c.get("max_rel_err", 0) <= (2e-2 if "bfloat16" in c["dtype"] else 1e-3) for c in checks)
    tol_ok = tol_ok and all("error" not in c for c in checks)
    p.save(status="ok" if tol_ok else "failed", checks=checks, rows=rows, skipped=skipped)


def _distill_inputs(n, d, dev, seed=0, dtype=None):
    import torch

    from fastclip.bench.distill import STUDENT_SCALE, TEACHER_SCALE

    g = torch.Generator(device=dev).manual_seed(seed)
    feats = [
        torch.nn.functional.normalize(torch.randn(n, d, generator=g, device=dev), dim=-1) for _ in range(4)
    ]
    feats = [f.to(torch.bfloat16).to(dtype or torch.bfloat16) for f in feats]  # same values in any dtype
    x, y, xt, yt = (f.requires_grad_(i < 2) for i, f in enumerate(feats))
    s = torch.tensor(STUDENT_SCALE, device=dev, requires_grad=True)
    t = torch.tensor(TEACHER_SCALE, device=dev)
    return [x, y, s, xt, yt, t]


def part_distill(p: Part) -> None:
    """distill_clip_loss, bf16, teacher without grad (as open_clip's loop): fused (Triton) against
    the materialized reference at a small size (loss and gradients), then fwd+bwd time and peak memory
    of fused / open_clip's DistillClipLoss under bf16 autocast / reference at B = 32768."""
    import torch

    from fastclip.losses_distill import DistillClipLoss

    dev = get_device(p.dry)
    n, d = sizes("distill_check", p.dry)
    fused, ref = DistillClipLoss(impl="triton"), DistillClipLoss(impl="reference")
    outs = {}
    for name, fn, dtype in (("triton", fused, None), ("reference", ref, None), ("fp32", ref, torch.float32)):
        ins = _distill_inputs(n, d, dev, dtype=dtype)
        c, dl = fn(*ins)
        grads = torch.autograd.grad(c + dl, [ins[0], ins[1], ins[2]])
        outs[name] = [c.detach().double(), dl.detach().double(), *(g.double() for g in grads)]

    def rel(name):  # per output (contrastive, distill, dx, dy, dscale): |a - ref| / |ref| against fp32
        return [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(outs[name], outs["fp32"])]

    fused_rel, ref_rel = rel("triton"), rel("reference")
    # bf16 operands: between 1e-3 and 1e-2 (METHOD.md); the materialized bf16 reference for context.
    check = {"n": n, "dim": d, "rel_err_fused": fused_rel, "rel_err_bf16_reference": ref_rel}
    check.update(max_rel_err=max(fused_rel), ok=max(fused_rel) <= 2e-2)
    check["losses"] = {k: [float(v[0]), float(v[1])] for k, v in outs.items()}
    p.save(check=check)
    providers = {"fastclip-triton": lambda *a: sum(fused(*a)), "reference": lambda *a: sum(ref(*a))}
    skipped = {}
    from fastclip.bench.providers import load_open_clip_loss

    try:
        module = load_open_clip_loss()
        if module is None:
            skipped["open_clip"] = "skipped: open_clip_torch is not installed"
        else:
            oc = module.DistillClipLoss()

            def open_clip_fn(*a):
                with autocast(dev):
                    return sum(oc(*a))

            providers["open_clip"] = open_clip_fn
    except Exception as exc:
        skipped["open_clip"] = f"skipped: open_clip's loss.py failed to load ({error_text(exc, 200)})"
    b, d = sizes("distill", p.dry)
    ins = _distill_inputs(b, d, dev, seed=1)
    rows = []
    for pname, fn in providers.items():
        if p.dry and pname == "fastclip-triton":
            continue  # the interpreter is not timed
        if p.left() <= 3 and not p.dry:
            rows.append({"provider": pname, "error": "not run: time limit"})
            continue
        try:
            ms, peak = _timed(fn, ins, dev, 3 if not p.dry else 1)
            rows.append({"provider": pname, "batch": b, "dim": d, "fwd_bwd_ms": ms, "peak_mem_bytes": peak})
        except Exception as exc:
            rows.append({"provider": pname, "error": error_text(exc)})
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        p.save(rows=rows, skipped=skipped)
    p.save(status="ok" if check["ok"] else "failed", rows=rows, skipped=skipped, batch=b, dim=d)
