"""The two passes of the distillation loss in chunked PyTorch. The math is stated in
``fastclip/ops/distill.py``; the custom ops over these functions and the Triton launchers are in
``fastclip/ops/library.py``.
"""

from __future__ import annotations

import torch

from fastclip.ops.dispatch import DISTILL_CHUNK_ELEMENTS, acc_dtype, chunk_rows
from fastclip.ops.torch_impl import positive_rows

# Four to five fp32 buffers of DISTILL_CHUNK_ELEMENTS logits live at once per chunk: ~160 MiB, against
# several GiB for the materialized loss at B = 16384.


def _rows(n: int, N: int, chunk_size: int | None) -> int:
    return chunk_rows(n, N, chunk_size, DISTILL_CHUNK_ELEMENTS)


def _merge_col(lse_acc, m_acc, lse_part, m_part):
    """Merge column log-sum-exps and the weighted means ``m`` that they normalize."""
    lse_new = torch.logaddexp(lse_acc, lse_part)
    # -inf - (-inf) never happens here: lse_part is finite for every column of a non-empty chunk.
    m_new = m_acc * torch.exp(lse_acc - lse_new) + m_part * torch.exp(lse_part - lse_new)
    return lse_new, m_new


def _weighted_lse(lt, ls, dim, inplace):
    """``(logsumexp(lt, dim), sum(softmax(lt, dim) * ls, dim))`` with one exp over ``lt`` (in place on
    ``lt`` when ``inplace``). An all -inf line (none here: every row and column has a logit) would be NaN."""
    mx = lt.amax(dim, keepdim=True)
    e = lt.sub_(mx) if inplace else lt - mx
    e = e.exp_()
    total = e.sum(dim)
    m = e.mul_(ls).sum(dim) / total
    return mx.squeeze(dim) + torch.log(total), m


def distill_stats_torch(x, y, s, xt, yt, t, both, chunk_size=None):
    """Pass 1. Returns ``(lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col)``; the column
    entries are None unless ``both``. At most four (c, N) buffers live per chunk (two logit tiles, one
    exp, one temporary inside ``logsumexp``)."""
    acc = acc_dtype(x.dtype)
    n, N = x.shape[0], y.shape[0]
    c = _rows(n, N, chunk_size)
    s = s.detach().to(acc).reshape(())
    t = t.detach().to(acc).reshape(())
    yT, ytT = y.detach().to(acc).t(), yt.detach().to(acc).t()
    dev = x.device
    lse_s_row, lse_t_row, m_row = (torch.empty(n, dtype=acc, device=dev) for _ in range(3))
    lse_s_col = lse_t_col = m_col = None
    if both:
        lse_s_col = torch.full((N,), float("-inf"), dtype=acc, device=dev)
        lse_t_col = torch.full((N,), float("-inf"), dtype=acc, device=dev)
        m_col = torch.zeros(N, dtype=acc, device=dev)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        ls = (x[i0:i1].detach().to(acc) * s) @ yT  # (c, N) student logits
        lt = (xt[i0:i1].detach().to(acc) * t) @ ytT  # (c, N) teacher logits
        lse_s_row[i0:i1] = torch.logsumexp(ls, dim=1)
        if both:
            lse_s_col = torch.logaddexp(lse_s_col, torch.logsumexp(ls, dim=0))
        # Teacher: one exp per direction gives both its log-sum-exp and the weights of m.
        lse_t, m = _weighted_lse(lt, ls, dim=1, inplace=not both)
        lse_t_row[i0:i1], m_row[i0:i1] = lse_t, m
        if both:
            lse_t_col, m_col = _merge_col(lse_t_col, m_col, *_weighted_lse(lt, ls, dim=0, inplace=True))
        del ls, lt
    return lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col


def distill_grad_torch(x, y, s, xt, yt, t, stats, coefs, offset, need_student, need_teacher, chunk_size=None):
    """Pass 2: ``(dx, dy, ds, dxt, dyt, dt)`` in the accumulation dtype (None where not needed).
    ``coefs`` = ``(ar, ac, br, bc, p)`` as a tensor. At most four (c, N) buffers live per chunk (five
    when the teacher needs gradients)."""
    acc = acc_dtype(x.dtype)
    n, N = x.shape[0], y.shape[0]
    c = _rows(n, N, chunk_size)
    dev = x.device
    lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col = stats
    both = lse_s_col is not None
    s = s.detach().to(acc).reshape(())
    t = t.detach().to(acc).reshape(())
    ar, ac, br, bc, p = coefs.to(acc).unbind(0)
    y_a, yt_a = y.detach().to(acc), yt.detach().to(acc)
    dx = dy = ds = dxt = dyt = dt = None
    if need_student:
        dx = torch.empty(x.shape, dtype=acc, device=dev)
        dy = torch.zeros(y.shape, dtype=acc, device=dev)
        ds = torch.zeros((), dtype=acc, device=dev)
    if need_teacher:
        dxt = torch.empty(xt.shape, dtype=acc, device=dev)
        dyt = torch.zeros(yt.shape, dtype=acc, device=dev)
        dt = torch.zeros((), dtype=acc, device=dev)
    lo, hi = positive_rows(n, N, offset)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        xc, xtc = x[i0:i1].detach().to(acc), xt[i0:i1].detach().to(acc)
        ls = (xc * s) @ y_a.t()  # (c, N)
        lt = (xtc * t) @ yt_a.t()  # (c, N)
        pt = (lt - lse_t_row[i0:i1, None]).exp_()  # teacher row softmax
        g = gt = None
        if need_teacher:
            gt = (ls - m_row[i0:i1, None]).mul_(pt).mul_(-br)
        if need_student:
            g = (ls - lse_s_row[i0:i1, None]).exp_().mul_(ar)
            g.sub_(pt.mul_(br))
        del pt
        if both:
            ptc = lt.sub_(lse_t_col[None, :]).exp_()  # teacher column softmax, in place on lt
            if need_teacher:
                gt.sub_((ls - m_col[None, :]).mul_(ptc).mul_(bc))
            if need_student:
                # In place on ptc and ls: both are dead after this.
                g.sub_(ptc.mul_(bc))
                g.add_(ls.sub_(lse_s_col[None, :]).exp_().mul_(ac))
        del ls, lt
        if need_student:
            p0, p1 = max(i0, lo), min(i1, hi)
            if p1 > p0:
                rows = torch.arange(p0 - i0, p1 - i0, device=dev)
                g[rows, rows + i0 + offset] -= p
            gy = g @ y_a  # (c, D)
            ds += torch.vdot(xc.reshape(-1), gy.reshape(-1))  # sum(G * x y^T) = sum_i x_i.(G y)_i
            dx[i0:i1] = gy.mul_(s)
            dy.addmm_(g.t(), xc, alpha=s)
            del g
        if need_teacher:
            gy = gt @ yt_a
            dt += torch.vdot(xtc.reshape(-1), gy.reshape(-1))
            dxt[i0:i1] = gy.mul_(t)
            dyt.addmm_(gt.t(), xtc, alpha=t)
    return dx, dy, ds, dxt, dyt, dt
