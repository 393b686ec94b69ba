"""The "torch" implementation of the block primitives: chunked PyTorch, bounded memory.

A *block* is ``n`` query rows ``x`` against ``N`` columns ``y``, logits ``L = s * x @ y.T`` (+ ``b``), and
optionally one positive per row at column ``i + offset`` (``offset=None``: a negative-only block).
Every function here holds at most two ``(c, N)`` buffers at once, ``c = chunk_rows(...)`` rows per chunk,
and computes in the accumulation dtype (float32; float64 for float64 inputs). The math of each
primitive is stated in ``fastclip/ops/blocks.py``; the Triton kernels (``fastclip.kernels``) compute
the same things.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclip import _checks
from fastclip.ops.dispatch import CHUNK_ELEMENTS, acc_dtype, chunk_rows


def positive_rows(n: int, n_cols: int, offset: int | None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` whose positive column ``i + offset`` lies inside ``[0, n_cols)``."""
    if offset is None:
        return 0, 0
    lo = max(0, -offset)
    hi = min(n, n_cols - offset)
    return lo, max(lo, hi)


def positive_logits(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, offset: int | None
) -> torch.Tensor:
    """``s * x_i . y_{i+offset}`` for the rows that have a positive, in the accumulation dtype. O(n·D).

    Eager, in row chunks of at most CHUNK_ELEMENTS: the upcast copies of x and y rows and their product
    stay one chunk each, not three (n, D) fp32 buffers (288 MiB at n = 32768, D = 768). While
    ``torch.compile`` traces, one expression: the compiler fuses it without temporaries.
    """
    acc = acc_dtype(x.dtype)
    lo, hi = positive_rows(x.shape[0], y.shape[0], offset)
    if hi <= lo:
        return torch.zeros(0, dtype=acc, device=x.device)
    xs, ys = x[lo:hi], y[lo + offset : hi + offset]
    s = scale.to(acc).reshape(())
    step = max(1, CHUNK_ELEMENTS // max(1, x.shape[1]))
    if _checks._is_compiling() or hi - lo <= step:
        return (xs.to(acc) * ys.to(acc)).sum(-1) * s
    out = torch.empty(hi - lo, dtype=acc, device=x.device)
    for i in range(0, hi - lo, step):
        out[i : i + step] = (xs[i : i + step].to(acc) * ys[i : i + step].to(acc)).sum(-1)
    return out.mul_(s)


def clip_lse_torch(x, y, scale, chunk_size=None):
    acc = acc_dtype(x.dtype)
    n, N = x.shape[0], y.shape[0]
    c = chunk_rows(n, N, chunk_size)
    s = scale.detach().to(acc).reshape(())
    yt = y.detach().to(acc).t()  # (D, N)
    lse_row = torch.empty(n, dtype=acc, device=x.device)
    lse_col = torch.full((N,), float("-inf"), dtype=acc, device=x.device)
    for i0 in range(0, n, c):
        # The scale goes on the (c, D) rows, not the (c, N) product: one pass less over the chunk.
        logits = (x[i0 : i0 + c].detach().to(acc) * s) @ yt  # (c, N)
        lse_row[i0 : i0 + c] = torch.logsumexp(logits, dim=1)
        # Columns merge per-chunk log-sum-exps: exact whatever the scale (no fixed shift).
        lse_col = torch.logaddexp(lse_col, torch.logsumexp(logits, dim=0))
    return lse_row, lse_col


def clip_grad_torch(x, y, scale, lse_row, lse_col, coef_row, coef_col, offset, pos_coef, chunk_size=None):
    acc = acc_dtype(x.dtype)
    n, N = x.shape[0], y.shape[0]
    c = chunk_rows(n, N, chunk_size)
    s = scale.detach().to(acc).reshape(())
    y_acc = y.detach().to(acc)  # (N, D)
    dx = torch.empty(x.shape, dtype=acc, device=x.device)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device)
    ds = torch.zeros((), dtype=acc, device=x.device)
    lo, hi = positive_rows(n, N, offset)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        xc = x[i0:i1].detach().to(acc)  # (c, D)
        logits = (xc * s) @ y_acc.t()  # (c, N)
        use_row = lse_row is not None and coef_row != 0
        use_col = lse_col is not None and coef_col != 0
        # Work in place: at most two (c, N) buffers live (logits, grad).
        if use_row:
            grad = (logits - lse_row[i0:i1, None]).exp_().mul_(coef_row)
            if use_col:
                grad.add_(logits.sub_(lse_col[None, :]).exp_(), alpha=coef_col)
        elif use_col:
            grad = logits.sub_(lse_col[None, :]).exp_().mul_(coef_col)
        else:
            grad = torch.zeros_like(logits)
        del logits
        p0, p1 = max(i0, lo), min(i1, hi)
        if p1 > p0:
            rows = torch.arange(p0 - i0, p1 - i0, device=x.device)
            grad[rows, rows + i0 + offset] -= pos_coef
        gy = grad @ y_acc  # (c, D)
        # ds = sum_ij G_ij x_i.y_j = sum_i x_i.(G y)_i: O(c·D) instead of a pass over (c, N).
        ds += torch.vdot(xc.reshape(-1), gy.reshape(-1))
        dx[i0:i1] = gy.mul_(s)
        dy.addmm_(grad.t(), xc, alpha=s)
    return dx, dy, ds


def siglip_block_torch(x, y, scale, bias, offset, need_grad, chunk_size=None):
    acc = acc_dtype(x.dtype)
    n, N = x.shape[0], y.shape[0]
    c = chunk_rows(n, N, chunk_size)
    s = scale.detach().to(acc).reshape(())
    b = bias.detach().to(acc).reshape(()) if bias is not None else torch.zeros((), dtype=acc, device=x.device)
    y_acc = y.detach().to(acc)  # (N, D)
    total = torch.zeros((), dtype=acc, device=x.device)
    dx = torch.empty(x.shape, dtype=acc, device=x.device) if need_grad else None
    dy = torch.zeros(y.shape, dtype=acc, device=x.device) if need_grad else None
    ds = torch.zeros((), dtype=acc, device=x.device)
    db = torch.zeros((), dtype=acc, device=x.device)
    lo, hi = positive_rows(n, N, offset)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        xc = x[i0:i1].detach().to(acc)
        logits = ((xc * s) @ y_acc.t()).add_(b)  # (c, N); the scale rides on the (c, D) rows
        # softplus(L) = -logsigmoid(-L): one fused, stable op without softplus's threshold switch.
        # Negating in place twice is exact and saves a (c, N) temporary.
        total -= F.logsigmoid(logits.neg_()).sum()
        if not need_grad:
            continue
        grad = logits.neg_().sigmoid_()  # reuses the logits buffer
        del logits
        p0, p1 = max(i0, lo), min(i1, hi)
        if p1 > p0:
            rows = torch.arange(p0 - i0, p1 - i0, device=x.device)
            grad[rows, rows + i0 + offset] -= 1
        db += grad.sum()
        gy = grad @ y_acc  # (c, D)
        ds += torch.vdot(xc.reshape(-1), gy.reshape(-1))  # sum_ij G_ij x_i.y_j = sum_i x_i.(G y)_i
        dx[i0:i1] = gy.mul_(s)
        dy.addmm_(grad.t(), xc, alpha=s)
    # Positives: softplus(-L) = softplus(L) - L.
    pos = positive_logits(x, y, scale, offset) + b
    total = total - pos.sum()
    return total, dx, dy, ds, db
