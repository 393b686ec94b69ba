"""Distillation CLIP loss (open_clip ``DistillClipLoss``): block primitives, autograd Function, functional.

A student block ``Ls = s * x @ y.T`` (``n`` rows against ``N`` columns) and a teacher block
``Lt = t * xt @ yt.T`` of the same shape (the teacher's feature dim may differ). For the row direction,
with ``Ps``/``Pt`` the row softmaxes and ``m_i = sum_j Pt_ij Ls_ij`` (the student logit expected under
the teacher)::

    contrastive_i = lse(Ls)_i - Ls_{i, i+offset}          (cross-entropy with one positive)
    distill_i     = -sum_j Pt_ij log Ps_ij = lse(Ls)_i - m_i

and the same over columns for the column direction (open_clip's ``logits_per_text``). Two passes, each
over ``chunk_rows`` rows at a time, so neither n×N matrix ever exists:

* ``distill_stats``: student and teacher row (and column) log-sum-exps and ``m`` -- all a loss needs.
  Column values are merged chunk by chunk (``m`` as a weighted mean under the merged teacher
  normalizer), so one pass suffices.
* ``distill_grad``: recomputes both tiles; with ``g_c``/``g_d`` the gradients flowing into the two
  losses and ``cr``/``cc`` the weights of the directions (``1/(2n)`` each for the symmetric loss)::

      dLoss/dLs = ar Ps_row + ac Ps_col - br Pt_row - bc Pt_col - p P
      dLoss/dLt = -(br Pt_row * (Ls - m_row[:, None]) + bc Pt_col * (Ls - m_col[None, :]))

  with ``ar = (g_c + g_d) cr``, ``ac = (g_c + g_d) cc``, ``br = g_d cr``, ``bc = g_d cc``,
  ``p = g_c (cr + cc)`` and ``P`` the positives; then ``dx = s G y``, ``dy = s G^T x``,
  ``ds = sum(G * x y^T)`` for both the student and (when it requires grad) the teacher.

The coefficients travel as a 5-element tensor (``ar, ac, br, bc, p``), so no host sync is needed.
"""

from __future__ import annotations

import torch

from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.blocks import distill_grad, distill_stats
from fastclip.ops.inputs import nan_if_not_finite
from fastclip.ops.torch_impl import positive_logits

__all__ = ["DistillLossFunction", "distill_block_loss", "distill_grad", "distill_stats"]

# ----------------------------------------------------------------------------------------------------
# the autograd Function over the two passes (``fastclip.ops.blocks.distill_stats`` / ``distill_grad``)


def _direction_weights(n: int, N: int, both: bool) -> tuple[float, float]:
    return (1.0 / (2 * n), 1.0 / (2 * N)) if both else (1.0 / n, 0.0)


class DistillLossFunction(torch.autograd.Function):
    """(contrastive, distill) of a block; saves the inputs and O(n + N) statistics, nothing n×N.

    ``both=True``: the symmetric loss of a square block (rows and columns, each direction weighted
    1/2, as open_clip's single-process loss). ``both=False``: row direction only, mean over rows
    (open_clip's ``local_loss`` blocks), positives at column ``i + offset``.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, y, s, xt, yt, t, offset, both, impl, chunk_size):
        n, N = x.shape[0], y.shape[0]
        stats = distill_stats(x, y, s, xt, yt, t, both=both, impl=impl, chunk_size=chunk_size)
        lse_s_row, _, m_row, lse_s_col, _, m_col = stats
        acc = lse_s_row.dtype
        pos = positive_logits(x, y, s, offset).to(acc).sum()
        cr, cc = _direction_weights(n, N, both)
        contrastive = lse_s_row.sum() * cr - pos * (cr + cc)
        distill = (lse_s_row - m_row).sum() * cr
        if both:
            contrastive = contrastive + lse_s_col.sum() * cc
            distill = distill + (lse_s_col - m_col).sum() * cc
        contrastive = nan_if_not_finite(contrastive, x, y, s)
        distill = nan_if_not_finite(distill, x, y, s, xt, yt, t)
        ctx.save_for_backward(x, y, s, xt, yt, t, *(v for v in stats if v is not None))
        ctx.cfg = (offset, both, impl, chunk_size, cr, cc)
        return contrastive, distill

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, g_c, g_d):
        x, y, s, xt, yt, t, *saved = ctx.saved_tensors
        offset, both, impl, chunk_size, cr, cc = ctx.cfg
        stats = tuple(saved) if both else (*saved, None, None, None)
        need = ctx.needs_input_grad
        need_student, need_teacher = any(need[:3]), any(need[3:6])
        out = [None] * 10
        if not (need_student or need_teacher):
            return tuple(out)
        acc = stats[0].dtype
        g_c, g_d = g_c.to(acc).reshape(()), g_d.to(acc).reshape(())
        g_sum = g_c + g_d
        coefs = torch.stack([g_sum * cr, g_sum * cc, g_d * cr, g_d * cc, g_c * (cr + cc)])
        grads = distill_grad(
            x, y, s, xt, yt, t, stats, coefs, offset, need_student, need_teacher,
            impl=impl, chunk_size=chunk_size,
        )  # fmt: skip
        for k, (inp, gr) in enumerate(zip((x, y, s, xt, yt, t), grads)):
            if need[k]:
                out[k] = gr.to(inp.dtype).reshape(inp.shape)
        return tuple(out)


def distill_block_loss(x, y, s, xt, yt, t, *, offset, both, impl, chunk_size):
    """The Function under autocast disabled (inputs checked by ``fastclip.ops.inputs.prepare_distill``;
    ``impl`` resolved, never "reference")."""
    with no_autocast(x.device):
        return DistillLossFunction.apply(x, y, s, xt, yt, t, offset, both, impl, chunk_size)
