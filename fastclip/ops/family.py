"""The autograd Function of the contrastive family: one call of the fused block op, for any spec.

``family_loss(spec, operands, ...)`` is the single entry every family loss uses — single-process
functional forms, modules and the distributed gather strategy alike. Forward runs the op
(``torch.ops.fastclip.family`` under ``torch.compile``, its eager body otherwise), which returns the loss
*and* the gradients of every operand that needs one (``fastclip/ops/family_impl.py``: row-local
softmax, one pass); backward only scales them by the incoming gradient. Saved for backward: those
gradients, O((n + N)·D), never the logits.
"""

from __future__ import annotations

import torch

from fastclip import _checks
from fastclip.ops import library
from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.family_spec import FamilySpec
from fastclip.ops.inputs import nan_if_not_finite


def _block_impl(impl: str) -> str:
    return "triton" if impl == "triton" else "torch"


class FamilyFunction(torch.autograd.Function):
    """Inputs: ``spec_json, impl, chunk_size, n_ops, scale, *operands, *ids, *guides, thr``."""

    @staticmethod
    @autocast_off
    def forward(ctx, spec_json, impl, chunk_size, n_ops, scale, *rest):
        ts = list(rest[:n_ops])
        ids = list(rest[n_ops : 2 * n_ops])
        guides = list(rest[2 * n_ops : 3 * n_ops])
        thr = rest[3 * n_ops]
        need = [bool(ctx.needs_input_grad[5 + i]) for i in range(n_ops)]
        need_s = bool(ctx.needs_input_grad[4])
        args = (
            spec_json,
            [t.detach() for t in ts],
            [None if t is None else t.detach() for t in ids],
            [None if t is None else t.detach() for t in guides],
            None if thr is None else thr.detach(),
            scale.detach(),
            need,
            need_s,
            _block_impl(impl),
            chunk_size,
        )
        if _checks._is_compiling():
            out = library.family_op(*args)
        else:
            out = library.family_impl(*args)
        loss, ds, grads = out[0], out[1], list(out[2:])
        loss = nan_if_not_finite(loss, scale, *ts)
        saved = [g if want else None for g, want in zip(grads, need)]
        ctx.save_for_backward(ds, *saved)
        ctx.n_ops = n_ops
        ctx.meta = [(t.dtype, t.shape) for t in ts] + [(scale.dtype, scale.shape)]
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        ds, *grads = ctx.saved_tensors
        n = ctx.n_ops
        g = grad_out.to(ds.dtype)
        out = []
        for grad, (dtype, _) in zip(grads, ctx.meta[:n]):
            out.append(None if grad is None else (grad * g).to(dtype))
        s_dtype, s_shape = ctx.meta[n]
        d_scale = (ds * g).to(s_dtype).reshape(s_shape) if ctx.needs_input_grad[4] else None
        return (None, None, None, None, d_scale, *out, *([None] * (2 * n + 1)))


def family_loss(
    spec: FamilySpec,
    operands: list[torch.Tensor],
    scale: torch.Tensor,
    *,
    ids: list[torch.Tensor | None] | None = None,
    guides: list[torch.Tensor | None] | None = None,
    thr: torch.Tensor | None = None,
    impl: str = "torch",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The loss of ``spec`` over checked operands of one dtype (autocast off inside). ``impl`` is a
    resolved implementation ("torch" or "triton")."""
    n_ops = len(operands)
    ids = list(ids) if ids is not None else [None] * n_ops
    guides = list(guides) if guides is not None else [None] * n_ops
    assert len(ids) == n_ops and len(guides) == n_ops
    with no_autocast(operands[0].device):
        return FamilyFunction.apply(
            spec.to_json(), impl, chunk_size, n_ops, scale, *operands, *ids, *guides, thr
        )
