"""Part ``vit``: one ViT-B/16 CLIP training step (bf16 autocast, fused loss) with SDPA forced onto its
flash backend and with SDPA's own choice, then the packed-sequence attention paths (the block-diagonal
mask through SDPA, torch's ``varlen_attn``, fastclip's ``varlen`` impl where it exists) and the impl
``resolve_impl("auto", ...)`` picks on this device."""

from __future__ import annotations

import contextlib

from device_parts.common import Part, error_text
from device_parts.common import device as get_device


def _resolved(device) -> dict:
    import torch

    try:
        from fastclip.models import attention as A
    except Exception as exc:
        return {"error": error_text(exc)}
    out = {"impls": list(getattr(A, "ATTN_IMPLS", ()))}
    for packed in (False, True):
        try:
            out[f"auto_packed={packed}"] = A.resolve_impl("auto", device, torch.bfloat16, packed=packed)
        except Exception as exc:
            out[f"auto_packed={packed}"] = error_text(exc)
    return out


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
    from fastclip.models import attention as A

    if "varlen" in getattr(A, "ATTN_IMPLS", ()):  # fastclip's own varlen path (added in parallel)
        fc_fn = lambda a, b, c: attention(a, b, c, impl="varlen", cu_seqlens=cu, max_seqlen=t)  # noqa: E731
        try:
            out["fastclip_varlen_ms"] = ms(fc_fn)
            (o1, g1), (o2, g2) = run(mask_fn), run(fc_fn)
            out["fastclip_varlen_max_abs_diff"] = max(
                float((a.float() - b.float()).abs().max()) for a, b in zip([o1, *g1], [o2, *g2])
            )
        except Exception as exc:
            out["fastclip_varlen"] = error_text(exc)
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

    device = get_device(p.dry)
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
    p.save(status="ok" if ok else "failed", rows=rows, packed=packed, attention=_resolved(device))
