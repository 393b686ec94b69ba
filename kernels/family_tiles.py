"""The Triton kernels of the contrastive family (their launcher and the column model: ``kernels/family.py``).

``_segment_tile`` is one tile of a segment: the similarity recomputed with ``tl.dot``, every per-cell rule
applied from indices, id vectors and (GIST) the guide tile recomputed the same way. The forward
(``_family_lse_kernel``), the gradient (``_family_grad_kernel``) and GIST's thresholds
(``_guide_threshold_kernel``) all build their tiles through it or through the same ``sim_tile``, at the
same segment-aligned tile positions, so the three agree on every mask.
"""

from __future__ import annotations

import triton
import triton.language as tl
from fastclip.kernels.common import grouped_tile, sim_tile

# A segment's flags, one int64 per segment in the launcher's table: the bit of each boolean ``Block``
# field (fastclip/ops/family_spec.py) and, from SHIFT_BIT, two bits of the hardness class. Defined here
# only: the launcher (kernels/family.py) builds the table from FLAG_FIELDS and SHIFT_CODES.
F_OWN = tl.constexpr(1)
F_POS = tl.constexpr(2)
F_CAP = tl.constexpr(4)
F_EXCL = tl.constexpr(8)
F_IDS = tl.constexpr(16)
F_GUIDE = tl.constexpr(32)
SHIFT_BIT = tl.constexpr(6)
FLAG_FIELDS = (
    ("own", F_OWN),
    ("positive", F_POS),
    ("positive_capable", F_CAP),
    ("exclude_own", F_EXCL),
    ("ids", F_IDS),
    ("guide", F_GUIDE),
)
SHIFT_CODES = {"none": 0, "all": 1, "all_but_own": 2, "own_only": 3}


@triton.jit
def _segment_tile(
    # pointers
    r_ptr,
    c_ptr,
    gr_ptr,
    gc_ptr,
    rid_ptr,
    cid_ptr,
    thr_ptr,
    # the tile: global rows, their mask, columns of C, and the segment's fields
    rows,
    row_mask,
    cols,
    seg_start,
    seg_end,
    own_off,
    flags,
    # scalars
    s,
    alpha,
    D,
    DG,
    # strides
    stride_rm,
    stride_rk,
    stride_cm,
    stride_ck,
    stride_grm,
    stride_grk,
    stride_gcm,
    stride_gck,
    # meta
    HARD: tl.constexpr,
    USE_IDS: tl.constexpr,
    IDS_POSITIVE: tl.constexpr,
    GUIDE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    G_IEEE: tl.constexpr,
):
    """``(L, is_pos, valid, S, inb)`` of one (BM, BN) tile: the logits with removed cells at -inf, the
    target cells, the cells that join the log-sum-exp, the similarity and the in-bounds cells."""
    col_mask = cols < seg_end
    inb = row_mask[:, None] & col_mask[None, :]
    S = sim_tile(
        r_ptr, c_ptr, rows, cols, row_mask, col_mask, D,
        stride_rm, stride_rk, stride_cm, stride_ck, BM, BN, BK, UPCAST, IEEE,
    )  # fmt: skip
    # The segment's flags as (1, BN) masks: a 0-d boolean combined with tiles misbehaves under the
    # interpreter (its tensors then take the other operand's element type).
    fv = (cols * 0).to(tl.int32) + flags.to(tl.int32)
    f_own = ((fv & F_OWN) != 0)[None, :]
    f_pos = ((fv & F_POS) != 0)[None, :]
    f_cap = ((fv & F_CAP) != 0)[None, :]
    f_excl = ((fv & F_EXCL) != 0)[None, :]
    f_ids = ((fv & F_IDS) != 0)[None, :]
    f_guide = ((fv & F_GUIDE) != 0)[None, :]
    # Row i's own column: column ``i + own_off`` of the segment (int32: a call's columns and offsets
    # stay below 2**31; the row index is compared once per column, not as a 64-bit tile).
    rel = (cols - seg_start - own_off).to(tl.int32)
    own = inb & (rel[None, :] == rows.to(tl.int32)[:, None]) & f_own
    own_pos = own & f_pos
    none = inb != inb  # all False (a Python False would make an int32 tensor under the interpreter)
    same = none
    if USE_IDS:
        rid = tl.load(rid_ptr + rows, mask=row_mask, other=0)
        cid = tl.load(cid_ptr + cols, mask=col_mask, other=0)
        same = (rid[:, None] == cid[None, :]) & inb & (own == 0) & f_ids
    extra = none
    if IDS_POSITIVE:
        extra = same & f_cap
    removed = (inb == 0) | (same & (extra == 0)) | (own & f_excl)
    L = S * s
    if HARD:
        code = ((fv >> SHIFT_BIT) & 3)[None, :]
        shifted = (
            ((code == 1) & (extra == 0)) | ((code == 2) & (own == 0) & (extra == 0)) | ((code == 3) & own)
        )
        L = L + tl.where(shifted & inb, alpha * S, 0.0)
    if GUIDE:
        GS = sim_tile(
            gr_ptr, gc_ptr, rows, cols, row_mask, col_mask, DG,
            stride_grm, stride_grk, stride_gcm, stride_gck, BM, BN, BK, False, G_IEEE,
        )  # fmt: skip
        thr = tl.load(thr_ptr + rows, mask=row_mask, other=0.0)
        over = (GS > thr[:, None]) & inb & f_guide & (own_pos == 0)
        removed = removed | over
    extra = extra & (removed == 0)
    L = tl.where(removed, float("-inf"), L)
    is_pos = own_pos | extra
    return L, is_pos, removed == 0, S, inb


# Integer arguments that only bound loops or offset indices are not specialized (Triton would compile
# one variant per "== 1" / "divisible by 16" class of each, i.e. new compiles for new chunk and panel
# positions in the middle of a run).
@triton.jit(do_not_specialize=["n_seg", "tiles_per_split"])
def _family_lse_kernel(
    # pointers
    r_ptr,
    c_ptr,
    gr_ptr,
    gc_ptr,
    rid_ptr,
    cid_ptr,
    thr_ptr,
    seg_ptr,
    scale_ptr,
    out_ptr,  # (stats, splits, n) fp32: lse, positive sum and count, valid sum and count
    # sizes
    n,
    D,
    DG,
    n_seg,
    tiles_per_split,
    stride_stat,  # splits * n
    alpha,
    # strides
    stride_rm,
    stride_rk,
    stride_cm,
    stride_ck,
    stride_grm,
    stride_grk,
    stride_gcm,
    stride_gck,
    # meta
    HARD: tl.constexpr,
    USE_IDS: tl.constexpr,
    IDS_POSITIVE: tl.constexpr,
    GUIDE: tl.constexpr,
    SMOOTH: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    G_IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_mask = rows < n
    s = tl.load(scale_ptr).to(tl.float32)
    t_lo = pid_s * tiles_per_split
    t_hi = t_lo + tiles_per_split
    run_max = tl.full((BM,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BM,), dtype=tl.float32)
    p_sum = tl.zeros((BM,), dtype=tl.float32)
    p_cnt = tl.zeros((BM,), dtype=tl.float32)
    v_sum = tl.zeros((BM,), dtype=tl.float32)
    v_cnt = tl.zeros((BM,), dtype=tl.float32)
    for k in range(0, n_seg):
        seg = seg_ptr + k * 5
        seg_start = tl.load(seg)
        seg_end = tl.load(seg + 1)
        tile0 = tl.load(seg + 2)
        own_off = tl.load(seg + 3)
        flags = tl.load(seg + 4)
        t_end = tile0 + (seg_end - seg_start + BN - 1) // BN
        for t in range(tl.maximum(t_lo, tile0), tl.minimum(t_hi, t_end)):
            cols = seg_start + (t - tile0) * BN + tl.arange(0, BN)
            L, is_pos, valid, S, inb = _segment_tile(
                r_ptr, c_ptr, gr_ptr, gc_ptr, rid_ptr, cid_ptr, thr_ptr,
                rows, row_mask, cols, seg_start, seg_end, own_off, flags, s, alpha, D, DG,
                stride_rm, stride_rk, stride_cm, stride_ck, stride_grm, stride_grk, stride_gcm, stride_gck,
                HARD, USE_IDS, IDS_POSITIVE, GUIDE, BM, BN, BK, UPCAST, IEEE, G_IEEE,
            )  # fmt: skip
            # Online log-sum-exp; a row with no valid cell yet keeps -inf (shift by 0 there).
            new_max = tl.maximum(run_max, tl.max(L, 1))
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.sum(tl.exp(L - safe[:, None]), 1)
            run_max = new_max
            p_sum += tl.sum(tl.where(is_pos, L, 0.0), 1)
            p_cnt += tl.sum(is_pos.to(tl.float32), 1)
            if SMOOTH:
                v_sum += tl.sum(tl.where(valid, L, 0.0), 1)
                v_cnt += tl.sum(valid.to(tl.float32), 1)
    lse = tl.where(run_max == float("-inf"), float("-inf"), run_max + tl.log(run_sum))
    out = out_ptr + pid_s.to(tl.int64) * n + rows
    tl.store(out, lse, mask=row_mask)
    tl.store(out + stride_stat, p_sum, mask=row_mask)
    tl.store(out + 2 * stride_stat, p_cnt, mask=row_mask)
    if SMOOTH:
        tl.store(out + 3 * stride_stat, v_sum, mask=row_mask)
        tl.store(out + 4 * stride_stat, v_cnt, mask=row_mask)


@triton.jit(do_not_specialize=["row0", "row1", "t_lo", "t_hi", "col0", "n_seg"])
def _family_grad_kernel(
    # pointers
    r_ptr,
    c_ptr,
    gr_ptr,
    gc_ptr,
    rid_ptr,
    cid_ptr,
    thr_ptr,
    seg_ptr,
    scale_ptr,
    lse_ptr,  # (n,) the group's part's log-sum-exp
    w_pos_ptr,  # (n,) (1 - eps) / |positives|
    w_val_ptr,  # (n,) eps / |valid|
    g_ptr,  # (rows, panel columns) out: G / coef in the operands' dtype
    ds_ptr,  # (programs,) out: sum of (G / coef) * S per program
    # sizes: this chunk's rows [row0, row1), this panel's tiles [t_lo, t_hi) from column col0
    row0,
    row1,
    t_lo,
    t_hi,
    col0,
    D,
    DG,
    n_seg,
    alpha,
    weight,
    # strides
    stride_rm,
    stride_rk,
    stride_cm,
    stride_ck,
    stride_grm,
    stride_grk,
    stride_gcm,
    stride_gck,
    stride_gm,
    # meta
    HARD: tl.constexpr,
    USE_IDS: tl.constexpr,
    IDS_POSITIVE: tl.constexpr,
    GUIDE: tl.constexpr,
    SMOOTH: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    G_IEEE: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_t = grouped_tile(pid, row1 - row0, (t_hi - t_lo) * BN, BM, BN, GROUP_M)
    t = t_lo + pid_t
    # The segment of tile t (a handful of segments: a scalar scan).
    seg_start = tl.load(seg_ptr) * 0
    seg_end = seg_start
    tile0 = seg_start
    own_off = seg_start
    flags = seg_start
    for k in range(0, n_seg):
        seg = seg_ptr + k * 5
        k_start = tl.load(seg)
        k_end = tl.load(seg + 1)
        k_tile0 = tl.load(seg + 2)
        hit = (t >= k_tile0) & (t < k_tile0 + (k_end - k_start + BN - 1) // BN)
        seg_start = tl.where(hit, k_start, seg_start)
        seg_end = tl.where(hit, k_end, seg_end)
        tile0 = tl.where(hit, k_tile0, tile0)
        own_off = tl.where(hit, tl.load(seg + 3), own_off)
        flags = tl.where(hit, tl.load(seg + 4), flags)
    rows = row0 + pid_m * BM + tl.arange(0, BM)
    row_mask = rows < row1
    cols = seg_start + (t - tile0) * BN + tl.arange(0, BN)
    s = tl.load(scale_ptr).to(tl.float32)
    L, is_pos, valid, S, inb = _segment_tile(
        r_ptr, c_ptr, gr_ptr, gc_ptr, rid_ptr, cid_ptr, thr_ptr,
        rows, row_mask, cols, seg_start, seg_end, own_off, flags, s, alpha, D, DG,
        stride_rm, stride_rk, stride_cm, stride_ck, stride_grm, stride_grk, stride_gcm, stride_gck,
        HARD, USE_IDS, IDS_POSITIVE, GUIDE, BM, BN, BK, UPCAST, IEEE, G_IEEE,
    )  # fmt: skip
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    w_pos = tl.load(w_pos_ptr + rows, mask=row_mask, other=0.0)
    G = tl.where(valid, weight * tl.exp(L - lse[:, None]), 0.0)
    G = G - tl.where(is_pos, w_pos[:, None], 0.0)
    if SMOOTH:
        w_val = tl.load(w_val_ptr + rows, mask=row_mask, other=0.0)
        G = G - tl.where(valid, w_val[:, None], 0.0)
    G = tl.where(inb, G, 0.0)
    tl.store(ds_ptr + pid, tl.sum(tl.sum(G * S, 1), 0))
    g_out = g_ptr + (rows - row0).to(tl.int64)[:, None] * stride_gm + (cols - col0)[None, :]
    tl.store(g_out, G.to(g_ptr.dtype.element_ty), mask=inb)


@triton.jit
def _guide_threshold_kernel(
    gr_ptr,
    gc_ptr,
    margin_ptr,  # (n,) per-row margins
    thr_ptr,  # (n,) out: guide similarity of the own positive minus the margin (+inf: none here)
    n,
    DG,
    seg_start,
    seg_end,
    own_off,
    stride_grm,
    stride_grk,
    stride_gcm,
    stride_gck,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    G_IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_mask = rows < n
    # The positive segment's tiles that hold this row block's own columns, computed as the other
    # kernels compute them (segment-aligned tiles of BN columns, the same rows).
    first = tl.maximum(pid * BM + own_off, 0)
    last = tl.minimum(pid * BM + BM - 1 + own_off, seg_end - seg_start - 1)
    own_sim = tl.zeros((BM,), dtype=tl.float32)
    found = tl.zeros((BM,), dtype=tl.float32)
    for t in range(first // BN, last // BN + 1):
        cols = seg_start + t * BN + tl.arange(0, BN)
        col_mask = cols < seg_end
        GS = sim_tile(
            gr_ptr, gc_ptr, rows, cols, row_mask, col_mask, DG,
            stride_grm, stride_grk, stride_gcm, stride_gck, BM, BN, BK, False, G_IEEE,
        )  # fmt: skip
        rel = (cols - seg_start - own_off).to(tl.int32)  # as _segment_tile
        own = (rel[None, :] == rows[:, None]) & row_mask[:, None] & col_mask[None, :]
        own_sim += tl.sum(tl.where(own, GS, 0.0), 1)
        found += tl.sum(own.to(tl.float32), 1)
    margin = tl.load(margin_ptr + rows, mask=row_mask, other=0.0)
    tl.store(thr_ptr + rows, tl.where(found > 0, own_sim - margin, float("inf")), mask=row_mask)
