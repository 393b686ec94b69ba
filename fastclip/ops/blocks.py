"""The block primitives every loss is built from, behind one switch (``impl="torch" | "triton"``).

A *block* is a rectangular problem: ``n`` query rows ``x`` against ``N`` columns ``y``, logits
``L = s * x @ y.T`` (+ ``b``), and optionally one positive per row at column ``i + offset``
(``offset=None``: a negative-only block). The single-process Functions and every distributed
strategy call these three primitives:

* ``clip_lse(x, y, s)`` -> (row log-sum-exp ``(n,)``, column log-sum-exp ``(N,)``).
* ``clip_grad(x, y, s, *, lse_row, lse_col, coef_row, coef_col, offset, pos_coef)`` -> ``dx, dy, ds`` for
  ``G = coef_row * exp(L - lse_row[:, None]) + coef_col * exp(L - lse_col[None, :]) - pos_coef * P``
  where ``P`` marks the positives: ``dx = s G y``, ``dy = s G^T x``, ``ds = sum(G * x y^T)``.
* ``siglip_block(x, y, s, b, *, offset, need_grad)`` -> ``sum(softplus(-z L))`` and, with ``need_grad``,
  ``dx, dy, ds, db`` for ``G = sigmoid(L) - P`` (``z = +1`` on positives, ``-1`` elsewhere).
* ``distill_stats`` and ``distill_grad``: the two passes of the distillation loss over a student and a
  teacher block of the same shape (the math is in ``fastclip/ops/distill.py``).

Results are in the accumulation dtype (float32; float64 for float64 inputs). None of them holds
more than a bounded chunk of the n×N logits. Under ``torch.compile`` they run as the custom ops of
``fastclip/ops/library.py``; in eager mode they run directly, so that tools watching ATen ops
(memory tests, profilers) see inside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastclip import _checks
from fastclip.ops import library
from fastclip.ops.dispatch import block_impl
from fastclip.ops.torch_impl import positive_logits, positive_rows

__all__ = [
    "InputMeta",
    "clip_grad",
    "clip_lse",
    "distill_grad",
    "distill_stats",
    "positive_logits",
    "positive_rows",
    "siglip_block",
]


def _run_block(op, direct, *args):
    if _checks._is_compiling():
        return op(*args)
    return direct(*args)


def clip_lse(x, y, scale, *, impl="torch", chunk_size=None):
    """Row and column log-sum-exp of the block ``s * x @ y.T``: ``(n,)`` and ``(N,)``. Inputs are detached."""
    args = (x.detach(), y.detach(), scale.detach(), block_impl(impl), chunk_size)
    return _run_block(library.clip_lse_op, library.clip_lse_impl, *args)


def clip_grad(
    x, y, scale, *, lse_row, lse_col, coef_row, coef_col, offset, pos_coef, impl="torch", chunk_size=None
):
    """Gradients of a softmax block (see the module docstring): ``dx, dy, ds``. Inputs are detached.
    The coefficients are keyword-only (call sites name them); the custom op takes them positionally."""
    args = (
        x.detach(),
        y.detach(),
        scale.detach(),
        None if lse_row is None else lse_row.detach(),
        None if lse_col is None else lse_col.detach(),
        float(coef_row),
        float(coef_col),
        offset,
        float(pos_coef),
        block_impl(impl),
        chunk_size,
    )
    return _run_block(library.clip_grad_op, library.clip_grad_impl, *args)


def siglip_block(x, y, scale, bias, *, offset, need_grad, impl="torch", chunk_size=None):
    """One block of the sigmoid loss: ``(loss_sum, dx, dy, ds, db)``, ``dx, dy`` None without
    ``need_grad`` (see the module docstring). Inputs are detached."""
    total, dx, dy, ds, db = _run_block(
        library.siglip_block_op,
        library.siglip_block_impl,
        x.detach(),
        y.detach(),
        scale.detach(),
        None if bias is None else bias.detach(),
        offset,
        bool(need_grad),
        block_impl(impl),
        chunk_size,
    )
    if not need_grad:
        dx = dy = None
    return total, dx, dy, ds, db


def distill_stats(x, y, s, xt, yt, t, *, both, impl="torch", chunk_size=None):
    """Pass 1 of the distillation loss: ``(lse_s_row, lse_t_row, m_row, lse_s_col, lse_t_col, m_col)``,
    the column entries None unless ``both``. Inputs are detached."""
    args = (x.detach(), y.detach(), s.detach(), xt.detach(), yt.detach(), t.detach())
    out = _run_block(
        library.distill_stats_op, library.distill_stats_impl, *args, bool(both), block_impl(impl), chunk_size
    )
    return out if both else (*out[:3], None, None, None)


def distill_grad(x, y, s, xt, yt, t, stats, coefs, offset, need_student, need_teacher, *, impl, chunk_size):
    """Pass 2 of the distillation loss: ``(dx, dy, ds, dxt, dyt, dt)``, None where not needed. ``stats``:
    pass 1's six results; ``coefs``: the 5-element coefficient tensor. Inputs are detached."""
    det = tuple(None if v is None else v.detach() for v in (x, y, s, xt, yt, t, *stats, coefs))
    out = _run_block(
        library.distill_grad_op, library.distill_grad_impl,
        *det, offset, bool(need_student), bool(need_teacher), block_impl(impl), chunk_size,
    )  # fmt: skip
    keep = (need_student,) * 3 + (need_teacher,) * 3
    return tuple(v if k else None for v, k in zip(out, keep))


@dataclass(frozen=True)
class InputMeta:
    """Dtypes and shapes of a loss Function's (x, y, scale, bias), to return each gradient as its
    input: every autograd Function of the losses ends its backward with :meth:`grads`."""

    x_dtype: torch.dtype
    y_dtype: torch.dtype
    s_dtype: torch.dtype
    s_shape: torch.Size
    b_dtype: torch.dtype | None
    b_shape: torch.Size | None
    device: torch.device

    @staticmethod
    def of(x, y, scale, bias) -> InputMeta:
        b_dtype, b_shape = (None, None) if bias is None else (bias.dtype, bias.shape)
        return InputMeta(x.dtype, y.dtype, scale.dtype, scale.shape, b_dtype, b_shape, x.device)

    def grads(self, need, dx, dy, ds, db=None, *, zero_bias=False, extra: int = 2) -> tuple:
        """``(dx, dy, ds, db)`` in the inputs' dtypes and shapes (None where not needed), then ``extra``
        Nones for the non-tensor arguments. ``zero_bias``: the softmax loss is invariant to a bias
        shared by all logits, so its gradient is exactly zero."""
        has_bias = self.b_dtype is not None
        if zero_bias and need[3] and has_bias:
            db = torch.zeros(self.b_shape, dtype=self.b_dtype, device=self.device)
        elif need[3] and has_bias:
            db = db.to(self.b_dtype).reshape(self.b_shape)
        else:
            db = None
        return (
            dx.to(self.x_dtype) if need[0] else None,
            dy.to(self.y_dtype) if need[1] else None,
            ds.to(self.s_dtype).reshape(self.s_shape) if need[2] else None,
            db,
            *([None] * extra),
        )
