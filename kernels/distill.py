"""Fused distillation CLIP loss kernels (open_clip ``DistillClipLoss``): statistics pass and gradient tiles.

A student block ``Ls = s * x @ y.T`` and a teacher block ``Lt = t * xt @ yt.T``, both ``n x N`` (the
feature dims ``D`` and ``Dt`` may differ); the math is stated in ``fastclip/ops/distill.py``. Nothing
of size ``n x N`` is allocated.

* ``distill_stats`` (the forward): each program owns ``BM`` rows and walks a range of ``BN``-column
  tiles, recomputing the student and the teacher tile with ``tl.dot`` (fp32 accumulators). Online per
  row: the student and teacher log-sum-exps and ``m = sum_j Pt_ij Ls_ij`` as a running weighted mean
  (rescaled with the teacher's running maximum, as flash attention rescales its output). With the
  column direction (``BOTH``) every tile writes per-column partials (student log-sum-exp, teacher
  log-sum-exp, teacher-weighted mean of ``Ls``) into ``(row blocks, N)`` fp32 buffers. Partials are
  merged in a fixed order by torch (deterministic, no atomics); rows are chunked so the buffers stay
  under ``LSE_WORKSPACE_ELEMENTS``. FLOPs ``2 n N (D + Dt)``.
* ``distill_grad`` (the backward): for ``c`` rows at a time a kernel recomputes both tiles and writes
  the student gradient tile ``G`` (and the teacher's ``Gt`` when the teacher needs gradients) into
  ``c x N`` workspaces of the input dtype, with per-tile partials of ``ds``/``dt``; GEMMs then form
  ``dX = s G Y``, ``dY += s G^T X`` (and the teacher's), as in ``kernels/clip.py``. ``G`` is stored
  divided by the largest direction weight, so its values are O(1) (fp16-safe). The five gradient
  coefficients are read from a device tensor: no host sync on the incoming gradients.

Limits: ``n, N >= 1``, any ``D, Dt >= 1``; inputs float32, bfloat16 or float16 (float64 runs on
``impl="torch"``); offsets in int64. Under the Triton interpreter bf16 tiles are upcast after loading
(``UPCAST``, see ``kernels/common.py``). The statistics kernel runs on a 2-D grid (row blocks × column
splits); the gradient-tile kernel on a 1-D grid in groups of ``GROUP_M`` row blocks that sweep the column
tiles together (``grouped_tile``), as the CLIP kernels do. Tile sizes are the passes' own
(``config.tile_config("distill-lse" | "distill-tile")``), at most 64 rows per tile; not yet tuned or run on a GPU.

(About 430 lines: the statistics kernel, the gradient-tile kernel and their launchers share one tile
recomputation and are checked together; see docs/distill.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastclip.kernels import config, gemm
from fastclip.kernels.common import (
    check_block,
    check_offset,
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


@triton.jit
def _distill_stats_kernel(
    # pointers
    x_ptr,
    y_ptr,
    xt_ptr,
    yt_ptr,
    s_ptr,
    t_ptr,
    row_part_ptr,  # (3, splits, n): student lse, teacher lse, teacher-weighted mean of Ls
    col_part_ptr,  # (3, row blocks, N): the same per column (BOTH only)
    # sizes
    n,
    N,
    D,
    DT,
    cols_per_split,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yk,
    stride_xtm,
    stride_xtk,
    stride_ytm,
    stride_ytk,
    stride_rk,
    stride_rs,
    stride_ck,
    stride_cb,
    # meta
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BOTH: tl.constexpr,
    UPCAST_S: tl.constexpr,
    IEEE_S: tl.constexpr,
    UPCAST_T: tl.constexpr,
    IEEE_T: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < n
    s = tl.load(s_ptr).to(tl.float32)
    t = tl.load(t_ptr).to(tl.float32)
    ms = tl.full((BM,), float("-inf"), dtype=tl.float32)
    ls = tl.zeros((BM,), dtype=tl.float32)
    mt = tl.full((BM,), float("-inf"), dtype=tl.float32)
    lt = tl.zeros((BM,), dtype=tl.float32)
    wt = tl.zeros((BM,), dtype=tl.float32)  # sum_j exp(Lt - mt) * Ls
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, N)
    for c0 in range(c_start, c_end, BN):
        cols = c0 + tl.arange(0, BN)
        col_mask = cols < c_end
        valid = row_mask[:, None] & col_mask[None, :]
        Ss = sim_tile(
            x_ptr, y_ptr, rows, cols, row_mask, col_mask, D,
            stride_xm, stride_xk, stride_ym, stride_yk, BM, BN, BK, UPCAST_S, IEEE_S,
        )  # fmt: skip
        St = sim_tile(
            xt_ptr, yt_ptr, rows, cols, row_mask, col_mask, DT,
            stride_xtm, stride_xtk, stride_ytm, stride_ytk, BM, BN, BK, UPCAST_T, IEEE_T,
        )  # fmt: skip
        Ls0 = tl.where(valid, Ss * s, 0.0)  # finite where masked: it multiplies zero weights
        Ls = tl.where(valid, Ls0, float("-inf"))
        Lt = tl.where(valid, St * t, float("-inf"))
        # Online row statistics; a fully masked row keeps m = -inf: shift by 0 there (no inf - inf).
        ms_new = tl.maximum(ms, tl.max(Ls, 1))
        ms_safe = tl.where(ms_new == float("-inf"), 0.0, ms_new)
        ls = ls * tl.exp(ms - ms_safe) + tl.sum(tl.exp(Ls - ms_safe[:, None]), 1)
        ms = ms_new
        mt_new = tl.maximum(mt, tl.max(Lt, 1))
        mt_safe = tl.where(mt_new == float("-inf"), 0.0, mt_new)
        alpha = tl.exp(mt - mt_safe)
        pt = tl.exp(Lt - mt_safe[:, None])
        lt = lt * alpha + tl.sum(pt, 1)
        wt = wt * alpha + tl.sum(pt * Ls0, 1)
        mt = mt_new
        if BOTH:
            # Column partials of this tile, each with its own max as shift (exact at any scale).
            mcs = tl.max(Ls, 0)
            mcs_safe = tl.where(mcs == float("-inf"), 0.0, mcs)
            lcs = tl.sum(tl.exp(Ls - mcs_safe[None, :]), 0)
            mct = tl.max(Lt, 0)
            mct_safe = tl.where(mct == float("-inf"), 0.0, mct)
            pc = tl.exp(Lt - mct_safe[None, :])
            lct = tl.sum(pc, 0)
            wct = tl.sum(pc * Ls0, 0)
            out = col_part_ptr + pid_m.to(tl.int64) * stride_cb + cols
            # Masked columns have l = 0: log(1) keeps their -inf without a log(0).
            tl.store(out, mcs + tl.log(tl.where(lcs == 0.0, 1.0, lcs)), mask=col_mask)
            tl.store(out + stride_ck, mct + tl.log(tl.where(lct == 0.0, 1.0, lct)), mask=col_mask)
            tl.store(out + 2 * stride_ck, wct / tl.where(lct == 0.0, 1.0, lct), mask=col_mask)
    out = row_part_ptr + pid_s.to(tl.int64) * stride_rs + rows
    tl.store(out, ms + tl.log(tl.where(ls == 0.0, 1.0, ls)), mask=row_mask)
    tl.store(out + stride_rk, mt + tl.log(tl.where(lt == 0.0, 1.0, lt)), mask=row_mask)
    tl.store(out + 2 * stride_rk, wt / tl.where(lt == 0.0, 1.0, lt), mask=row_mask)


@triton.jit
def _distill_grad_kernel(
    # pointers
    x_ptr,
    y_ptr,
    xt_ptr,
    yt_ptr,
    s_ptr,
    t_ptr,
    stat_row_ptr,  # (3, n): student lse, teacher lse, m (this chunk's rows)
    stat_col_ptr,  # (3, N): the same per column (BOTH only)
    coef_ptr,  # (5,): ar, ac, br, bc, p, already divided by the largest direction weight
    g_ptr,
    gt_ptr,
    part_ptr,  # (2, programs): partials of ds and dt
    # sizes
    n,
    N,
    D,
    DT,
    offset,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yk,
    stride_xtm,
    stride_xtk,
    stride_ytm,
    stride_ytk,
    stride_sr,
    stride_sc,
    stride_gm,
    stride_gtm,
    stride_part,
    # meta
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BOTH: tl.constexpr,
    HAS_POS: tl.constexpr,
    STUDENT: tl.constexpr,
    TEACHER: tl.constexpr,
    UPCAST_S: tl.constexpr,
    IEEE_S: tl.constexpr,
    UPCAST_T: tl.constexpr,
    IEEE_T: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, n, N, BM, BN, GROUP_M)  # groups of row blocks share Y tiles in L2
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_mask = rows < n
    col_mask = cols < N
    valid = row_mask[:, None] & col_mask[None, :]
    s = tl.load(s_ptr).to(tl.float32)
    t = tl.load(t_ptr).to(tl.float32)
    ar = tl.load(coef_ptr)
    ac = tl.load(coef_ptr + 1)
    br = tl.load(coef_ptr + 2)
    bc = tl.load(coef_ptr + 3)
    p = tl.load(coef_ptr + 4)
    Ss = sim_tile(
        x_ptr, y_ptr, rows, cols, row_mask, col_mask, D,
        stride_xm, stride_xk, stride_ym, stride_yk, BM, BN, BK, UPCAST_S, IEEE_S,
    )  # fmt: skip
    St = sim_tile(
        xt_ptr, yt_ptr, rows, cols, row_mask, col_mask, DT,
        stride_xtm, stride_xtk, stride_ytm, stride_ytk, BM, BN, BK, UPCAST_T, IEEE_T,
    )  # fmt: skip
    Ls = Ss * s
    Lt = St * t
    lse_sr = tl.load(stat_row_ptr + rows, mask=row_mask, other=0.0)
    lse_tr = tl.load(stat_row_ptr + stride_sr + rows, mask=row_mask, other=0.0)
    m_r = tl.load(stat_row_ptr + 2 * stride_sr + rows, mask=row_mask, other=0.0)
    pt = tl.exp(Lt - lse_tr[:, None])  # teacher row softmax
    G = tl.zeros((BM, BN), dtype=tl.float32)
    Gt = tl.zeros((BM, BN), dtype=tl.float32)
    if STUDENT:
        G = ar * tl.exp(Ls - lse_sr[:, None]) - br * pt
    if TEACHER:
        Gt = -br * pt * (Ls - m_r[:, None])
    if BOTH:
        lse_sc = tl.load(stat_col_ptr + cols, mask=col_mask, other=0.0)
        lse_tc = tl.load(stat_col_ptr + stride_sc + cols, mask=col_mask, other=0.0)
        m_c = tl.load(stat_col_ptr + 2 * stride_sc + cols, mask=col_mask, other=0.0)
        ptc = tl.exp(Lt - lse_tc[None, :])  # teacher column softmax
        if STUDENT:
            G += ac * tl.exp(Ls - lse_sc[None, :]) - bc * ptc
        if TEACHER:
            Gt -= bc * ptc * (Ls - m_c[None, :])
    if STUDENT:
        if HAS_POS:
            is_pos = cols.to(tl.int64)[None, :] == (rows.to(tl.int64) + offset)[:, None]
            G = tl.where(is_pos, G - p, G)
        G = tl.where(valid, G, 0.0)
        tl.store(part_ptr + pid, tl.sum(tl.sum(G * Ss, 1), 0))
        g_out = g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
        tl.store(g_out, G.to(g_ptr.dtype.element_ty), mask=valid)
    if TEACHER:
        Gt = tl.where(valid, Gt, 0.0)
        tl.store(part_ptr + stride_part + pid, tl.sum(tl.sum(Gt * St, 1), 0))
        gt_out = gt_ptr + rows.to(tl.int64)[:, None] * stride_gtm + cols[None, :]
        tl.store(gt_out, Gt.to(gt_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------------
# launchers


def _tile_config(kernel: str, device: torch.device, dtype: torch.dtype, dim: int) -> config.TileConfig:
    """The distillation pass's own configuration (``config.OWN_KERNELS``: ``distill-lse``,
    ``distill-tile``), at most 64 rows per tile: every program here holds two fp32 logit tiles (student
    and teacher) and, in the gradient kernel, two gradient tiles, so the CLIP kernels' 128 x 128 tiles
    would spill registers. Not tuned on a GPU yet."""
    return config.tile_config(f"distill-{kernel}", device, dtype, dim)


def _flags(dtype: torch.dtype, suffix: str) -> dict:
    return {f"{k}_{suffix}": v for k, v in meta_flags(dtype).items()}


def _check_pair_blocks(x, y, s, xt, yt, t) -> None:
    check_block(x, y, s, name_x="x", name_y="y")
    check_block(xt, yt, t, name_x="xt", name_y="yt")
    if xt.shape[0] != x.shape[0] or yt.shape[0] != y.shape[0]:
        raise ValueError(
            f"xt/yt: expected {x.shape[0]} and {y.shape[0]} rows (as x and y), got {xt.shape[0]} and {yt.shape[0]}"
        )
    if xt.device != x.device:
        raise ValueError(f"xt: expected device {x.device} (as x), got {xt.device}")


def _merge_weighted(lse_parts: torch.Tensor, mean_parts: torch.Tensor, dim: int):
    """Merge log-sum-exp partials and the weighted means they normalize, along ``dim``."""
    lse = torch.logsumexp(lse_parts, dim=dim)
    return lse, (torch.exp(lse_parts - lse.unsqueeze(dim)) * mean_parts).sum(dim)


@on_tensor_device
def distill_stats(x, y, s, xt, yt, t, both, *, rows_per_chunk=None, splits=None):
    """Pass 1: ``(lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col)``, fp32 (column entries None
    unless ``both``). Equivalent to::

        Ls, Lt = s * x.float() @ y.float().T, t * xt.float() @ yt.float().T
        lse_s_row, lse_t_row = Ls.logsumexp(1), Lt.logsumexp(1)
        m_row = (Lt.softmax(1) * Ls).sum(1)      # and over dim 0 for the column entries

    ``rows_per_chunk`` and ``splits`` (column splits per row block) override the automatic choice.
    """
    _check_pair_blocks(x, y, s, xt, yt, t)
    x, y, xt, yt = (v.detach().contiguous() for v in (x, y, xt, yt))
    n, D = x.shape
    N, DT = y.shape[0], xt.shape[1]
    dev = x.device
    cfg = _tile_config("lse", dev, x.dtype, max(D, DT))
    s32, t32 = scalar_f32(s), scalar_f32(t)
    c = rows_per_chunk or config.chunk_rows(
        n, N, config.LSE_WORKSPACE_ELEMENTS // 3, cfg.block_m, rows_per_elem=cfg.block_m
    )
    c = max(1, min(n, c))
    col_tiles = triton.cdiv(N, cfg.block_n)
    rows_out = torch.empty((3, n), dtype=torch.float32, device=dev)
    cols_out = None
    flags = {**_flags(x.dtype, "S"), **_flags(xt.dtype, "T")}
    # The kernel's operands: TF32-rounded copies where a pair is fp32 and TF32 is on (common.py).
    x, y = dot_operands(x, y)
    xt, yt = dot_operands(xt, yt)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        row_blocks = triton.cdiv(i1 - i0, cfg.block_m)
        if splits is None:
            want = config.PROGRAMS_PER_SM * config.num_sms(dev)
            n_split = max(1, min(col_tiles, triton.cdiv(want, row_blocks)))
        else:
            n_split = max(1, min(col_tiles, splits))
        cols_per_split = triton.cdiv(col_tiles, n_split) * cfg.block_n
        n_split = triton.cdiv(N, cols_per_split)
        xc, xtc = x[i0:i1], xt[i0:i1]
        row_part = torch.empty((3, n_split, i1 - i0), dtype=torch.float32, device=dev)
        col_part = torch.empty((3, row_blocks, N) if both else (3, 1, 1), dtype=torch.float32, device=dev)
        _distill_stats_kernel[(row_blocks, n_split)](
            xc, y, xtc, yt, s32, t32, row_part, col_part,
            i1 - i0, N, D, DT, cols_per_split,
            xc.stride(0), xc.stride(1), y.stride(0), y.stride(1),
            xtc.stride(0), xtc.stride(1), yt.stride(0), yt.stride(1),
            row_part.stride(0), row_part.stride(1), col_part.stride(0), col_part.stride(1),
            BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, BOTH=both,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
        )  # fmt: skip
        rows_out[0, i0:i1] = torch.logsumexp(row_part[0], dim=0)
        rows_out[1, i0:i1], rows_out[2, i0:i1] = _merge_weighted(row_part[1], row_part[2], 0)
        if both:
            part = torch.stack(
                [torch.logsumexp(col_part[0], dim=0), *_merge_weighted(col_part[1], col_part[2], 0)]
            )  # (3, N)
            if cols_out is None:
                cols_out = part
            else:
                cols_out[0] = torch.logaddexp(cols_out[0], part[0])
                lse_t, m = _merge_weighted(
                    torch.stack([cols_out[1], part[1]]), torch.stack([cols_out[2], part[2]]), 0
                )
                cols_out[1], cols_out[2] = lse_t, m
    if not both:
        return rows_out[0], rows_out[1], rows_out[2], None, None, None
    return rows_out[0], rows_out[1], rows_out[2], cols_out[0], cols_out[1], cols_out[2]


@on_tensor_device
def distill_grad(
    x, y, s, xt, yt, t, stats, coefs, offset, need_student, need_teacher, *, rows_per_chunk=None
):
    """Pass 2: ``(dx, dy, ds, dxt, dyt, dt)`` fp32 (None where not needed). With ``coefs = (ar, ac, br,
    bc, p)`` (a device tensor) and the statistics of :func:`distill_stats`, equivalent to::

        G  = ar Ls.softmax(1) + ac Ls.softmax(0) - br Lt.softmax(1) - bc Lt.softmax(0) - p P
        Gt = -(br Lt.softmax(1) * (Ls - m_row[:, None]) + bc Lt.softmax(0) * (Ls - m_col[None, :]))
        dx, dy, ds = s G @ y, s G.T @ x, (G * x @ y.T).sum()      # and likewise with Gt for the teacher

    ``P[i, j] = (j == i + offset)``; column terms only when the column statistics are given.
    """
    _check_pair_blocks(x, y, s, xt, yt, t)
    check_offset(offset)
    if not isinstance(coefs, torch.Tensor) or tuple(coefs.shape) != (5,):
        raise ValueError(
            f"coefs: expected a tensor of shape (5,), got {getattr(coefs, 'shape', type(coefs))}"
        )
    x, y, xt, yt = (v.detach().contiguous() for v in (x, y, xt, yt))
    n, D = x.shape
    N, DT = y.shape[0], xt.shape[1]
    dev = x.device
    lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col = stats
    both = lse_s_col is not None
    stat_row = torch.stack([lse_s_row, lse_t_row, m_row]).float().contiguous()
    stat_col = torch.stack([lse_s_col, lse_t_col, m_col]).float().contiguous() if both else stat_row
    # Weights 1/(2n) would push the softmaxes into fp16's subnormals: store G / g_scale, O(1) values.
    g_scale = 1.0 / n if not both else max(1.0 / (2 * n), 1.0 / (2 * N))
    coef = (coefs.detach().to(device=dev, dtype=torch.float32) / g_scale).contiguous()
    dx = dy = ds = dxt = dyt = dt = None
    if need_student:
        dx = torch.zeros((n, D), dtype=torch.float32, device=dev)
        dy = torch.zeros((N, D), dtype=torch.float32, device=dev)
    if need_teacher:
        dxt = torch.zeros((n, DT), dtype=torch.float32, device=dev)
        dyt = torch.zeros((N, DT), dtype=torch.float32, device=dev)
    parts_total = torch.zeros(2, dtype=torch.float32, device=dev)
    if not (need_student or need_teacher):
        return dx, dy, ds, dxt, dyt, dt
    cfg = _tile_config("tile", dev, x.dtype, max(D, DT))
    s32, t32 = scalar_f32(s), scalar_f32(t)
    c = rows_per_chunk or config.chunk_rows(n, N, config.GRAD_WORKSPACE_ELEMENTS, cfg.block_m)
    c = max(1, min(n, c))
    ws = torch.empty((c, N), dtype=x.dtype, device=dev) if need_student else s32
    wst = torch.empty((c, N), dtype=xt.dtype, device=dev) if need_teacher else s32
    flags = {**_flags(x.dtype, "S"), **_flags(xt.dtype, "T")}
    col_blocks = triton.cdiv(N, cfg.block_n)
    # The kernel's operands (TF32-rounded copies under TF32, see common.py); the GEMMs read x, y, xt, yt.
    x_dot, y_dot = dot_operands(x, y)
    xt_dot, yt_dot = dot_operands(xt, yt)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        row_blocks = triton.cdiv(i1 - i0, cfg.block_m)
        xc, xtc = x[i0:i1], xt[i0:i1]
        xc_dot, xtc_dot = x_dot[i0:i1], xt_dot[i0:i1]
        g = ws[: i1 - i0] if need_student else ws
        gt = wst[: i1 - i0] if need_teacher else wst
        pos = need_student and positives_in(offset, i0, i1, 0, N)
        part = torch.zeros((2, row_blocks * col_blocks), dtype=torch.float32, device=dev)
        sr = stat_row[:, i0:i1]
        _distill_grad_kernel[(row_blocks * col_blocks,)](
            xc_dot, y_dot, xtc_dot, yt_dot, s32, t32, sr, stat_col, coef, g, gt, part,
            i1 - i0, N, D, DT, offset + i0 if pos else 0,
            xc_dot.stride(0), xc_dot.stride(1), y_dot.stride(0), y_dot.stride(1),
            xtc_dot.stride(0), xtc_dot.stride(1), yt_dot.stride(0), yt_dot.stride(1),
            sr.stride(0), stat_col.stride(0), g.stride(0), gt.stride(0), part.stride(0),
            BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, BOTH=both, HAS_POS=pos,
            STUDENT=need_student, TEACHER=need_teacher, GROUP_M=config.GROUP_M,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
        )  # fmt: skip
        parts_total += part.sum(1)
        if need_student:
            gemm.accumulate(dx[i0:i1], g, y)
            gemm.accumulate(dy, g.t(), xc)
        if need_teacher:
            gemm.accumulate(dxt[i0:i1], gt, yt)
            gemm.accumulate(dyt, gt.t(), xtc)
    # Undo the normalization and apply the scales once, on the tensors (no host sync).
    if need_student:
        dx.mul_(s32.reshape(()) * g_scale)
        dy.mul_(s32.reshape(()) * g_scale)
        ds = parts_total[0] * g_scale
    if need_teacher:
        dxt.mul_(t32.reshape(()) * g_scale)
        dyt.mul_(t32.reshape(()) * g_scale)
        dt = parts_total[1] * g_scale
    return dx, dy, ds, dxt, dyt, dt
