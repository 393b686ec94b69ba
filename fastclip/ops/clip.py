"""CLIP (softmax) loss of one process: the autograd Function over the block primitives.

The public functional form (``fastclip.clip_loss``, with input checks and ``impl="reference"``) is in
``fastclip/functional.py``; the module (``fastclip.ClipLoss``) in ``fastclip/losses.py``.
"""

from __future__ import annotations

import torch

from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.blocks import InputMeta, clip_grad, clip_lse, positive_logits
from fastclip.ops.inputs import LossInputs, nan_if_not_finite


class ClipLossFunction(torch.autograd.Function):
    """Single-process CLIP loss; saves only x, y and the two (B,) log-sum-exp vectors."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, y, scale, bias, impl, chunk_size):
        n = x.shape[0]
        lse_row, lse_col = clip_lse(x, y, scale, impl=impl, chunk_size=chunk_size)
        pos = positive_logits(x, y, scale, 0)
        loss = (lse_row.sum() + lse_col.sum() - 2 * pos.sum()) / (2 * n)
        loss = nan_if_not_finite(loss, x, y, scale, bias)
        ctx.save_for_backward(x, y, scale, lse_row, lse_col)
        ctx.impl, ctx.chunk_size = impl, chunk_size
        ctx.inputs = InputMeta.of(x, y, scale, bias)
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        x, y, scale, lse_row, lse_col = ctx.saved_tensors
        n = x.shape[0]
        need_x, need_y, need_s, _ = need = ctx.needs_input_grad[:4]
        dx = dy = ds = None
        if need_x or need_y or need_s:
            coef = 1.0 / (2 * n)
            gx, gy, gs = clip_grad(
                x, y, scale, lse_row=lse_row, lse_col=lse_col, coef_row=coef, coef_col=coef, offset=0,
                pos_coef=2 * coef, impl=ctx.impl, chunk_size=ctx.chunk_size,
            )  # fmt: skip
            g = grad_out.to(gx.dtype)
            # In place: gx, gy are fresh fp32 buffers; no third (n, D) fp32 temporary at the peak.
            dx = gx.mul_(g).to(x.dtype) if need_x else None
            del gx
            dy = gy.mul_(g).to(y.dtype) if need_y else None
            del gy
            ds = gs * g
        return ctx.inputs.grads(need, dx, dy, ds, zero_bias=True)


def clip_loss_fused(inputs: LossInputs) -> torch.Tensor:
    """The fused loss of checked inputs (``fastclip.ops.inputs.prepare``), autocast off."""
    a = inputs
    with no_autocast(a.x.device):
        return ClipLossFunction.apply(a.x, a.y, a.scale, a.bias, a.impl, a.chunk_size)
