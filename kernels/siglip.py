"""Fused SigLIP (sigmoid) loss kernel: loss sum and, in the same pass, the block gradients.

A block is ``n`` rows ``x (n, D)`` against ``N`` columns ``y (N, D)``, logits ``L = s * x @ y.T + b``,
label ``+1`` at column ``i + offset`` (none when ``offset`` is None) and ``-1`` elsewhere. Two identities
make the positives a correction on top of an all-negative block, applied inside the tile:

    softplus(-z L) = softplus(L) - [positive] * L        dloss/dL = sigmoid(L) - [positive]

Design (same as the CLIP backward, see ``kernels/clip.py``): no normalizer couples the tiles, so one
kernel recomputes each ``BM x BN`` tile of L (``tl.dot``, fp32 accumulator) and writes per-tile partials
of the loss sum, ``ds = sum(G * x y^T)`` and ``db = sum(G)``; when gradients are needed it also writes
the tile of ``G`` (input dtype; values in [-1, 1]) into a ``c x N`` workspace, and cuBLAS GEMMs form
``dX_c = s G_c Y`` and ``dY += s G_c^T X_c``. Rows go in chunks of ``c`` (``GRAD_WORKSPACE_ELEMENTS``),
so memory stays O((n + N) D) plus the bounded workspace. FLOPs ``2 nND`` (loss only) or ``6 nND``.
Partials are summed in a fixed order: deterministic, no atomics.

softplus is evaluated as ``max(t, 0) + log(1 + exp(-|t|))``: no overflow for any t, and where
``exp(-|t|)`` is below fp32 resolution the dropped term is below the sum's rounding anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastclip.kernels import config
from fastclip.kernels.clip import (
    accumulate_dy,
    check_block,
    check_offset,
    chunk_rows,
    meta_flags,
    mm_f32,
    scalar_f32,
    sim_tile,
)


@triton.jit
def _siglip_tile_kernel(
    # pointers
    x_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    g_ptr,
    part_ptr,
    # sizes
    n,
    N,
    D,
    row0,
    offset,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yk,
    stride_gm,
    stride_part,
    # meta
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)  # column tiles on axis 0, as in _clip_grad_kernel
    pid_m = tl.program_id(1)
    pid = pid_m * tl.num_programs(0) + pid_n
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_mask = rows < n
    col_mask = cols < N
    valid = row_mask[:, None] & col_mask[None, :]
    s = tl.load(scale_ptr).to(tl.float32)
    S = sim_tile(
        x_ptr, y_ptr, rows, cols, row_mask, col_mask, D,
        stride_xm, stride_xk, stride_ym, stride_yk, BM, BN, BK, UPCAST, IEEE,
    )  # fmt: skip
    L = S * s
    if HAS_BIAS:
        L += tl.load(bias_ptr).to(tl.float32)
    # softplus(L) = max(L, 0) + log1p(exp(-|L|)). Triton has no log1p; log(1 + z) loses z's low bits
    # when z is small (|L| > ~5), so use log1p(z) = z * log(u) / (u - 1) with u = 1 + z (exact
    # cancellation of u's rounding; Goldberg), and z itself where u rounds to 1.
    z = tl.exp(-tl.abs(L))
    u = 1.0 + z
    loss = tl.maximum(L, 0.0) + tl.where(u == 1.0, z, z * tl.log(u) / tl.where(u == 1.0, 1.0, u - 1.0))
    G = tl.sigmoid(L)  # dead code (eliminated) when NEED_GRAD is False
    if HAS_POS:
        target = (rows.to(tl.int64) + row0) + offset  # global row + offset, int64
        is_pos = cols.to(tl.int64)[None, :] == target[:, None]
        loss = tl.where(is_pos, loss - L, loss)
        G = tl.where(is_pos, G - 1.0, G)
    loss = tl.where(valid, loss, 0.0)
    tl.store(part_ptr + pid, tl.sum(tl.sum(loss, 1), 0))
    if NEED_GRAD:
        G = tl.where(valid, G, 0.0)
        tl.store(part_ptr + stride_part + pid, tl.sum(tl.sum(G * S, 1), 0))
        tl.store(part_ptr + 2 * stride_part + pid, tl.sum(tl.sum(G, 1), 0))
        g_out = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
        tl.store(g_out, G.to(g_ptr.dtype.element_ty), mask=valid)


def siglip_block(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int | None,
    need_grad: bool,
    *,
    rows_per_chunk: int | None = None,
):
    """One block of the sigmoid loss. Returns ``(loss_sum, dx, dy, ds, db)``: fp32, ``dx (n, D)`` and
    ``dy (N, D)`` None unless ``need_grad``. Equivalent to::

        S = x.float() @ y.float().T;  L = scale * S + bias;  P = (j == i + offset)
        loss_sum = (F.softplus(L) - P * L).sum()
        G = torch.sigmoid(L) - P
        dx, dy, ds, db = scale * G @ y, scale * G.T @ x, (G * S).sum(), G.sum()

    ``rows_per_chunk`` overrides the workspace-derived chunk (tests).
    """
    check_block(x, y, scale)
    check_offset(offset)
    if not isinstance(need_grad, bool):
        raise TypeError(f"need_grad: expected a bool, got {type(need_grad).__name__}")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.numel() != 1 or not bias.is_floating_point()
    ):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias: expected a 1-element floating tensor or None, got {got}")
    if bias is not None and bias.device != x.device:
        raise ValueError(f"bias: expected device {x.device} (as x), got {bias.device}")
    x, y = x.detach().contiguous(), y.detach().contiguous()
    n, D = x.shape
    N = y.shape[0]
    dev = x.device
    cfg = config.tile_config("tile", dev, x.dtype)
    s = scalar_f32(scale)
    b = scalar_f32(bias) if bias is not None else s  # placeholder pointer without bias
    lo = hi = 0
    if offset is not None:
        lo, hi = max(0, -offset), min(n, N - offset)
    has_pos = hi > lo
    col_blocks = triton.cdiv(N, cfg.block_n)
    if need_grad:
        budget = config.GRAD_WORKSPACE_ELEMENTS
    else:
        # Only per-tile partials are written: (c / BM) x (N / BN) of them per chunk.
        budget = config.LSE_WORKSPACE_ELEMENTS * cfg.block_n
    c = rows_per_chunk or chunk_rows(n, N, budget, cfg.block_m)
    c = max(1, min(n, c))
    workspace = torch.empty((c, N), dtype=x.dtype, device=dev) if need_grad else None
    dx = torch.zeros((n, D), dtype=torch.float32, device=dev) if need_grad else None
    dy = torch.zeros((N, D), dtype=torch.float32, device=dev) if need_grad else None
    sums = torch.zeros(3, dtype=torch.float32, device=dev)  # loss, ds, db
    flags = meta_flags(x.dtype)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        row_blocks = triton.cdiv(i1 - i0, cfg.block_m)
        xc = x[i0:i1]
        g = workspace[: i1 - i0] if need_grad else x  # placeholder pointer without gradients
        part = torch.zeros((3, row_blocks * col_blocks), dtype=torch.float32, device=dev)
        _siglip_tile_kernel[(col_blocks, row_blocks)](
            xc, y, s, b, g, part,
            i1 - i0, N, D, i0, offset if has_pos else 0,
            xc.stride(0), xc.stride(1), y.stride(0), y.stride(1), g.stride(0), part.stride(0),
            BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
            HAS_BIAS=bias is not None, HAS_POS=has_pos, NEED_GRAD=need_grad,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
        )  # fmt: skip
        sums += part.sum(dim=1)
        if need_grad:
            dx[i0:i1] = mm_f32(g, y)
            accumulate_dy(dy, g, xc)
    if need_grad:
        dx.mul_(s.reshape(()))
        dy.mul_(s.reshape(()))
    return sums[0], dx, dy, sums[1], sums[2]
