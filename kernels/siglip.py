"""Fused SigLIP (sigmoid) loss kernel: loss sum and, in the same pass, the block gradients.

A block is ``n`` rows ``x (n, D)`` against ``N`` columns ``y (N, D)``, logits ``L = s * x @ y.T + b``,
label ``+1`` at column ``i + offset`` (none when ``offset`` is None) and ``-1`` elsewhere. Two identities
make the positives a correction on top of an all-negative block, applied inside the tile:

    softplus(-z L) = softplus(L) - [positive] * L        dloss/dL = sigmoid(L) - [positive]

Design (same as the CLIP backward, see ``kernels/clip.py``): no normalizer couples the tiles, so one
kernel recomputes each ``BM x BN`` tile of L (``tl.dot``, fp32 accumulator) and writes per-tile partials
of the loss sum, ``ds = sum(G * x y^T)`` and ``db = sum(G)``; when gradients are needed it also writes
the tile of ``G`` (input dtype; values in [-1, 1]) into a ``c x nc`` workspace, and cuBLAS GEMMs
accumulate ``dX_c += G Y_p`` and ``dY_p += G^T X_c`` (chunk shape from ``config.grad_tiles``, grouped
grid order as in ``clip_grad``), so memory stays O((n + N) D) plus the bounded workspace. FLOPs
``2 nND`` (loss only) or ``6 nND``. Partials are summed in a fixed order: deterministic, no atomics.

Epilogue, one exponential per logit: with ``z = exp(-|L|)`` in (0, 1] and ``r = 1 / (1 + z)``,
``sigmoid(L) = r`` for L >= 0 and ``z r`` otherwise, and ``softplus(L) = max(L, 0) + log1p(z)`` with
``log1p(z) = 2 atanh(t)``, ``t = z / (2 + z)`` in (0, 1/3], summed as the odd series up to ``t**13``
(truncation below 1.5e-8 relative, fp32 evaluation within 2.2e-7 over z in (0, 1], checked with numpy;
no libdevice ``logf``, no second ``exp`` for the sigmoid, no overflow for any L).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastclip.kernels import config, gemm
from fastclip.kernels.clip import EPI, LN2, LOG2E, operand_dot, tma_operands
from fastclip.kernels.common import (
    check_block,
    check_offset,
    dot_operands,
    grouped_tile,
    meta_flags,
    on_tensor_device,
    positives_in,
    scalar_f32,
)


# ``offset`` (compared with indices) and ``stride_part`` (addresses two scalar stores) are not
# specialized: one binary for every offset and grid size (kernels/clip.py, _clip_grad_kernel).
@triton.jit(do_not_specialize=["offset", "stride_part"])
def _siglip_tile_kernel(
    # pointers
    x_ptr,
    y_ptr,
    scale_ptr,
    bias_ptr,
    g_ptr,
    part_ptr,
    # sizes (offset: column of row 0's positive in this chunk and panel)
    n,
    N,
    D,
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
    GROUP_M: tl.constexpr,
    EPI: tl.constexpr = 0,
    EVEN: tl.constexpr = False,
    TMA: tl.constexpr = False,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, n, N, BM, BN, GROUP_M)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_mask = rows < n
    col_mask = cols < N
    valid = row_mask[:, None] & col_mask[None, :]
    s = tl.load(scale_ptr).to(tl.float32)
    S = operand_dot(
        x_ptr, y_ptr, pid_m * BM, pid_n * BN, rows, cols, row_mask, col_mask, D,
        stride_xm, stride_xk, stride_ym, stride_yk, BM, BN, BK, UPCAST, IEEE, TMA,
    )  # fmt: skip
    if EPI == 0:
        L = S * s
        if HAS_BIAS:
            L += tl.load(bias_ptr).to(tl.float32)
        # One exp per logit (see the module docstring): z = exp(-|L|), log1p(z) = 2 atanh(z / (2 + z)).
        z = tl.exp(-tl.abs(L))
        if HAS_POS:
            target = rows.to(tl.int64) + offset  # int64: offset may pass 2**31
            is_pos = cols.to(tl.int64)[None, :] == target[:, None]
        if NEED_GRAD:
            # The gradient first: once it is stored and reduced, S is dead before the loss needs registers.
            r = 1.0 / (1.0 + z)
            G = tl.where(L >= 0.0, r, z * r)  # sigmoid(L)
            if HAS_POS:
                G = tl.where(is_pos, G - 1.0, G)
            G = tl.where(valid, G, 0.0)
            g_out = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
            tl.store(g_out, G.to(g_ptr.dtype.element_ty), mask=valid)
            tl.store(part_ptr + stride_part + pid, tl.sum(tl.sum(G * S, 1), 0))
            tl.store(part_ptr + 2 * stride_part + pid, tl.sum(tl.sum(G, 1), 0))
        t = z / (2.0 + z)
        t2 = t * t
        p = 1.0 / 13.0
        p = p * t2 + 1.0 / 11.0
        p = p * t2 + 1.0 / 9.0
        p = p * t2 + 1.0 / 7.0
        p = p * t2 + 1.0 / 5.0
        p = p * t2 + 1.0 / 3.0
        p = p * t2 + 1.0
        loss = tl.maximum(L, 0.0) + 2.0 * t * p
        if HAS_POS:
            loss = tl.where(is_pos, loss - L, loss)
        loss = tl.where(valid, loss, 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.sum(loss, 1), 0))
    else:
        # Base 2 (kernels/clip.py, _clip_grad_kernel): L2 = L log2(e), z = exp2(-|L2|) is one MUFU.EX2;
        # the loss is summed in log2 units, log1p(z) / ln 2 = 2 log2(e) atanh(t), and scaled by ln 2 once.
        L = S * (s * LOG2E)
        if HAS_BIAS:
            L += tl.load(bias_ptr).to(tl.float32) * LOG2E
        z = tl.exp2(-tl.abs(L))
        diag_tile = False
        if HAS_POS:  # the positives j = i + offset cross this tile only if d is in (-BM, BN)
            d = offset - (pid_n * BN - pid_m * BM).to(tl.int64)
            diag_tile = (d > -BM) & (d < BN)
            diag = tl.arange(0, BN)[None, :] - tl.arange(0, BM)[:, None] == d.to(tl.int32)
        if NEED_GRAD:
            r = 1.0 / (1.0 + z)
            G = tl.where(L >= 0.0, r, z * r)  # sigmoid(L)
            if diag_tile:
                G = tl.where(diag, G - 1.0, G)
            g_out = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
            if EVEN:
                tl.store(g_out, G.to(g_ptr.dtype.element_ty))
            else:
                G = tl.where(valid, G, 0.0)
                tl.store(g_out, G.to(g_ptr.dtype.element_ty), mask=valid)
            tl.store(part_ptr + stride_part + pid, tl.sum(tl.sum(G * S, 1), 0))
            tl.store(part_ptr + 2 * stride_part + pid, tl.sum(tl.sum(G, 1), 0))
        t = z / (2.0 + z)
        t2 = t * t
        p = (2.0 * LOG2E) / 13.0
        p = p * t2 + (2.0 * LOG2E) / 11.0
        p = p * t2 + (2.0 * LOG2E) / 9.0
        p = p * t2 + (2.0 * LOG2E) / 7.0
        p = p * t2 + (2.0 * LOG2E) / 5.0
        p = p * t2 + (2.0 * LOG2E) / 3.0
        p = p * t2 + 2.0 * LOG2E
        loss = tl.maximum(L, 0.0) + t * p
        if diag_tile:
            loss = tl.where(diag, loss - L, loss)
        if not EVEN:
            loss = tl.where(valid, loss, 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.sum(loss, 1), 0) * LN2)


@on_tensor_device
def siglip_block(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    offset: int | None,
    need_grad: bool,
    *,
    rows_per_chunk: int | None = None,
    cols_per_panel: int | None = None,
    timer: gemm.PhaseTimer | None = None,
):
    """One block of the sigmoid loss. Returns ``(loss_sum, dx, dy, ds, db)``: fp32, ``dx (n, D)`` and
    ``dy (N, D)`` None unless ``need_grad``. Equivalent to::

        S = x.float() @ y.float().T;  L = scale * S + bias;  P = (j == i + offset)
        loss_sum = (F.softplus(L) - P * L).sum()
        G = torch.sigmoid(L) - P
        dx, dy, ds, db = scale * G @ y, scale * G.T @ x, (G * S).sum(), G.sum()

    ``rows_per_chunk`` / ``cols_per_panel`` override the workspace-derived chunk shape (tests);
    ``timer`` (a ``gemm.PhaseTimer``) collects the time of the tile kernel and the two GEMMs.
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
    cfg = config.tile_config("siglip", dev, x.dtype, D)
    epi = EPI[cfg.epilogue]
    if epi == 2:
        raise ValueError(f"siglip: epilogue {cfg.epilogue!r} is for the forward (lse) only")
    s = scalar_f32(scale)
    b = scalar_f32(bias) if bias is not None else s  # placeholder pointer without bias
    if need_grad:
        c, nc = config.grad_tiles(n, N, config.GRAD_WORKSPACE_ELEMENTS, cfg.block_m, cfg.block_n)
    else:
        # Only per-tile partials are written: 3 per (BM x BN) tile.
        c = config.chunk_rows(
            n, N, config.LSE_WORKSPACE_ELEMENTS // 3, cfg.block_m,
            rows_per_elem=cfg.block_m, cols_per_elem=cfg.block_n,
        )  # fmt: skip
        nc = N
    c = max(1, min(n, rows_per_chunk or c))
    nc = max(1, min(N, cols_per_panel or nc))
    workspace = torch.empty(c * nc, dtype=x.dtype, device=dev) if need_grad else None
    dx = torch.zeros((n, D), dtype=torch.float32, device=dev) if need_grad else None
    dy = torch.zeros((N, D), dtype=torch.float32, device=dev) if need_grad else None
    sums = torch.zeros(3, dtype=torch.float32, device=dev)  # loss, ds, db
    flags = meta_flags(x.dtype)
    x_dot, y_dot = dot_operands(x, y)  # the kernel's operands (TF32-rounded under TF32); GEMMs read x, y
    timer = timer or gemm.PhaseTimer.disabled()
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        xc, xc_dot = x[i0:i1], x_dot[i0:i1]
        for j0 in range(0, N, nc):
            j1 = min(N, j0 + nc)
            yp, yp_dot = y[j0:j1], y_dot[j0:j1]
            # placeholder pointer without gradients
            g = workspace[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0) if need_grad else xc
            pos = positives_in(offset, i0, i1, j0, j1)
            grid = triton.cdiv(i1 - i0, cfg.block_m) * triton.cdiv(j1 - j0, cfg.block_n)
            # Without gradients the kernel writes only the loss row: the other two stay 0.
            part = (torch.empty if need_grad else torch.zeros)((3, grid), dtype=torch.float32, device=dev)
            xa, ya, tma = tma_operands(cfg, xc_dot, yp_dot, cfg.block_m, cfg.block_n)
            variant = {} if epi == 0 and not tma else {
                "EPI": epi, "TMA": tma, "EVEN": (i1 - i0) % cfg.block_m == 0 and (j1 - j0) % cfg.block_n == 0,
            }  # fmt: skip
            with timer.phase("tile kernel"):
                _siglip_tile_kernel[(grid,)](
                    xa, ya, s, b, g, part,
                    i1 - i0, j1 - j0, D, offset + i0 - j0 if pos else 0,
                    xc_dot.stride(0), xc_dot.stride(1), yp_dot.stride(0), yp_dot.stride(1), g.stride(0),
                    part.stride(0),
                    BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
                    HAS_BIAS=bias is not None, HAS_POS=pos, NEED_GRAD=need_grad, GROUP_M=cfg.group_m,
                    **variant, **cfg.launch(), **flags,
                )  # fmt: skip
                sums += part.sum(dim=1)
            if need_grad:
                with timer.phase("dX GEMM"):
                    gemm.accumulate(dx[i0:i1], g, yp)
                with timer.phase("dY GEMM"):
                    gemm.accumulate(dy[j0:j1], g.t(), xc)
    if need_grad:
        dx.mul_(s.reshape(()))
        dy.mul_(s.reshape(()))
    return sums[0], dx, dy, sums[1], sums[2]
