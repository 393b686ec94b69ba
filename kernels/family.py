"""Fused Triton kernels of the contrastive family: one column model, similarity tiles recomputed in-kernel.

Design (docs/kernels.md, "The contrastive family"; the maths in docs/design.md):

**One column model.** The blocks of a ``FamilySpec`` (``fastclip/ops/family_spec.py``) that share a row
operand and a part form a *row group*; the group's columns are one operand ``C``, its blocks' column
operands end to end (no copy for a one-block group), described by *segments*: a column range of ``C``
with its block's per-cell rules packed in one integer (own column, positive, same-id positives,
exclude own, ids, guide, hardness class). A call has at most three groups (queries; documents in the
query part; documents in their own part under ``per_direction``) whatever the number of hard-negative
groups, so the launches of a call do not grow with ``K``: the segments are a loop inside the kernel.

**Forward**, ``_family_lse_kernel`` (one launch per group): each program owns ``BM`` rows and a range of
``BN``-column tiles (tiles never straddle a segment); every tile of ``L = s S (+ alpha S on the shifted
cells)`` is recomputed from the operands with ``tl.dot`` (as the CLIP forward), every mask is applied
in-tile from indices and id vectors (own column ``i + offset``, equal ids, GIST's guide tile, which is
recomputed the same way from the guide operands), and the row's log-sum-exp, positive and valid-column
sums stay in registers. Nothing of size ``n x N`` or ``c x N`` exists; the output is ``(stats, splits,
n)`` partials merged in a fixed order. GIST's per-row thresholds (the guide similarity of the row's own
positive minus its margin) come first from ``_guide_threshold_kernel``, which computes the positive
segment's tiles exactly as the other kernels do (same rows, same column tiles), so a duplicate of the
positive ties with its threshold exactly and stays (strict ``>``, as sentence-transformers).

**Backward** (formed in the same call: the family's losses return their gradients with the loss),
``_family_grad_kernel``: for ``c`` rows by a panel of whole segment tiles at a time
(``config.grad_tiles``, or the caller's ``chunk_size`` rows), recompute each tile, form
``G / coef = w exp(L - lse) - t`` (O(1) values, so fp16 keeps its precision) in the operands' dtype
plus per-program partials of ``sum G S`` (the scale's gradient), then two cuBLAS GEMMs:
``dR_c += G C_panel`` and ``dC_panel += G^T R_c`` (fp32, scaled once at the end).

Host work per call: a fixed number of torch ops and launches per group for the forward, and per
chunk for the gradients (a test pins the counts: ``tests/test_family_host_ops.py``); no host
synchronisation (the scale is read by the kernels from its tensor; the segment tables are cached on the
device per spec and shape, so a training loop copies them once). FLOPs: ``2 n N D`` in Triton for the
forward, ``2 n N D`` in Triton plus ``4 n N D`` in cuBLAS for the gradients (the guide's tiles add
their own, at the guide's dim). Deterministic: no atomics, fixed orders.

Limits: inputs float32/bfloat16/float16; operand rows plus the row offset below 2**31 (the own-column
test is 32-bit arithmetic; pointers are 64-bit). Under the interpreter bf16 tiles are upcast
after loading (``UPCAST``), as in the CLIP kernels.
"""

from __future__ import annotations

import functools

import torch
import triton
from fastclip.kernels import config, gemm
from fastclip.kernels.common import dot_operands, meta_flags, on_tensor_device
from fastclip.kernels.family_tiles import (
    FLAG_FIELDS,
    SHIFT_BIT,
    SHIFT_CODES,
    _family_grad_kernel,
    _family_lse_kernel,
    _guide_threshold_kernel,
)

SEG_FIELDS = 5  # start, end, first tile, own offset, flags
# The family's tiles keep several masks per cell beside the fp32 accumulator (and GIST a second
# accumulator for the guide): at the CLIP configurations' 128 columns the forward spilled registers on
# sm_90 (115-349 spill stores, AOT build), so the family's tiles are at most 64 columns wide.
FAMILY_MAX_BLOCK_N = 64

# ----------------------------------------------------------------------------------------------------
# the column model (host side: plain Python on the spec and the shapes)


def _flags(b, spec) -> int:
    """The segment's flag word (bits defined in kernels/family_tiles.py)."""
    shift = SHIFT_CODES[b.shift] if spec.hardness else 0
    return sum(bit.value for field, bit in FLAG_FIELDS if getattr(b, field)) + (shift << SHIFT_BIT.value)


def _segment_table_of(segs, block_n: int, spec, device) -> tuple[torch.Tensor, int]:
    """``(table, tiles)``: the group's segments as the kernels read them (start, end, first tile, own
    offset, flags; tiles of ``block_n`` columns, never straddling a segment) and the number of tiles."""
    fields, tile = [], 0
    for seg in segs:
        b = seg.block
        fields += [seg.start, seg.end, tile, 0 if b.local else spec.offset, _flags(b, spec)]
        tile += triton.cdiv(seg.end - seg.start, block_n)
    return _segment_table(tuple(fields), str(device)), tile


@functools.lru_cache(maxsize=64)
def _segment_table(fields: tuple, device: str) -> torch.Tensor:
    """The segments' fields as an int64 device tensor, cached per spec and shape: a training loop
    copies each table to the device once, not per call (a copy from host memory waits for the GPU)."""
    return torch.tensor(fields, dtype=torch.int64, device=device).reshape(-1)


def _tile_spans(segs, block_n: int) -> list[tuple[int, int]]:
    """``(first column, end column)`` in ``C`` of every tile, in tile order."""
    spans = []
    for seg in segs:
        spans += [(j, min(seg.end, j + block_n)) for j in range(seg.start, seg.end, block_n)]
    return spans


def _split_panels(spans, max_cols: int) -> list[tuple[int, int]]:
    """Consecutive tile ranges ``[t0, t1)`` of at most ``max_cols`` columns (at least one tile each)."""
    panels, t0 = [], 0
    for t in range(1, len(spans) + 1):
        if t == len(spans) or spans[t][1] - spans[t0][0] > max_cols:
            panels.append((t0, t))
            t0 = t
    return panels


# ----------------------------------------------------------------------------------------------------
# launcher


def _forward_splits(row_blocks: int, tiles: int, device: torch.device) -> int:
    if config.interpreting() or device.type != "cuda":
        return min(2, tiles)  # the merge of the splits' partials is exercised by the CPU tests
    want = triton.cdiv(config.PROGRAMS_PER_SM * config.num_sms(device), row_blocks)
    return max(1, min(tiles, want, 65535))


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


@on_tensor_device
def family_triton(spec, ts, ids, guides, thr, scale, need, need_scale, chunk_size=None):
    """``(loss, ds, grads)`` of ``spec`` (``fastclip/ops/family_impl.py`` holds the same maths in
    PyTorch). Inputs detached, of one kernel dtype, on one device; ``guides`` normalized; ``thr`` the
    per-row margins of a guided spec; ``chunk_size`` the gradient's rows per chunk (None: the budget)."""
    dtype, dev = ts[0].dtype, ts[0].device
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"ts: expected float32, bfloat16 or float16 operands, got {dtype}")
    f32 = torch.float32
    D = ts[0].shape[1]
    n = ts[spec.blocks[0].row].shape[0]
    ts = [t.contiguous() for t in ts]
    lengths = [t.shape[0] for t in ts]
    # The kernels find a row's own column in 32-bit arithmetic (kernels/family_tiles.py, _segment_tile).
    if max(lengths) + abs(spec.offset) + n >= 2**31:
        raise ValueError(
            f"ts: expected fewer than 2**31 rows per operand plus the row offset, got {max(lengths)} rows "
            f"and offset {spec.offset}"
        )
    guided = any(b.guide for b in spec.blocks)
    cfg_f = config.tile_config("family-lse", dev, dtype, D)
    cfg_g = config.tile_config("family-grad", dev, dtype, D)
    bn_f = min(cfg_f.block_n, FAMILY_MAX_BLOCK_N)
    bn_g = min(cfg_g.block_n, FAMILY_MAX_BLOCK_N)
    flags = meta_flags(dtype)
    g_ieee = meta_flags(f32)["IEEE"]
    s = scale.detach().reshape(1).to(f32)
    eps, coef, alpha = spec.smoothing, spec.coef, float(spec.hardness)
    smooth = bool(eps)
    ids_positive = spec.duplicates == "positive"
    stats_n = 5 if smooth else 3
    dummy_i = torch.zeros(1, dtype=torch.int64, device=dev)
    dummy_f = torch.zeros(1, dtype=f32, device=dev)

    # Per group: the concatenated operands (kernel copies: TF32-rounded for fp32 on TF32), its ids
    # and guide columns, and its segment tables at the forward's and the gradient's tile widths.
    prepared = []
    # The column model (fastclip/ops/family_spec.py): blocks needing column gradients first in a group.
    for g in spec.row_groups(lengths, need):
        row, part, segs = g.row, g.part, g.segments
        cols = _cat([ts[seg.block.col] for seg in segs])
        r_dot, c_dot = dot_operands(ts[row], cols)
        use_ids = any(seg.block.ids for seg in segs)
        r_ids = ids[row] if use_ids else dummy_i
        c_ids = dummy_i
        if use_ids:
            c_ids = _cat([ids[seg.block.col] if seg.block.ids
                          else torch.zeros(seg.end - seg.start, dtype=torch.int64, device=dev)
                          for seg in segs])  # fmt: skip
        g_rows = g_cols = dummy_f
        if guided:
            g_rows, g_cols = dot_operands(
                guides[row].to(f32).contiguous(),
                _cat([guides[seg.block.col].to(f32) for seg in segs]).contiguous(),
            )
        tables = {bn: _segment_table_of(segs, bn, spec, dev) for bn in {bn_f, bn_g}}
        prepared.append(dict(row=row, part=part, segs=segs, cols=cols, r_dot=r_dot, c_dot=c_dot,
                             use_ids=use_ids, r_ids=r_ids, c_ids=c_ids, g_rows=g_rows, g_cols=g_cols,
                             tables=tables))  # fmt: skip

    thr_rows = dummy_f
    if guided:
        thr_rows = _thresholds(spec, prepared, thr, n, bn_f, cfg_f)

    def common_args(p):
        return (
            p["r_dot"], p["c_dot"], p["g_rows"], p["g_cols"], p["r_ids"], p["c_ids"], thr_rows,
        )  # fmt: skip

    def strides(p):
        gr, gc = p["g_rows"], p["g_cols"]
        return (
            p["r_dot"].stride(0), p["r_dot"].stride(1), p["c_dot"].stride(0), p["c_dot"].stride(1),
            gr.stride(0) if guided else 0, gr.stride(1) if guided else 0,
            gc.stride(0) if guided else 0, gc.stride(1) if guided else 0,
        )  # fmt: skip

    DG = guides[spec.blocks[0].row].shape[1] if guided else 1

    # Forward: one launch per group, the splits' partials merged in a fixed order.
    lse_parts = [None] * spec.n_parts
    pos_sum = pos_cnt = val_sum = val_cnt = None
    for p in prepared:
        table, tiles = p["tables"][bn_f]
        row_blocks = triton.cdiv(n, cfg_f.block_m)
        splits = _forward_splits(row_blocks, tiles, dev)
        per_split = triton.cdiv(tiles, splits)
        splits = triton.cdiv(tiles, per_split)
        out = torch.empty((stats_n, splits, n), dtype=f32, device=dev)
        _family_lse_kernel[(row_blocks, splits)](
            *common_args(p), table, s, out,
            n, D, DG, len(p["segs"]), per_split, splits * n, alpha,
            *strides(p),
            HARD=bool(alpha), USE_IDS=p["use_ids"], IDS_POSITIVE=p["use_ids"] and ids_positive, GUIDE=guided,
            SMOOTH=smooth, BM=cfg_f.block_m, BN=bn_f, BK=cfg_f.block_k, G_IEEE=g_ieee,
            num_warps=cfg_f.num_warps, num_stages=cfg_f.num_stages, **flags,
        )  # fmt: skip
        sums = out[1:].sum(1) if splits > 1 else out[1:, 0]
        lse = torch.logsumexp(out[0], 0) if splits > 1 else out[0, 0]
        part = p["part"]
        lse_parts[part] = lse if lse_parts[part] is None else torch.logaddexp(lse_parts[part], lse)
        if pos_sum is None:
            pos_sum, pos_cnt = sums[0], sums[1]
            if smooth:
                val_sum, val_cnt = sums[2], sums[3]
        else:
            pos_sum, pos_cnt = pos_sum + sums[0], pos_cnt + sums[1]
            if smooth:
                val_sum, val_cnt = val_sum + sums[2], val_cnt + sums[3]
    total = sum(w * part for w, part in zip(spec.weights, lse_parts))
    target = pos_sum / pos_cnt
    if smooth:
        target = (1.0 - eps) * target + eps * (val_sum / val_cnt)
    loss = (total - target).sum() * coef
    ds = torch.zeros((), dtype=f32, device=dev)
    grads = [torch.zeros(t.shape, dtype=f32, device=dev) if w else None for t, w in zip(ts, need)]
    if not (any(need) or need_scale):
        return loss, ds, grads

    # Gradients: per group, chunks of rows by panels of whole tiles; two cuBLAS GEMMs per piece.
    w_pos = (1.0 - eps) / pos_cnt
    w_val = eps / val_cnt if smooth else dummy_f
    for p in prepared:
        table, _ = p["tables"][bn_g]
        row, segs, cols = p["row"], p["segs"], p["cols"]
        n_cols = cols.shape[0]
        c, nc = config.grad_tiles(n, n_cols, config.GRAD_WORKSPACE_ELEMENTS, cfg_g.block_m, bn_g)
        if chunk_size is not None:
            c = max(1, min(n, chunk_size))
            nc = max(bn_g, config.GRAD_WORKSPACE_ELEMENTS // c)
        spans = _tile_spans(segs, bn_g)
        panels = _split_panels(spans, nc)
        width = max(spans[t1 - 1][1] - spans[t0][0] for t0, t1 in panels)
        work = torch.empty(min(c, n) * width, dtype=dtype, device=dev)
        weight = float(spec.weights[p["part"]])
        for i0 in range(0, n, c):
            i1 = min(n, i0 + c)
            r_c = ts[row][i0:i1]
            for t0, t1 in panels:
                j0, j1 = spans[t0][0], spans[t1 - 1][1]
                g = work[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
                grid = triton.cdiv(i1 - i0, cfg_g.block_m) * (t1 - t0)
                ds_part = torch.empty(grid, dtype=f32, device=dev)
                _family_grad_kernel[(grid,)](
                    *common_args(p), table, s, lse_parts[p["part"]], w_pos, w_val, g, ds_part,
                    i0, i1, t0, t1, j0, D, DG, len(segs), alpha, weight,
                    *strides(p), g.stride(0),
                    HARD=bool(alpha), USE_IDS=p["use_ids"], IDS_POSITIVE=p["use_ids"] and ids_positive,
                    GUIDE=guided, SMOOTH=smooth, BM=cfg_g.block_m, BN=bn_g, BK=cfg_g.block_k, G_IEEE=g_ieee,
                    GROUP_M=config.GROUP_M, num_warps=cfg_g.num_warps, num_stages=cfg_g.num_stages, **flags,
                )  # fmt: skip
                ds += ds_part.sum()
                if grads[row] is not None:
                    gemm.accumulate(grads[row][i0:i1], g, cols[j0:j1])
                # dC straight into each column operand's gradient: one GEMM per segment in the panel
                # (a panel is usually one segment), no concatenated (width, D) buffer.
                for seg in segs:
                    a, z, col = max(j0, seg.start), min(j1, seg.end), seg.block.col
                    if a < z and grads[col] is not None:
                        gemm.accumulate(
                            grads[col][a - seg.start : z - seg.start], g[:, a - j0 : z - j0].t(), r_c
                        )
    mul = s.reshape(()) * coef
    for g in grads:
        if g is not None:
            g.mul_(mul)
    return loss, ds * coef, grads


def _thresholds(spec, prepared, margins, n, bn, cfg) -> torch.Tensor:
    """GIST's per-row thresholds from the positive segment (the spec's first guided block, which must be
    its positive block), computed at the forward's tile width."""
    first = next(b for b in spec.blocks if b.guide)
    if not (first.positive and first.own):
        raise AssertionError("a guided spec's first guide block must be its positive block")
    for p in prepared:
        for seg in p["segs"]:
            b, st, en = seg.block, seg.start, seg.end
            if b is first:
                out = torch.empty(n, dtype=torch.float32, device=margins.device)
                gr, gc = p["g_rows"], p["g_cols"]
                _guide_threshold_kernel[(triton.cdiv(n, cfg.block_m),)](
                    gr, gc, margins.to(torch.float32).contiguous(), out, n, gr.shape[1], st, en,
                    0 if b.local else spec.offset,
                    gr.stride(0), gr.stride(1), gc.stride(0), gc.stride(1),
                    BM=cfg.block_m, BN=bn, BK=cfg.block_k, G_IEEE=meta_flags(torch.float32)["IEEE"],
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                )  # fmt: skip
                return out
    raise AssertionError("the positive guide block has no segment")
