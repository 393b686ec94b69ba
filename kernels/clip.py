"""Fused CLIP (softmax) loss kernels: block log-sum-exp (forward) and block gradients (backward).

A block is ``n`` rows ``x (n, D)`` against ``N`` columns ``y (N, D)`` with logits ``L = s * x @ y.T``
(see ``fastclip/ops/clip.py``). The launchers never allocate anything of size ``n x N``.

Design (docs/kernels.md; the design space in docs/design.md): **fused forward, chunk-materialized
backward**.

* Forward, ``clip_lse``: each program owns ``BM`` rows and walks a range of ``BN``-column tiles; a tile of
  ``L`` is recomputed from X and Y with ``tl.dot`` (fp32 accumulator, tensor cores for bf16/fp16, TF32
  for fp32 when TF32 is enabled, see ``gemm.tf32_enabled``) in steps of ``BK`` over D. Row statistics are
  merged online inside the program; every tile writes its column log-sum-exp partial (max + log of the
  shifted sum: exact at any scale, no fixed shift) to a ``(row blocks, N)`` fp32 buffer, and when the
  columns of a row block are split between programs (to fill the GPU) each split writes its row
  partial. Partials are merged by ``torch.logsumexp`` in a fixed order: deterministic, no atomics.
  Rows are processed in chunks (``config.chunk_rows``) so that the partial buffer stays under
  ``LSE_WORKSPACE_ELEMENTS``.
  FLOPs: ``2 n N D``; memory: the partials only.
* Backward, ``clip_grad``: D is 512-1152 in this field, so a row block's ``BM x D`` fp32 accumulator for
  dX does not fit in registers. Instead, for ``c`` rows by ``nc`` columns at a time
  (``config.grad_tiles``: full-width chunks of >= 2048 rows, column panels beyond), a Triton kernel
  recomputes each tile of L and writes the gradient tile ``G`` (in the input dtype, normalized to O(1)
  values so fp16 does not underflow) into a ``c x nc`` workspace, plus per-tile partials of
  ``ds = sum(G * x y^T)``; then two cuBLAS GEMMs accumulate ``dX_c += G Y_p`` and ``dY_p += G^T X_c``
  in fp32 (``gemm.accumulate``: one fp32-output GEMM each where torch has it). The tile programs run
  in groups of ``GROUP_M`` row blocks sweeping the columns together, so each tile of Y is read from
  memory once per group. FLOPs: ``6 n N D`` (2 in Triton, 4 in cuBLAS at full matmul rate);
  deterministic (fixed reduction orders, no atomics).

Why this design: the fully fused backward needs either atomics on dY (non-deterministic) or a second
pass over S (10 nND FLOPs, Inf-CL's choice), and a register-resident dX accumulator is impossible at
these D; the chunk-materialized backward keeps 2/3 of its FLOPs in cuBLAS at the matmul rate and pays a
few memory passes over a bounded chunk. Speed: not yet measured on a GPU (benchmarks/device_check.sh
measures it; docs/kernels.md lists the expected effects as estimates).

Limits: ``n, N >= 1``, any ``D >= 1`` (masked; no padding by the caller); inputs float32, bfloat16 or
float16 (float64 runs on ``impl="torch"``); offsets and pointer arithmetic in int64.

Under the Triton interpreter (CPU) bf16 arithmetic is broken (docs/kernels.md, "Testing"), so there, and
only there, bf16 tiles are upcast to fp32 after loading (``UPCAST``); loads and stores of bf16 are exact.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from fastclip.kernels import config, gemm
from fastclip.kernels.common import (
    check_block,
    check_offset,
    check_stat,
    dot_operands,
    grouped_tile,
    meta_flags,
    on_tensor_device,
    positives_in,
    scalar_f32,
    sim_tile,
)

# ----------------------------------------------------------------------------------------------------
# kernels

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): base-2 epilogues fold it into the scale
LN2 = tl.constexpr(0.6931471805599453)
SHARED_SPREAD = tl.constexpr(config.SHARED_SPREAD_LOG2)
# config.TileConfig.epilogue as the kernels' EPI constexpr
EPI = {"exp": 0, "exp2": 1, "exp2-shared": 2}


@triton.jit
def operand_dot(
    x_ptr, y_ptr, r0, c0, rows, cols, row_mask, col_mask, D,
    stride_xm, stride_xk, stride_ym, stride_yk,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """``x[rows] @ y[cols].T`` (fp32, BM x BN): ``common.sim_tile`` on pointers, or with ``TMA`` the
    operand tiles through tensor descriptors (``x_ptr``, ``y_ptr`` are then ``TensorDescriptor``s of
    block [BM, BK] and [BN, BK]; rows, columns and the K tail past the tensor read zeros)."""
    if TMA:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            a = x_ptr.load([r0, k0])
            b = y_ptr.load([c0, k0])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if IEEE:
                acc = tl.dot(a, b.T, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b.T, acc)
        return acc
    else:
        return sim_tile(
            x_ptr, y_ptr, rows, cols, row_mask, col_mask, D,
            stride_xm, stride_xk, stride_ym, stride_yk, BM, BN, BK, UPCAST, IEEE,
        )  # fmt: skip


@triton.jit
def _two_exp2(L, m_row, m_safe, l_row):
    """Base-2 row update and column partial of a tile with two exponentials (own max as shift)."""
    l_row = l_row * tl.exp2(m_row - m_safe) + tl.sum(tl.exp2(L - m_safe[:, None]), 1)
    m_col = tl.max(L, 0)
    m_col_safe = tl.where(m_col == float("-inf"), 0.0, m_col)
    return l_row, m_col, tl.sum(tl.exp2(L - m_col_safe[None, :]), 0)


@triton.jit
def _lse_step(
    x_ptr, y_ptr, col_part_ptr, c0, c_end, pid_m, rows, row_mask, s, m_row, l_row, n, N, D,
    stride_xm, stride_xk, stride_ym, stride_yk, stride_cp,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    EPI: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One column tile of the forward: updates the row statistics, stores the column partials."""
    cols = c0 + tl.arange(0, BN)
    col_mask = cols < c_end
    S = operand_dot(
        x_ptr, y_ptr, pid_m * BM, c0, rows, cols, row_mask, col_mask, D,
        stride_xm, stride_xk, stride_ym, stride_yk, BM, BN, BK, UPCAST, IEEE, TMA,
    )  # fmt: skip
    col_out = col_part_ptr + pid_m.to(tl.int64) * stride_cp + cols
    if EPI == 0:
        L = tl.where(row_mask[:, None] & col_mask[None, :], S * s, float("-inf"))
        # Online row log-sum-exp. A fully masked row keeps m = -inf: shift by 0 there to avoid inf - inf.
        m_new = tl.maximum(m_row, tl.max(L, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_row = l_row * tl.exp(m_row - m_safe) + tl.sum(tl.exp(L - m_safe[:, None]), 1)
        m_row = m_new
        # Column partial of this tile: its own max as shift, so nothing underflows whatever s.
        m_col = tl.max(L, 0)
        m_col_safe = tl.where(m_col == float("-inf"), 0.0, m_col)
        l_col = tl.sum(tl.exp(L - m_col_safe[None, :]), 0)
        # Masked columns have l = 0: log(1) keeps their -inf without a log(0).
        tl.store(col_out, m_col + tl.log(tl.where(l_col == 0.0, 1.0, l_col)), mask=col_mask)
    else:
        # Base 2 (s carries log2(e)): exp2 is one MUFU.EX2. Partials stay (max, sum): no log here.
        L = S * s
        if not EVEN:
            L = tl.where(row_mask[:, None] & col_mask[None, :], L, float("-inf"))
        r_max = tl.max(L, 1)
        m_new = tl.maximum(m_row, r_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        if EPI == 2:
            t_max = tl.max(r_max, 0)
            if EVEN:
                t_min = tl.min(tl.min(L, 1), 0)
            else:
                t_min = tl.min(tl.min(tl.where(row_mask[:, None] & col_mask[None, :], L, float("inf")), 1), 0)
            if (t_max - t_min <= SHARED_SPREAD) & (t_max > float("-inf")):  # False for NaN, all -inf
                # One exponential for both sums: every term within 2**-62 of its row's or column's
                # largest stays a normal number (config.SHARED_SPREAD_LOG2).
                e = tl.exp2(L - t_max)
                f_row = tl.where(m_new == float("-inf"), 0.0, tl.exp2(t_max - m_safe))
                l_row = l_row * tl.exp2(m_row - m_safe) + f_row * tl.sum(e, 1)
                m_col = tl.zeros((BN,), dtype=tl.float32) + t_max
                l_col = tl.sum(e, 0)
            else:
                l_row, m_col, l_col = _two_exp2(L, m_row, m_safe, l_row)
        else:
            l_row, m_col, l_col = _two_exp2(L, m_row, m_safe, l_row)
        m_row = m_new
        if EVEN:
            tl.store(col_out, m_col * LN2)
            tl.store(col_out + N, l_col)
        else:
            tl.store(col_out, m_col * LN2, mask=col_mask)
            tl.store(col_out + N, l_col, mask=col_mask)
    return m_row, l_row


@triton.jit
def _clip_lse_kernel(
    x_ptr, y_ptr, scale_ptr, row_part_ptr, col_part_ptr,  # x, y: pointers or, with TMA, descriptors
    n, N, D, cols_per_split,  # sizes
    stride_xm, stride_xk, stride_ym, stride_yk, stride_rp, stride_cp,  # strides
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    EPI: tl.constexpr = 0, EVEN: tl.constexpr = False, FLAT: tl.constexpr = False, TMA: tl.constexpr = False,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < n
    s = tl.load(scale_ptr).to(tl.float32)
    if EPI != 0:
        s = s * LOG2E
    m_row = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_row = tl.zeros((BM,), dtype=tl.float32)
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, N)
    if FLAT:
        for c0 in tl.range(c_start, c_end, BN, flatten=True):
            m_row, l_row = _lse_step(
                x_ptr, y_ptr, col_part_ptr, c0, c_end, pid_m, rows, row_mask, s, m_row, l_row, n, N, D,
                stride_xm, stride_xk, stride_ym, stride_yk, stride_cp, BM, BN, BK, UPCAST, IEEE, EPI, EVEN, TMA,
            )  # fmt: skip
    else:
        for c0 in range(c_start, c_end, BN):
            m_row, l_row = _lse_step(
                x_ptr, y_ptr, col_part_ptr, c0, c_end, pid_m, rows, row_mask, s, m_row, l_row, n, N, D,
                stride_xm, stride_xk, stride_ym, stride_yk, stride_cp, BM, BN, BK, UPCAST, IEEE, EPI, EVEN, TMA,
            )  # fmt: skip
    if EPI != 0:
        m_row = m_row * LN2
    row_out = row_part_ptr + pid_s.to(tl.int64) * stride_rp + rows
    tl.store(row_out, m_row + tl.log(tl.where(l_row == 0.0, 1.0, l_row)), mask=row_mask)


# Triton specializes integer arguments (== 1, divisible by 16): one compiled variant per class. Not
# ``offset``: it is only compared with indices, never part of an address (the PTX of a training-step
# launch is identical without its specialization, AOT build for sm_90), so every offset of the
# positives shares one binary instead of one per class.
@triton.jit(do_not_specialize=["offset"])
def _clip_grad_kernel(
    x_ptr, y_ptr, scale_ptr, lse_row_ptr, lse_col_ptr, g_ptr, ds_part_ptr,  # x, y: pointers or descriptors
    # sizes and coefficients (offset: column of row 0's positive in this chunk and panel)
    n, N, D, offset, coef_row, coef_col, pos_coef, g_mul,
    stride_xm, stride_xk, stride_ym, stride_yk, stride_gm,  # strides
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr,
    HAS_POS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, GROUP_M: tl.constexpr,
    EPI: tl.constexpr = 0, EVEN: tl.constexpr = False, TMA: tl.constexpr = False,
):  # fmt: skip
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
        G = tl.zeros((BM, BN), dtype=tl.float32)
        if HAS_ROW:
            lse_r = tl.load(lse_row_ptr + rows, mask=row_mask, other=0.0)
            G += coef_row * tl.exp(L - lse_r[:, None])
        if HAS_COL:
            lse_c = tl.load(lse_col_ptr + cols, mask=col_mask, other=0.0)
            G += coef_col * tl.exp(L - lse_c[None, :])
        if HAS_POS:
            target = rows.to(tl.int64) + offset  # int64: offset may pass 2**31
            is_pos = cols.to(tl.int64)[None, :] == target[:, None]
            G = tl.where(is_pos, G - pos_coef, G)
        G = tl.where(valid, G, 0.0)
        tl.store(ds_part_ptr + pid, tl.sum(tl.sum(G * S, 1), 0))
        g_out = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
        tl.store(g_out, (G * g_mul).to(g_ptr.dtype.element_ty), mask=valid)
    else:
        # Base 2: exp(s S - lse) = exp2(S s log2(e) - lse log2(e)), one FFMA and one MUFU.EX2 each; the
        # stored G is (G / g_scale) directly (coefficients pre-multiplied), ds rescaled once per tile.
        s2 = s * LOG2E
        G = tl.zeros((BM, BN), dtype=tl.float32)
        if HAS_ROW:
            if EVEN:
                lse_r = tl.load(lse_row_ptr + rows)
            else:
                lse_r = tl.load(lse_row_ptr + rows, mask=row_mask, other=0.0)
            G += (coef_row * g_mul) * tl.exp2(S * s2 - (lse_r * LOG2E)[:, None])
        if HAS_COL:
            if EVEN:
                lse_c = tl.load(lse_col_ptr + cols)
            else:
                lse_c = tl.load(lse_col_ptr + cols, mask=col_mask, other=0.0)
            G += (coef_col * g_mul) * tl.exp2(S * s2 - (lse_c * LOG2E)[None, :])
        if HAS_POS:
            # The positives j = i + offset cross this tile only if offset - (c0 - r0) is in (-BM, BN).
            d = offset - (pid_n * BN - pid_m * BM).to(tl.int64)
            if (d > -BM) & (d < BN):
                diag = tl.arange(0, BN)[None, :] - tl.arange(0, BM)[:, None] == d.to(tl.int32)
                G = tl.where(diag, G - pos_coef * g_mul, G)
        if not EVEN:
            G = tl.where(valid, G, 0.0)
        tl.store(ds_part_ptr + pid, tl.sum(tl.sum(G * S, 1), 0) / g_mul)
        g_out = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
        if EVEN:
            tl.store(g_out, G.to(g_ptr.dtype.element_ty))
        else:
            tl.store(g_out, G.to(g_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------
# launchers


def _tma_ready(t: torch.Tensor) -> bool:
    """A 2-D operand TMA can read: unit inner stride, rows and base 16-byte aligned, 16-bit dtype."""
    return (
        t.dtype in (torch.bfloat16, torch.float16)
        and t.dim() == 2
        and t.stride(1) == 1
        and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0
    )


def tma_operands(cfg: config.TileConfig, x: torch.Tensor, y: torch.Tensor, block_x: int, block_y: int):
    """``(x_arg, y_arg, tma)``: tensor descriptors of blocks [block_x, BK] and [block_y, BK] when
    ``cfg.tma`` asks for them and both operands allow TMA (else the tensors themselves, pointer loads).
    Under the interpreter too (it reads descriptors as the compiled kernel does)."""
    if not cfg.tma or not (_tma_ready(x) and _tma_ready(y)):
        return x, y, False
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # triton < 3.4: no host-side descriptors
        return x, y, False
    bk = cfg.block_k
    return (
        TensorDescriptor(x, list(x.shape), list(x.stride()), [block_x, bk]),
        TensorDescriptor(y, list(y.shape), list(y.stride()), [block_y, bk]),
        True,
    )


@on_tensor_device
def clip_lse(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    *,
    rows_per_chunk: int | None = None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exp of ``L = scale * x @ y.T``: ``(n,)`` and ``(N,)`` fp32. Equivalent to::

        L = scale * x.float() @ y.float().T
        return L.logsumexp(1), L.logsumexp(0)

    ``rows_per_chunk`` and ``splits`` (column splits per row block) override the automatic choice
    (tests use them to cover the merge paths on small inputs).
    """
    check_block(x, y, scale)
    x, y = x.detach().contiguous(), y.detach().contiguous()
    n, D = x.shape
    N = y.shape[0]
    dev = x.device
    cfg = config.tile_config("lse", dev, x.dtype, D)
    epi = EPI[cfg.epilogue]
    s = scalar_f32(scale)
    # The partial buffer holds one row of N column partials per row block of the chunk (two, max
    # and sum, for the base-2 epilogues).
    c = rows_per_chunk or config.chunk_rows(
        n, N * (2 if epi else 1), config.LSE_WORKSPACE_ELEMENTS, cfg.block_m, rows_per_elem=cfg.block_m
    )
    c = max(1, min(n, c))
    col_tiles = triton.cdiv(N, cfg.block_n)
    lse_row = torch.empty(n, dtype=torch.float32, device=dev)
    lse_col = None
    flags = meta_flags(x.dtype)
    x, y = dot_operands(x, y)  # TF32-rounded copies when fp32 runs on TF32
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        row_blocks = triton.cdiv(i1 - i0, cfg.block_m)
        if splits is None:
            want = config.PROGRAMS_PER_SM * config.num_sms(dev)
            n_split = max(1, min(col_tiles, triton.cdiv(want, row_blocks), 65535))
        else:
            n_split = max(1, min(col_tiles, splits))
        cols_per_split = triton.cdiv(col_tiles, n_split) * cfg.block_n
        n_split = triton.cdiv(N, cols_per_split)
        xc = x[i0:i1]
        row_part = torch.empty((n_split, i1 - i0), dtype=torch.float32, device=dev)
        col_part = torch.empty(
            (row_blocks, 2, N) if epi else (row_blocks, N), dtype=torch.float32, device=dev
        )
        xa, ya, tma = tma_operands(cfg, xc, y, cfg.block_m, cfg.block_n)
        variant = {} if epi == 0 and not tma and not cfg.flatten else {
            "EPI": epi, "EVEN": (i1 - i0) % cfg.block_m == 0 and N % cfg.block_n == 0,
            "FLAT": cfg.flatten, "TMA": tma,
        }  # fmt: skip
        _clip_lse_kernel[(row_blocks, n_split)](
            xa, ya, s, row_part, col_part,
            i1 - i0, N, D, cols_per_split,
            xc.stride(0), xc.stride(1), y.stride(0), y.stride(1), row_part.stride(0), col_part.stride(0),
            BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, **variant, **cfg.launch(), **flags,
        )  # fmt: skip
        lse_row[i0:i1] = row_part[0] if n_split == 1 else torch.logsumexp(row_part, dim=0)
        if epi:  # (max, sum) pairs: max + log(sum), in place, then the same merge
            col_part[:, 1].log_().add_(col_part[:, 0])
            col_part = col_part[:, 1]
        part = col_part[0] if row_blocks == 1 else torch.logsumexp(col_part, dim=0)
        lse_col = part if lse_col is None else torch.logaddexp(lse_col, part)
    return lse_row, lse_col


@on_tensor_device
def clip_grad(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    lse_row: torch.Tensor | None,
    lse_col: torch.Tensor | None,
    coef_row: float,
    coef_col: float,
    offset: int | None,
    pos_coef: float,
    *,
    rows_per_chunk: int | None = None,
    cols_per_panel: int | None = None,
    timer: gemm.PhaseTimer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a block: ``dx (n, D)``, ``dy (N, D)`` fp32 and ``ds`` (0-dim fp32). Equivalent to::

        S = x.float() @ y.float().T;  L = scale * S
        G = coef_row * exp(L - lse_row[:, None]) + coef_col * exp(L - lse_col[None, :]) - pos_coef * P
        dx, dy, ds = scale * G @ y, scale * G.T @ x, (G * S).sum()

    with ``P[i, j] = (j == i + offset)`` (no positives when ``offset`` is None) and a term dropped when
    its ``lse`` is None. ``rows_per_chunk`` / ``cols_per_panel`` override the workspace-derived chunk
    shape (tests); ``timer`` (a ``gemm.PhaseTimer``) collects the time of the tile kernel and of the
    dX and dY GEMMs.
    """
    check_block(x, y, scale)
    check_offset(offset)
    n, D = x.shape
    N = y.shape[0]
    dev = x.device
    check_stat("lse_row", lse_row, n, dev)
    check_stat("lse_col", lse_col, N, dev)
    for name, v in (("coef_row", coef_row), ("coef_col", coef_col), ("pos_coef", pos_coef)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}: expected a finite float, got {v!r}")
    x, y = x.detach().contiguous(), y.detach().contiguous()
    has_row = lse_row is not None and coef_row != 0
    has_col = lse_col is not None and coef_col != 0
    has_pos = positives_in(offset, 0, n, 0, N) and pos_coef != 0
    dx = torch.zeros((n, D), dtype=torch.float32, device=dev)
    dy = torch.zeros((N, D), dtype=torch.float32, device=dev)
    ds = torch.zeros((), dtype=torch.float32, device=dev)
    if not (has_row or has_col or has_pos):
        return dx, dy, ds
    # G is stored divided by the largest coefficient: values O(1), so fp16 keeps its precision
    # (coefficients like 1/(2B) would push softmax probabilities into fp16's subnormals).
    g_scale = max(
        abs(coef_row) if has_row else 0.0,
        abs(coef_col) if has_col else 0.0,
        abs(pos_coef) if has_pos else 0.0,
    )
    cfg = config.tile_config("tile", dev, x.dtype, D)
    epi = EPI[cfg.epilogue]
    if epi == 2:
        raise ValueError(f"tile: epilogue {cfg.epilogue!r} is for the forward (lse) only")
    s = scalar_f32(scale)
    c, nc = config.grad_tiles(n, N, config.GRAD_WORKSPACE_ELEMENTS, cfg.block_m, cfg.block_n)
    c = max(1, min(n, rows_per_chunk or c))
    nc = max(1, min(N, cols_per_panel or nc))
    workspace = torch.empty(c * nc, dtype=x.dtype, device=dev)
    lse_r = lse_row.contiguous() if has_row else s  # a placeholder pointer when the term is absent
    lse_c = lse_col.contiguous() if has_col else s
    flags = meta_flags(x.dtype)
    x_dot, y_dot = dot_operands(x, y)  # the kernel's operands; the GEMMs read x, y
    timer = timer or gemm.PhaseTimer.disabled()
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        xc, xc_dot = x[i0:i1], x_dot[i0:i1]
        for j0 in range(0, N, nc):
            j1 = min(N, j0 + nc)
            yp, yp_dot = y[j0:j1], y_dot[j0:j1]
            g = workspace[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
            pos = has_pos and positives_in(offset, i0, i1, j0, j1)
            grid = triton.cdiv(i1 - i0, cfg.block_m) * triton.cdiv(j1 - j0, cfg.block_n)
            ds_part = torch.empty(grid, dtype=torch.float32, device=dev)
            xa, ya, tma = tma_operands(cfg, xc_dot, yp_dot, cfg.block_m, cfg.block_n)
            variant = {} if epi == 0 and not tma else {
                "EPI": epi, "TMA": tma, "EVEN": (i1 - i0) % cfg.block_m == 0 and (j1 - j0) % cfg.block_n == 0,
            }  # fmt: skip
            with timer.phase("tile kernel"):
                _clip_grad_kernel[(grid,)](
                    xa, ya, s, lse_r[i0:i1] if has_row else lse_r, lse_c[j0:j1] if has_col else lse_c,
                    g, ds_part,
                    i1 - i0, j1 - j0, D, offset + i0 - j0 if pos else 0,
                    float(coef_row), float(coef_col), float(pos_coef), 1.0 / g_scale,
                    xc_dot.stride(0), xc_dot.stride(1), yp_dot.stride(0), yp_dot.stride(1), g.stride(0),
                    BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, HAS_ROW=has_row, HAS_COL=has_col,
                    HAS_POS=pos, GROUP_M=cfg.group_m, **variant, **cfg.launch(), **flags,
                )  # fmt: skip
                ds += ds_part.sum()
            with timer.phase("dX GEMM"):
                gemm.accumulate(dx[i0:i1], g, yp)
            with timer.phase("dY GEMM"):
                gemm.accumulate(dy[j0:j1], g.t(), xc)
    # Undo the normalization of G and apply s once, on the tensors (no host sync on s).
    mul = s.reshape(()) * g_scale
    dx.mul_(mul)
    dy.mul_(mul)
    return dx, dy, ds
