"""SigLIP (sigmoid) loss of one process: the autograd Function over the block primitive.

No normalizer couples the tiles, so ``siglip_block`` returns the loss sum *and* the gradients in one
pass over the block; the Function saves the gradients (O((n+N)·D)) and scales them by the incoming
gradient in backward. The public functional form is ``fastclip.siglip_loss`` (``fastclip/functional.py``).
"""

from __future__ import annotations

import torch

from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.blocks import InputMeta, siglip_block
from fastclip.ops.inputs import LossInputs, nan_if_not_finite


class SigLipLossFunction(torch.autograd.Function):
    """Single-process SigLIP loss, gradients formed in the forward pass. ``bias`` may be None. Extra
    negative column sets (``negs``: hard-negative captions) are negative-only blocks: each of their
    pairs adds ``softplus(L)`` to the sum."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, y, scale, bias, impl, chunk_size, *negs):
        n = x.shape[0]
        need_grad = any(ctx.needs_input_grad[:4]) or any(ctx.needs_input_grad[6:])
        total, gx, gy, gs, gb = siglip_block(
            x, y, scale, bias, offset=0, need_grad=need_grad, impl=impl, chunk_size=chunk_size
        )
        gnegs = []
        for t in negs:  # negative-only blocks (offset None)
            t_total, t_gx, t_gy, t_gs, t_gb = siglip_block(
                x, t, scale, bias, offset=None, need_grad=need_grad, impl=impl, chunk_size=chunk_size
            )
            total = total + t_total
            if need_grad:
                gx.add_(t_gx)
                gs, gb = gs + t_gs, gb + t_gb
                gnegs.append(t_gy.div_(n).to(t.dtype))
        loss = nan_if_not_finite(total / n, x, y, scale, bias, *negs)
        if need_grad:
            # Saved divided by n (in place: the block's gradients are fresh tensors) and in the
            # features' dtypes, so the backward's product with the incoming gradient is the result
            # itself: no fp32 (n + N)·D temporaries. For 16-bit features this halves what is saved and
            # leaves the backward only its outputs (B = 32768, D = 768, bf16: 480 -> 192 MiB); the
            # product rounds once more than before when the incoming gradient is not a power of two.
            gx, gy = gx.div_(n).to(x.dtype), gy.div_(n).to(y.dtype)
            ctx.save_for_backward(gx, gy, gs / n, gb / n, *gnegs)
        ctx.inputs = InputMeta.of(x, y, scale, bias)
        ctx.n_negs = len(negs)
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        gx, gy, gs, gb, *gnegs = ctx.saved_tensors
        g = grad_out.to(gs.dtype)  # the accumulation dtype (fp32; fp64 for fp64 inputs)
        main = ctx.inputs.grads(ctx.needs_input_grad[:4], gx * g, gy * g, gs * g, gb * g)
        extra = [t * g if want else None for t, want in zip(gnegs, ctx.needs_input_grad[6:])]
        return (*main, *extra)


def siglip_loss_fused(inputs: LossInputs, negatives=()) -> torch.Tensor:
    """The fused loss of checked inputs (``fastclip.ops.inputs.prepare``), autocast off; ``negatives``:
    checked ``(n, D)`` negative column sets of the features' dtype."""
    a = inputs
    with no_autocast(a.x.device):
        return SigLipLossFunction.apply(a.x, a.y, a.scale, a.bias, a.impl, a.chunk_size, *negatives)
