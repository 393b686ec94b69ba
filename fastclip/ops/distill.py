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

from fastclip import _checks
from fastclip.ops import distill_library
from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.dispatch import resolve_impl
from fastclip.ops.distill_impl import distill_grad_eager, distill_stats_eager
from fastclip.ops.inputs import nan_if_not_finite, settle_pair
from fastclip.ops.torch_impl import positive_logits

# ----------------------------------------------------------------------------------------------------
# the two passes behind one switch, and the autograd Function


def distill_stats(x, y, s, xt, yt, t, *, both, impl="torch", chunk_size=None):
    """Pass 1 (see the module docstring); inputs are detached. Under ``torch.compile`` it runs as the
    custom op ``torch.ops.fastclip.distill_stats`` (``fastclip/ops/distill_library.py``)."""
    args = (x.detach(), y.detach(), s.detach(), xt.detach(), yt.detach(), t.detach(), both, impl, chunk_size)
    if _checks._is_compiling():
        out = distill_library.distill_stats_op(*args)
        return out if both else (*out[:3], None, None, None)
    return distill_stats_eager(*args)


def distill_grad(x, y, s, xt, yt, t, stats, coefs, offset, need_student, need_teacher, *, impl, chunk_size):
    """Pass 2 (see the module docstring); inputs are detached. Under ``torch.compile`` it runs as the
    custom op ``torch.ops.fastclip.distill_grad``."""
    det = tuple(None if v is None else v.detach() for v in (x, y, s, xt, yt, t, *stats, coefs))
    if _checks._is_compiling():
        out = distill_library.distill_grad_op(*det, offset, need_student, need_teacher, impl, chunk_size)
        keep = (need_student,) * 3 + (need_teacher,) * 3
        return tuple(v if k else None for v, k in zip(out, keep))
    x, y, s, xt, yt, t = det[:6]
    return distill_grad_eager(
        x, y, s, xt, yt, t, det[6:12], det[12], offset, need_student, need_teacher, impl, chunk_size
    )


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


# ----------------------------------------------------------------------------------------------------
# input handling shared by the functional form and the module


FEATURE_NAMES = ("image_features", "text_features", "dist_image_features", "dist_text_features")


def check_distill_inputs(x, y, s, xt, yt, t, *, check_finite=False):
    """Checks of the six inputs (messages name the argument); returns them with one dtype per pair and
    the scales as tensors on the features' device. The teacher's feature dim may differ."""
    x, y = settle_pair(x, y, *FEATURE_NAMES[:2])
    xt, yt = settle_pair(xt, yt, *FEATURE_NAMES[2:])
    if xt.shape[0] != x.shape[0]:
        raise ValueError(
            f"dist_image_features: expected batch size {x.shape[0]} (as image_features), got {xt.shape[0]}"
        )
    if xt.device != x.device:
        raise ValueError(
            f"dist_image_features: expected device {x.device} (as image_features), got {xt.device}"
        )
    s = _checks.check_scalar("logit_scale", s, device=x.device)
    t = _checks.check_scalar("dist_logit_scale", t, device=x.device)
    _checks.check_bool("check_finite", check_finite)
    if check_finite:
        for name, v in zip((*FEATURE_NAMES, "logit_scale", "dist_logit_scale"), (x, y, xt, yt, s, t)):
            _checks.check_all_finite(name, v)
    return x, y, s, xt, yt, t


def resolve_distill_impl(impl, x, xt) -> str:
    impl = _checks.check_impl(impl)
    # float64 anywhere runs on the chunked PyTorch path (the kernels take 16/32-bit inputs).
    dtype = torch.float64 if torch.float64 in (x.dtype, xt.dtype) else x.dtype
    return resolve_impl(impl, x.device, dtype=dtype)


def distill_block_loss(x, y, s, xt, yt, t, *, offset, both, impl, chunk_size):
    """The Function under autocast disabled (checked inputs; ``impl`` resolved, never "reference")."""
    with no_autocast(x.device):
        return DistillLossFunction.apply(x, y, s, xt, yt, t, offset, both, impl, chunk_size)
