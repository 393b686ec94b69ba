"""The "torch" implementation of the contrastive family: one chunked pass gives the loss and its gradients.

Every block of a :class:`~fastclip.ops.family_spec.FamilySpec` is row-local: row ``i``'s log-sum-exps
span only row ``i``'s columns. So a chunk of ``c`` rows against *all* the columns of every block holds
complete log-sum-exps, and the gradient ``G = coef * (w * softmax - target)`` of those rows is formed in
the same pass, then ``dR += s G C`` and ``dC += s G^T R``: 3 GEMMs per block, as the materialized
loss's forward and backward, and no second pass over the columns (the CLIP kernels need a second pass
only because their column log-sum-exp couples all rows). The gradients are returned with the loss
and kept by the autograd Function until backward scales them by the incoming gradient.

Memory: the chunk's logits of all blocks (``c x width`` in the accumulation dtype, ``c`` from
:func:`family_chunk_rows`), one mask of that size where ids/guides/label smoothing ask for it, and the
(n + N, D) gradients in the accumulation dtype: never n x N. Every mask comes from indices (the own
column ``i + offset``, id equality, the guide tile), never from an n x N tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastclip.ops.dispatch import FAMILY_CHUNK_ELEMENTS, FAMILY_MIN_CHUNK_ROWS, acc_dtype
from fastclip.ops.family_spec import FamilySpec
from fastclip.ops.torch_impl import positive_rows


@dataclass
class RowStats:
    """Per-row statistics of a family loss over (some of) its columns: each part's log-sum-exp, the sum
    and count of positive logits, and of valid logits (label smoothing)."""

    lse: list[torch.Tensor]  # one (n,) per part
    pos_sum: torch.Tensor
    pos_cnt: torch.Tensor
    val_sum: torch.Tensor | None
    val_cnt: torch.Tensor | None

    @staticmethod
    def empty(n_parts, n, dtype, device, smoothing: bool) -> RowStats:
        def z():
            return torch.zeros(n, dtype=dtype, device=device)

        lse = [torch.full((n,), float("-inf"), dtype=dtype, device=device) for _ in range(n_parts)]
        return RowStats(lse, z(), z(), z() if smoothing else None, z() if smoothing else None)

    def put(self, i0, i1, lse, pos_sum, pos_cnt, val_sum, val_cnt) -> None:
        for mine, part in zip(self.lse, lse):
            mine[i0:i1] = part
        self.pos_sum[i0:i1], self.pos_cnt[i0:i1] = pos_sum, pos_cnt
        if self.val_sum is not None:
            self.val_sum[i0:i1], self.val_cnt[i0:i1] = val_sum, val_cnt

    def merge(self, other: RowStats) -> RowStats:
        """The statistics over both column sets (log-add-exp of the log-sum-exps, sums of the rest)."""
        self.lse = [torch.logaddexp(a, b) for a, b in zip(self.lse, other.lse)]
        self.pos_sum += other.pos_sum
        self.pos_cnt += other.pos_cnt
        if self.val_sum is not None:
            self.val_sum += other.val_sum
            self.val_cnt += other.val_cnt
        return self

    def loss_sum(self, spec: FamilySpec) -> torch.Tensor:
        """``sum_i loss_i`` (without ``coef``) from complete statistics."""
        total = sum(w * part for w, part in zip(spec.weights, self.lse))
        target = self.pos_sum / self.pos_cnt
        if spec.smoothing:
            target = (1.0 - spec.smoothing) * target + spec.smoothing * (self.val_sum / self.val_cnt)
        return (total - target).sum()


def guide_thresholds(b, gtile: torch.Tensor, orow: torch.Tensor, ocol: torch.Tensor, margins: torch.Tensor):
    """A chunk's guide thresholds ``g(row, own positive) - margin``, the own cell read from the positive
    guide block's tile: the same arithmetic as every cell compared with it, so a duplicate of the
    positive (equal guide embeddings) ties exactly and stays, as in the materialized loss (a separately
    computed dot product could differ in the last bit and remove it). ``margins``: ``thr`` of the op,
    ``margin`` or ``|g_pos| * margin`` per row. Rows without their positive here get no threshold."""
    if not (b.positive and b.own):
        raise AssertionError("a guided spec's first guide block must be its positive block")
    out = torch.full(margins.shape, float("inf"), dtype=gtile.dtype, device=gtile.device)
    out[orow] = gtile[orow, ocol] - margins[orow].to(gtile.dtype)
    return out


def family_chunk_rows(n: int, width: int, chunk_size: int | None) -> int:
    """Rows per chunk: the caller's ``chunk_size`` or the default budget over all blocks' columns."""
    if chunk_size is not None:
        return max(1, min(n, chunk_size))
    return max(1, min(n, max(FAMILY_MIN_CHUNK_ROWS, FAMILY_CHUNK_ELEMENTS // max(1, width))))


def family_torch(
    spec: FamilySpec,
    ts: list[torch.Tensor],
    ids: list[torch.Tensor | None],
    guides: list[torch.Tensor | None],
    thr: torch.Tensor | None,
    scale: torch.Tensor,
    need: list[bool],
    need_scale: bool = False,
    chunk_size: int | None = None,
    *,
    stats_only: bool = False,
    stats: RowStats | None = None,
):
    """``(loss, ds, grads)``: ``coef * sum_i loss_i``, its scale gradient and one gradient (or None) per
    operand, all in the accumulation dtype. Inputs are detached; ``guides`` are normalized already.

    Split form, for column operands that arrive in pieces (the ring strategy): ``stats_only=True``
    returns the rows' :class:`RowStats` over these columns (to merge across pieces with
    :meth:`RowStats.merge`); ``stats=`` (the merged, complete statistics) returns ``(None, ds, grads)``:
    this piece's share of the gradients, with every softmax normalized by the complete log-sum-exps."""
    acc = acc_dtype(ts[0].dtype)
    dev = ts[0].device
    n = ts[spec.blocks[0].row].shape[0]
    # The column model (fastclip/ops/family_spec.py): per (row operand, part) one logits buffer over its
    # blocks' columns end to end; each block is a column range (segment) of it.
    groups = spec.row_groups([t.shape[0] for t in ts])
    c = family_chunk_rows(n, sum(g.width for g in groups), chunk_size)
    s = scale.detach().to(acc).reshape(())
    alpha, eps, coef = spec.hardness, spec.smoothing, spec.coef
    # L' = S (s + alpha) on shifted cells, S s elsewhere: the similarity is scaled by one of the two
    # factors per cell (never L (1 + alpha / s), which is NaN at s = 0).
    s_shift = s + alpha if alpha else None
    full = [t.detach().to(acc) for t in ts]  # no copy for float32 inputs
    gfull = [None if g is None else g.detach().to(acc) for g in guides]
    grads = [torch.zeros(t.shape, dtype=acc, device=dev) if want else None for t, want in zip(ts, need)]
    any_grad = (any(need) or need_scale) and not stats_only
    loss = torch.zeros((), dtype=acc, device=dev)
    out_stats = RowStats.empty(spec.n_parts, n, acc, dev, bool(eps)) if stats_only else None
    ds = torch.zeros((), dtype=acc, device=dev)
    neg_inf = float("-inf")
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        m = i1 - i0
        row_max = [torch.full((m,), neg_inf, dtype=acc, device=dev) for _ in spec.weights]
        pos_sum = torch.zeros(m, dtype=acc, device=dev)
        pos_cnt = torch.zeros(m, dtype=acc, device=dev)
        val_sum = torch.zeros(m, dtype=acc, device=dev) if eps else None
        val_cnt = torch.zeros(m, dtype=acc, device=dev) if eps else None
        # Release the previous chunk's buffers before this one allocates its own (the loop names would
        # otherwise keep its last group's logits alive, views included: two chunks at the peak, not one).
        kept = buf = logits = grad = view = None
        kept = []
        thr_c = None
        for g in groups:
            rows = full[g.row][i0:i1]
            shifted_group = bool(alpha) and any(x.block.shift != "none" for x in g.segments)
            lhs = rows if shifted_group else rows * s  # the scale rides on the (m, D) rows
            buf = torch.empty((m, g.width), dtype=acc, device=dev)
            segs = []
            for seg in g.segments:
                b = seg.block
                cols = full[b.col]
                logits = buf[:, seg.start : seg.end]
                torch.mm(lhs, cols.t(), out=logits)  # into the group's buffer, no copy
                off = i0 + (0 if b.local else spec.offset)
                lo, hi = positive_rows(m, cols.shape[0], off) if b.own else (0, 0)
                orow = torch.arange(lo, hi, device=dev)
                ocol = orow + off
                removed, extra_pos = None, None
                if b.ids:
                    same = ids[b.row][i0:i1, None] == ids[b.col][None, :]  # (m, Nb) bool
                    same[orow, ocol] = False  # ids never reclassify the own column
                    if spec.duplicates == "positive" and b.positive_capable:
                        extra_pos = same
                    else:
                        removed = same
                if shifted_group:
                    _shift_logits(logits, b, rows, cols, orow, ocol, extra_pos, s, s_shift)
                if b.guide:
                    gtile = gfull[b.row][i0:i1] @ gfull[b.col].t()  # (m, Nb) guide similarities
                    if thr_c is None:  # the positive guide block comes first (guide_thresholds)
                        thr_c = guide_thresholds(b, gtile, orow, ocol, thr[i0:i1])
                    over = gtile > thr_c[:, None]
                    del gtile
                    if b.positive:
                        over[orow, ocol] = False
                    removed = over if removed is None else removed.logical_or_(over)
                if removed is not None:
                    logits.masked_fill_(removed, neg_inf)
                    if extra_pos is not None:
                        extra_pos &= ~removed
                    del removed
                if b.exclude_own:
                    logits[orow, ocol] = neg_inf
                    if extra_pos is not None:
                        extra_pos[orow, ocol] = False
                if b.positive:
                    pos_sum[orow] += logits[orow, ocol]
                    pos_cnt[orow] += 1
                if extra_pos is not None:
                    pos_sum += torch.where(extra_pos, logits, 0.0).sum(1)
                    pos_cnt += extra_pos.sum(1)
                valid = None
                if eps:
                    valid = logits > neg_inf
                    val_sum += torch.where(valid, logits, 0.0).sum(1)
                    val_cnt += valid.sum(1)
                segs.append((seg, cols, orow, ocol, extra_pos, valid))
            # Each part's row maximum over its groups; the exponentials are taken in place below.
            row_max[g.part] = torch.maximum(row_max[g.part], buf.amax(1))
            kept.append((g, rows, buf, segs))
        # exp(L - max) in place (the logits are not needed again: the target terms were read above),
        # its row sums give the log-sum-exps, and the softmax is that buffer times 1 / sum: one pass of
        # exp per group and chunk, and no temporary of the chunk's size (logsumexp would make one).
        shift = [torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)) for mx in row_max]
        sums = [torch.zeros(m, dtype=acc, device=dev) for _ in spec.weights]
        for g, _, buf, _ in kept:
            sums[g.part] += buf.sub_(shift[g.part][:, None]).exp_().sum(1)
        lse = [sh + sm.log() for sh, sm in zip(shift, sums)]
        if stats_only:
            out_stats.put(i0, i1, lse, pos_sum, pos_cnt, val_sum, val_cnt)
            continue
        if stats is not None:  # normalize by the complete statistics of these rows
            lse = [part[i0:i1] for part in stats.lse]
            pos_cnt, val_cnt = stats.pos_cnt[i0:i1], None if val_cnt is None else stats.val_cnt[i0:i1]
        else:
            total = sum(w * part for w, part in zip(spec.weights, lse))
            target = pos_sum / pos_cnt
            if eps:
                target = (1.0 - eps) * target + eps * (val_sum / val_cnt)
            loss += (total - target).sum()
        if not any_grad:
            continue
        w_pos = (coef * (1.0 - eps)) / pos_cnt  # (m,)
        w_val = (coef * eps) / val_cnt if eps else None
        # softmax_P = exp(L - shift_P) * exp(shift_P - lse_P), lse_P this chunk's or (split form) the
        # complete one: a per-row factor on the exponentials already in the buffers.
        factor = [(sh - ls).exp_().mul_(coef * w) for sh, ls, w in zip(shift, lse, spec.weights)]
        for g, rows, buf, segs in kept:
            grad = buf.mul_(factor[g.part][:, None])
            rows_s = rows * s
            gc = torch.zeros_like(rows)  # (m, D): G C over the group's columns
            for seg, cols, orow, ocol, extra_pos, valid in segs:
                view = grad[:, seg.start : seg.end]
                if seg.block.positive:
                    view[orow, ocol] -= w_pos[orow]
                if extra_pos is not None:
                    view.sub_(extra_pos * w_pos[:, None])
                if valid is not None:
                    view.sub_(valid * w_val[:, None])
                gc.addmm_(view, cols)
                # The scale multiplies (m, D) operands, never the (m, Nb) chunk, and stays a tensor (no sync).
                if grads[seg.block.col] is not None:
                    grads[seg.block.col].addmm_(view.t(), rows_s)
            # ds = sum_ij G_ij S_ij = sum_i r_i . (G C)_i: O(m D), no pass over the chunk.
            ds += torch.vdot(rows.reshape(-1), gc.reshape(-1))
            if grads[g.row] is not None:
                grads[g.row][i0:i1].add_(gc.mul_(s))
        del kept
    if stats_only:
        return out_stats
    if stats is not None:
        return None, ds, grads
    return loss * coef, ds, grads


def _shift_logits(logits, b, rows, cols, orow, ocol, extra_pos, s, s_shift) -> None:
    """In place: the unscaled similarities ``logits`` of a block become ``S (s + alpha)`` on its shifted
    cells and ``S s`` elsewhere. Positives carry no shift: the own column under "all_but_own", same-id
    ones under "positive"."""
    if b.shift == "none":
        logits.mul_(s)
        return
    base, own_factor = (s, s_shift) if b.shift == "own_only" else (s_shift, s)
    if extra_pos is None or b.shift == "own_only":  # (same-id cells are never own cells)
        logits.mul_(base)
    else:
        logits.mul_(torch.where(extra_pos, s, s_shift))
    if b.shift != "all":  # the own cells: O(m D) dot products
        logits[orow, ocol] = (rows[orow] * cols[ocol]).sum(1) * own_factor
