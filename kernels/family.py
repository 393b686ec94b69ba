"""Triton epilogue of the contrastive family: masks, hardness shifts, log-sum-exp and gradient tiles.

Design (docs/kernels.md, "The contrastive family"): **chunk-materialized, one pass**. Every block of a
``FamilySpec`` (``fastclip/ops/family_spec.py``) is row-local, so for ``c`` rows at a time:

1. cuBLAS forms each block's similarity chunk ``S = R_c @ C^T`` in fp32 (``gemm.mm_f32``: no 16-bit
   rounding of the products), and the guide's ``S_g`` for GIST blocks;
2. ``_family_stats_kernel`` walks each row's columns in ``BN`` tiles (the columns split between a few
   programs per row block when the chunk has too few row blocks to fill the GPU, their partials merged
   in a fixed order): ``L' = s S + alpha S`` on the
   shifted columns, removal (own column, equal ids, guide over threshold) to ``-inf``, written back in
   place, while the row's log-sum-exp (online max/sum), positive and valid-column sums accumulate;
3. the host merges the blocks' log-sum-exps per part (``(c,)`` vectors);
4. ``_family_grad_kernel`` turns ``L'`` into ``G / coef = w exp(L' - lse) - t`` (O(1) values, so fp16
   does not underflow) in the operands' dtype, and two cuBLAS GEMMs form ``dR_c = s coef G C`` and
   ``dC += G^T R_c`` (scaled once at the end).

FLOPs: 6·n·N·D per block in cuBLAS (as the materialized loss), none in Triton; memory: the chunk's
fp32 ``S`` of every block plus one gradient tile, ``c`` from the budget; deterministic (no atomics,
fixed orders). Every mask comes from indices (own column ``i + offset``, id vectors, the guide tile):
no n×N tensor. Limits: inputs float32/bfloat16/float16; int64 offsets. Under the interpreter the
kernels read only fp32 buffers (bf16 arithmetic is broken there); 16-bit values are only stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastclip.kernels import config, gemm
from fastclip.kernels.common import on_tensor_device

# Logits of one chunk across all blocks, fp32 elements (as the torch implementation's budget).
FAMILY_WORKSPACE_ELEMENTS = 2**24
BLOCK_M = 16
BLOCK_N = 128
SHIFT_CODES = {"none": 0, "all": 1, "all_but_own": 2, "own_only": 3}

# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _cell_flags(
    rows,
    cols,
    row_mask,
    col_mask,
    own_off,
    row_ids_ptr,
    col_ids_ptr,
    HAS_OWN: tl.constexpr,
    USE_IDS: tl.constexpr,
):
    """(in-bounds, own column, same id and not own) of a (BM, BN) tile."""
    inb = row_mask[:, None] & col_mask[None, :]
    own = (cols.to(tl.int64)[None, :] == rows.to(tl.int64)[:, None] + own_off) & inb
    if not HAS_OWN:
        own = own & False
    same = inb & (cols[None, :] < 0)  # all False
    if USE_IDS:
        rid = tl.load(row_ids_ptr + rows, mask=row_mask, other=0)
        cid = tl.load(col_ids_ptr + cols, mask=col_mask, other=1)
        same = (rid[:, None] == cid[None, :]) & inb & ~own
    return inb, own, same


@triton.jit
def _family_stats_kernel(
    # pointers
    s_ptr,  # (m, Nb) fp32 similarities, overwritten with L'
    g_ptr,  # (m, Nb) fp32 guide similarities (GUIDE)
    thr_ptr,  # (m,) guide thresholds (GUIDE)
    row_ids_ptr,
    col_ids_ptr,
    scale_ptr,
    lse_ptr,  # (splits, m) out: each column split's log-sum-exp per row
    pos_sum_ptr,  # (splits, m) out
    pos_cnt_ptr,
    val_sum_ptr,
    val_cnt_ptr,
    # sizes
    m,
    Nb,
    own_off,
    alpha,
    cols_per_split,
    # strides
    stride_sm,
    stride_gm,
    # meta
    SHIFT: tl.constexpr,
    HAS_OWN: tl.constexpr,
    POSITIVE: tl.constexpr,
    EXCLUDE_OWN: tl.constexpr,
    USE_IDS: tl.constexpr,
    IDS_POSITIVE: tl.constexpr,
    GUIDE: tl.constexpr,
    SMOOTH: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BM + tl.arange(0, BM)
    row_mask = rows < m
    col_start = split * cols_per_split
    col_end = tl.minimum(Nb, col_start + cols_per_split)
    s = tl.load(scale_ptr).to(tl.float32)
    thr = tl.zeros((BM,), dtype=tl.float32)
    if GUIDE:
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=0.0)
    run_max = tl.full((BM,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BM,), dtype=tl.float32)
    p_sum = tl.zeros((BM,), dtype=tl.float32)
    p_cnt = tl.zeros((BM,), dtype=tl.float32)
    v_sum = tl.zeros((BM,), dtype=tl.float32)
    v_cnt = tl.zeros((BM,), dtype=tl.float32)
    s_rows = s_ptr + rows.to(tl.int64)[:, None] * stride_sm
    for j0 in range(col_start, col_end, BN):
        cols = j0 + tl.arange(0, BN)
        col_mask = cols < col_end
        inb, own, same = _cell_flags(
            rows, cols, row_mask, col_mask, own_off, row_ids_ptr, col_ids_ptr, HAS_OWN, USE_IDS
        )
        sim = tl.load(s_rows + cols[None, :], mask=inb, other=0.0)
        if IDS_POSITIVE:
            extra_pos = same
            removed = ~inb
        else:
            extra_pos = same & False
            removed = same | ~inb
        if SHIFT == 1:
            shifted = inb & ~extra_pos
        elif SHIFT == 2:
            shifted = inb & ~own & ~extra_pos
        elif SHIFT == 3:
            shifted = own
        else:
            shifted = inb & False
        logit = sim * s + tl.where(shifted, alpha * sim, 0.0)
        if EXCLUDE_OWN:
            removed = removed | own
        if GUIDE:
            gs = tl.load(g_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :], mask=inb, other=0.0)
            over = (gs > thr[:, None]) & inb
            if POSITIVE:
                over = over & ~own
            removed = removed | over
        extra_pos = extra_pos & ~removed
        logit = tl.where(removed, float("-inf"), logit)
        tl.store(s_rows + cols[None, :], logit, mask=inb)
        tile_max = tl.max(logit, 1)
        new_max = tl.maximum(run_max, tile_max)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(logit - safe[:, None]), 1)
        run_max = new_max
        if POSITIVE:
            p_sum += tl.sum(tl.where(own, logit, 0.0), 1)
            p_cnt += tl.sum(own.to(tl.float32), 1)
        if IDS_POSITIVE:
            p_sum += tl.sum(tl.where(extra_pos, logit, 0.0), 1)
            p_cnt += tl.sum(extra_pos.to(tl.float32), 1)
        if SMOOTH:
            valid = ~removed
            v_sum += tl.sum(tl.where(valid, logit, 0.0), 1)
            v_cnt += tl.sum(valid.to(tl.float32), 1)
    lse = tl.where(run_max == float("-inf"), float("-inf"), run_max + tl.log(run_sum))
    out = split.to(tl.int64) * m + rows
    tl.store(lse_ptr + out, lse, mask=row_mask)
    tl.store(pos_sum_ptr + out, p_sum, mask=row_mask)
    tl.store(pos_cnt_ptr + out, p_cnt, mask=row_mask)
    if SMOOTH:
        tl.store(val_sum_ptr + out, v_sum, mask=row_mask)
        tl.store(val_cnt_ptr + out, v_cnt, mask=row_mask)


@triton.jit
def _family_grad_kernel(
    # pointers
    l_ptr,  # (m, Nb) fp32 L' from the stats kernel
    g_out_ptr,  # (m, Nb) out: G / coef in the operands' dtype
    lse_ptr,  # (m,) the part's log-sum-exp
    w_pos_ptr,  # (m,) (1 - eps) / |positives|
    w_val_ptr,  # (m,) eps / |valid|
    row_ids_ptr,
    col_ids_ptr,
    # sizes
    m,
    Nb,
    own_off,
    weight,
    # strides
    stride_lm,
    stride_gm,
    # meta
    HAS_OWN: tl.constexpr,
    POSITIVE: tl.constexpr,
    USE_IDS: tl.constexpr,
    IDS_POSITIVE: tl.constexpr,
    SMOOTH: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    row_mask = rows < m
    col_mask = cols < Nb
    inb, own, same = _cell_flags(
        rows, cols, row_mask, col_mask, own_off, row_ids_ptr, col_ids_ptr, HAS_OWN, USE_IDS
    )
    logit = tl.load(
        l_ptr + rows.to(tl.int64)[:, None] * stride_lm + cols[None, :], mask=inb, other=float("-inf")
    )
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    valid = logit > float("-inf")
    g = tl.where(valid, weight * tl.exp(logit - lse[:, None]), 0.0)
    w_pos = tl.load(w_pos_ptr + rows, mask=row_mask, other=0.0)
    is_pos = own & POSITIVE
    if IDS_POSITIVE:
        is_pos = is_pos | (same & valid)
    g = g - tl.where(is_pos, w_pos[:, None], 0.0)
    if SMOOTH:
        w_val = tl.load(w_val_ptr + rows, mask=row_mask, other=0.0)
        g = g - tl.where(valid, w_val[:, None], 0.0)
    tl.store(
        g_out_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :],
        g.to(g_out_ptr.dtype.element_ty),
        mask=inb,
    )


# ----------------------------------------------------------------------------------------------------
# launcher


def _column_splits(m: int, nb: int, device: torch.device) -> int:
    """Programs per row block: enough to fill the GPU (a few per SM) when a chunk has few row blocks;
    2 under the interpreter (so that the merge of the splits' partials is tested), 1 for one tile."""
    tiles = triton.cdiv(nb, BLOCK_N)
    if config.interpreting() or device.type != "cuda":
        return min(2, tiles)
    want = triton.cdiv(config.PROGRAMS_PER_SM * config.num_sms(device), triton.cdiv(m, BLOCK_M))
    return max(1, min(tiles, want))


def _guide_thresholds(b, gsim: torch.Tensor, own_off: int, margins: torch.Tensor) -> torch.Tensor:
    """A chunk's guide thresholds ``g(row, own positive) - margin``, the own cell read from the positive
    guide block's fp32 tile (the same arithmetic as every cell compared with it: a duplicate of the
    positive ties exactly and stays, as in the materialized loss); ``margins`` is the op's ``thr``.
    As ``fastclip/ops/family_impl.py``'s ``guide_thresholds``."""
    if not (b.positive and b.own):
        raise AssertionError("a guided spec's first guide block must be its positive block")
    m, nb = gsim.shape
    lo, hi = max(0, -own_off), max(0, min(m, nb - own_off))
    out = torch.full((m,), float("inf"), dtype=torch.float32, device=gsim.device)
    if hi > lo:
        rows = torch.arange(lo, hi, device=gsim.device)
        out[lo:hi] = gsim[rows, rows + own_off] - margins[lo:hi].to(torch.float32)
    return out


def _rows_per_chunk(n: int, width: int) -> int:
    c = max(BLOCK_M, FAMILY_WORKSPACE_ELEMENTS // max(1, width) // BLOCK_M * BLOCK_M)
    return max(1, min(n, c))


@on_tensor_device
def family_triton(spec, ts, ids, guides, thr, scale, need, need_scale):
    """``(loss, ds, grads)`` of ``spec`` (see ``fastclip/ops/family_impl.py`` for the same maths in
    PyTorch). Inputs detached, of one kernel dtype, on one device; ``guides`` normalized."""
    dtype, dev = ts[0].dtype, ts[0].device
    assert dtype in (torch.float32, torch.bfloat16, torch.float16), dtype
    blocks = spec.blocks
    n = ts[blocks[0].row].shape[0]
    width = sum(ts[b.col].shape[0] for b in blocks)
    c = _rows_per_chunk(n, width)
    f32 = torch.float32
    s = scale.detach().reshape(1).to(f32)
    eps, coef = spec.smoothing, spec.coef
    any_grad = any(need) or need_scale
    ts = [t.contiguous() for t in ts]
    row_grads = [torch.zeros(t.shape, dtype=f32, device=dev) if w else None for t, w in zip(ts, need)]
    col_acc = [torch.zeros(t.shape, dtype=f32, device=dev) if w else None for t, w in zip(ts, need)]
    loss = torch.zeros((), dtype=f32, device=dev)
    ds = torch.zeros((), dtype=f32, device=dev)
    dummy_i = torch.zeros(1, dtype=torch.int64, device=dev)
    dummy_f = torch.zeros(1, dtype=f32, device=dev)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        m = i1 - i0
        pos_sum = torch.zeros(m, dtype=f32, device=dev)
        pos_cnt = torch.zeros(m, dtype=f32, device=dev)
        val_sum = torch.zeros(m, dtype=f32, device=dev)
        val_cnt = torch.zeros(m, dtype=f32, device=dev)
        lse_parts = [torch.full((m,), float("-inf"), dtype=f32, device=dev) for _ in spec.weights]
        kept = []
        thr_c = None  # this chunk's guide thresholds
        for b in blocks:
            rows, cols = ts[b.row][i0:i1], ts[b.col]
            nb = cols.shape[0]
            sim = gemm.mm_f32(rows, cols.t()).contiguous()  # (m, nb) fp32
            gsim = dummy_f
            own_off = (0 if b.local else spec.offset) + i0  # chunk row r owns column r + own_off
            if b.guide:
                gsim = (guides[b.row][i0:i1].to(f32) @ guides[b.col].to(f32).t()).contiguous()
                if thr_c is None:
                    thr_c = _guide_thresholds(b, gsim, own_off, thr[i0:i1])
            use_ids = b.ids
            r_ids = ids[b.row][i0:i1].contiguous() if use_ids else dummy_i
            c_ids = ids[b.col].contiguous() if use_ids else dummy_i
            splits = _column_splits(m, nb, dev)
            per_split = triton.cdiv(triton.cdiv(nb, splits), BLOCK_N) * BLOCK_N
            part = torch.empty((5 if eps else 3, splits, m), dtype=f32, device=dev)
            flags = dict(
                HAS_OWN=b.own,
                POSITIVE=b.positive,
                USE_IDS=use_ids,
                IDS_POSITIVE=use_ids and spec.duplicates == "positive" and b.positive_capable,
                SMOOTH=bool(eps),
            )
            _family_stats_kernel[(triton.cdiv(m, BLOCK_M), splits)](
                sim, gsim, thr_c if b.guide else dummy_f, r_ids, c_ids, s,
                part[0], part[1], part[2], part[3] if eps else dummy_f, part[4] if eps else dummy_f,
                m, nb, own_off, float(spec.hardness), per_split,
                sim.stride(0), gsim.stride(0) if b.guide else 0,
                SHIFT=SHIFT_CODES[b.shift] if spec.hardness else 0, EXCLUDE_OWN=b.exclude_own, GUIDE=b.guide,
                BM=BLOCK_M, BN=BLOCK_N, **flags,
            )  # fmt: skip
            del gsim
            # The splits' partials, merged in a fixed order (deterministic).
            lse_b = torch.logsumexp(part[0], 0)
            pos_sum += part[1].sum(0)
            pos_cnt += part[2].sum(0)
            if eps:
                val_sum += part[3].sum(0)
                val_cnt += part[4].sum(0)
            del part
            lse_parts[b.part] = torch.logaddexp(lse_parts[b.part], lse_b)
            kept.append((b, rows, cols, sim, r_ids, c_ids, own_off, flags))
        total = sum(w * part for w, part in zip(spec.weights, lse_parts))
        target = pos_sum / pos_cnt
        if eps:
            target = (1.0 - eps) * target + eps * (val_sum / val_cnt)
        loss += (total - target).sum()
        if not any_grad:
            continue
        w_pos = (1.0 - eps) / pos_cnt
        w_val = eps / val_cnt if eps else dummy_f
        for b, rows, cols, sim, r_ids, c_ids, own_off, flags in kept:
            m, nb = sim.shape
            grad = torch.empty((m, nb), dtype=dtype, device=dev)
            flags.pop("SMOOTH")
            _family_grad_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(nb, BLOCK_N))](
                sim, grad, lse_parts[b.part], w_pos, w_val, r_ids, c_ids,
                m, nb, own_off, float(spec.weights[b.part]),
                sim.stride(0), grad.stride(0),
                SMOOTH=bool(eps), BM=BLOCK_M, BN=BLOCK_N, **flags,
            )  # fmt: skip
            del sim
            gc = gemm.mm_f32(grad, cols)  # (m, D) fp32, G / coef times C
            ds += torch.vdot(rows.to(f32).reshape(-1), gc.reshape(-1)) * coef
            if row_grads[b.row] is not None:
                row_grads[b.row][i0:i1].add_(gc.mul_(s * coef))
            if col_acc[b.col] is not None:
                gemm.accumulate(col_acc[b.col], grad.t(), rows)
        del kept
    grads = []
    for rg, ca in zip(row_grads, col_acc):
        grads.append(None if rg is None else rg.add_(ca.mul_(s * coef)))
    return loss * coef, ds, grads
