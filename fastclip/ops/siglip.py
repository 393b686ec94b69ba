"""SigLIP (sigmoid) loss: the block primitive, the single-process autograd Function, the functional form.

With labels ``z = +1`` on the positives (column ``i + offset``) and ``-1`` elsewhere, two identities
make the positives a small correction on top of an all-negative block:

    softplus(-z L) = softplus(L) - [positive] * L
    dloss/dL       = -z sigmoid(-z L) = sigmoid(L) - [positive]

No normalizer couples the tiles, so ``siglip_block`` returns the loss sum *and* the gradients in one
pass over the block; the autograd Function saves the gradients (O((n+N)·D)) and scales them by the
incoming gradient in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclip import _checks
from fastclip.ops import library
from fastclip.ops.clip import _block_impl, _run_block, nan_if_not_finite, positive_logits, positive_rows
from fastclip.ops.dispatch import acc_dtype, chunk_rows, resolve_impl
from fastclip.reference import siglip_loss_reference


def siglip_block_torch(x, y, scale, bias, offset, need_grad, chunk_size=None):
    acc = acc_dtype(x.dtype)
    n, N = x.shape[0], y.shape[0]
    c = chunk_rows(n, N, chunk_size)
    s = scale.detach().to(acc).reshape(())
    b = bias.detach().to(acc).reshape(()) if bias is not None else torch.zeros((), dtype=acc, device=x.device)
    y_acc = y.detach().to(acc)  # (N, D)
    total = torch.zeros((), dtype=acc, device=x.device)
    dx = torch.empty(x.shape, dtype=acc, device=x.device) if need_grad else None
    dy = torch.zeros(y.shape, dtype=acc, device=x.device) if need_grad else None
    ds = torch.zeros((), dtype=acc, device=x.device)
    db = torch.zeros((), dtype=acc, device=x.device)
    lo, hi = positive_rows(n, N, offset)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        xc = x[i0:i1].detach().to(acc)
        logits = ((xc * s) @ y_acc.t()).add_(b)  # (c, N); the scale rides on the (c, D) rows
        # softplus(L) = -logsigmoid(-L): one fused, stable op without softplus's threshold switch.
        # Negating in place twice is exact and saves a (c, N) temporary.
        total -= F.logsigmoid(logits.neg_()).sum()
        if not need_grad:
            continue
        grad = logits.neg_().sigmoid_()  # reuses the logits buffer
        del logits
        p0, p1 = max(i0, lo), min(i1, hi)
        if p1 > p0:
            rows = torch.arange(p0 - i0, p1 - i0, device=x.device)
            grad[rows, rows + i0 + offset] -= 1
        db += grad.sum()
        gy = grad @ y_acc  # (c, D)
        ds += torch.vdot(xc.reshape(-1), gy.reshape(-1))  # sum_ij G_ij x_i.y_j = sum_i x_i.(G y)_i
        dx[i0:i1] = gy.mul_(s)
        dy.addmm_(grad.t(), xc, alpha=s)
    # Positives: softplus(-L) = softplus(L) - L.
    pos = positive_logits(x, y, scale, offset) + b
    total = total - pos.sum()
    return total, dx, dy, ds, db


def siglip_block(x, y, scale, bias, offset, need_grad, *, impl="torch", chunk_size=None):
    """One block of the sigmoid loss: ``sum(softplus(-z L))`` and, when ``need_grad``, the unnormalized
    gradients ``dx = s G y``, ``dy = s G^T x``, ``ds = sum(G * x y^T)``, ``db = sum(G)`` with
    ``G = sigmoid(L) - [positive]``. Positives at column ``i + offset``; ``offset=None``: none.
    Returns ``(loss_sum, dx, dy, ds, db)`` in the accumulation dtype (``dx, dy`` None without grad).

    Under ``torch.compile`` this is the custom op ``torch.ops.fastclip.siglip_block``. Inputs are detached.
    """
    total, dx, dy, ds, db = _run_block(
        library.siglip_block_op,
        library.siglip_block_impl,
        x.detach(),
        y.detach(),
        scale.detach(),
        None if bias is None else bias.detach(),
        offset,
        bool(need_grad),
        _block_impl(impl),
        chunk_size,
    )
    if not need_grad:
        dx = dy = None
    return total, dx, dy, ds, db


class SigLipLossFunction(torch.autograd.Function):
    """Single-process SigLIP loss, gradients formed in the forward pass."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, impl, chunk_size):
        n = x.shape[0]
        need_grad = any(ctx.needs_input_grad[:4])
        total, gx, gy, gs, gb = siglip_block(
            x, y, scale, bias, 0, need_grad, impl=impl, chunk_size=chunk_size
        )
        loss = nan_if_not_finite(total / n, x, y)
        if need_grad:
            ctx.save_for_backward(gx / n, gy / n, gs / n, gb / n)
        ctx.meta = (
            x.dtype,
            y.dtype,
            scale.dtype,
            scale.shape,
            None if bias is None else (bias.dtype, bias.shape),
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gx, gy, gs, gb = ctx.saved_tensors
        x_dtype, y_dtype, s_dtype, s_shape, b_meta = ctx.meta
        g = grad_out.to(gx.dtype)
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        dx = (gx * g).to(x_dtype) if need_x else None
        dy = (gy * g).to(y_dtype) if need_y else None
        ds = (gs * g).to(s_dtype).reshape(s_shape) if need_s else None
        db = (gb * g).to(b_meta[0]).reshape(b_meta[1]) if need_b else None
        return dx, dy, ds, db, None, None


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """SigLIP sigmoid loss of one process's batch, without building the B×B logit matrix.

    Shapes: ``image_features (B, D)``, ``text_features (B, D)``; ``logit_scale`` and ``logit_bias``
    0-dim or 1-element tensors (scale already exponentiated). Returns a 0-dim float32 tensor (float64
    for float64 inputs). Equivalent to::

        logits = logit_scale * image_features @ text_features.T + logit_bias
        labels = 2 * torch.eye(B) - 1
        loss = -F.logsigmoid(labels * logits).sum() / B

    ``impl`` and ``check_finite`` as in :func:`fastclip.clip_loss`.
    """
    _checks.check_features(image_features, text_features)
    logit_scale = _checks.check_scalar("logit_scale", logit_scale, device=image_features.device)
    if logit_bias is None:
        raise ValueError("logit_bias: expected a 0-dim or 1-element tensor (SigLIP needs a bias), got None")
    logit_bias = _checks.check_scalar("logit_bias", logit_bias, device=image_features.device)
    impl = resolve_impl(_checks.check_impl(impl), image_features.device, dtype=image_features.dtype)
    chunk_size = _checks.check_chunk_size(chunk_size)
    if check_finite:
        _checks.check_all_finite("image_features", image_features)
        _checks.check_all_finite("text_features", text_features)
    if impl == "reference":
        return siglip_loss_reference(image_features, text_features, logit_scale, logit_bias)
    return SigLipLossFunction.apply(image_features, text_features, logit_scale, logit_bias, impl, chunk_size)
