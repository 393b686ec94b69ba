"""CLIP (softmax) loss: block primitives, the single-process autograd Function, the functional form.

A *block* is a rectangular problem: ``n`` query rows ``x`` against ``N`` columns ``y``, logits
``L = s * x @ y.T``, and optionally one positive per row at column ``i + offset`` (``offset=None``:
a negative-only block). The distributed strategies call the same two block primitives:

* ``clip_lse(x, y, s)`` -> (row log-sum-exp ``(n,)``, column log-sum-exp ``(N,)``), fp32.
* ``clip_grad(x, y, s, lse_row, lse_col, coef_row, coef_col, offset, pos_coef)`` -> ``dx, dy, ds``
  for ``G = coef_row * exp(L - lse_row[:, None]) + coef_col * exp(L - lse_col[None, :]) - pos_coef * P``
  where ``P`` marks the positives: ``dx = s G y``, ``dy = s G^T x``, ``ds = sum(G * x y^T)``.

Neither ever holds more than one chunk of the n×N logits (``chunk_rows`` rows at a time).
"""

from __future__ import annotations

import torch

from fastclip import _checks
from fastclip.ops import library
from fastclip.ops.dispatch import acc_dtype, chunk_rows, resolve_impl
from fastclip.reference import clip_loss_reference


def positive_rows(n: int, n_cols: int, offset: int | None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` whose positive column ``i + offset`` lies inside ``[0, n_cols)``."""
    if offset is None:
        return 0, 0
    lo = max(0, -offset)
    hi = min(n, n_cols - offset)
    return lo, max(lo, hi)


def positive_logits(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, offset: int | None
) -> torch.Tensor:
    """``s * x_i . y_{i+offset}`` for the rows that have a positive, in the accumulation dtype. O(n·D)."""
    acc = acc_dtype(x.dtype)
    lo, hi = positive_rows(x.shape[0], y.shape[0], offset)
    if hi <= lo:
        return torch.zeros(0, dtype=acc, device=x.device)
    xs = x[lo:hi].to(acc)
    ys = y[lo + offset : hi + offset].to(acc)
    return (xs * ys).sum(-1) * scale.to(acc).reshape(())


# ----------------------------------------------------------------------------------------------------
# "torch" implementation of the block primitives


def clip_lse_torch(x, y, scale, chunk_size=None):
    acc = acc_dtype(x.dtype)
    n, N = x.shape[0], y.shape[0]
    c = chunk_rows(n, N, chunk_size)
    s = scale.detach().to(acc).reshape(())
    yt = y.detach().to(acc).t()  # (D, N)
    lse_row = torch.empty(n, dtype=acc, device=x.device)
    lse_col = torch.full((N,), float("-inf"), dtype=acc, device=x.device)
    for i0 in range(0, n, c):
        # The scale goes on the (c, D) rows, not the (c, N) product: one pass less over the chunk.
        logits = (x[i0 : i0 + c].detach().to(acc) * s) @ yt  # (c, N)
        lse_row[i0 : i0 + c] = torch.logsumexp(logits, dim=1)
        # Columns merge per-chunk log-sum-exps: exact whatever the scale (no fixed shift).
        lse_col = torch.logaddexp(lse_col, torch.logsumexp(logits, dim=0))
    return lse_row, lse_col


def clip_grad_torch(x, y, scale, lse_row, lse_col, coef_row, coef_col, offset, pos_coef, chunk_size=None):
    acc = acc_dtype(x.dtype)
    n, N = x.shape[0], y.shape[0]
    c = chunk_rows(n, N, chunk_size)
    s = scale.detach().to(acc).reshape(())
    y_acc = y.detach().to(acc)  # (N, D)
    dx = torch.empty(x.shape, dtype=acc, device=x.device)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device)
    ds = torch.zeros((), dtype=acc, device=x.device)
    lo, hi = positive_rows(n, N, offset)
    for i0 in range(0, n, c):
        i1 = min(n, i0 + c)
        xc = x[i0:i1].detach().to(acc)  # (c, D)
        logits = (xc * s) @ y_acc.t()  # (c, N)
        use_row = lse_row is not None and coef_row != 0
        use_col = lse_col is not None and coef_col != 0
        # Work in place: at most two (c, N) buffers live (logits, grad).
        if use_row:
            grad = (logits - lse_row[i0:i1, None]).exp_().mul_(coef_row)
            if use_col:
                grad.add_(logits.sub_(lse_col[None, :]).exp_(), alpha=coef_col)
        elif use_col:
            grad = logits.sub_(lse_col[None, :]).exp_().mul_(coef_col)
        else:
            grad = torch.zeros_like(logits)
        del logits
        p0, p1 = max(i0, lo), min(i1, hi)
        if p1 > p0:
            rows = torch.arange(p0 - i0, p1 - i0, device=x.device)
            grad[rows, rows + i0 + offset] -= pos_coef
        gy = grad @ y_acc  # (c, D)
        # ds = sum_ij G_ij x_i.y_j = sum_i x_i.(G y)_i: O(c·D) instead of a pass over (c, N).
        ds += torch.vdot(xc.reshape(-1), gy.reshape(-1))
        dx[i0:i1] = gy.mul_(s)
        dy.addmm_(grad.t(), xc, alpha=s)
    return dx, dy, ds


# ----------------------------------------------------------------------------------------------------
# dispatch


def _block_impl(impl: str) -> str:
    # Block primitives run "triton" or "torch"; anything else ("auto" resolved by the caller,
    # "reference") has no block form and runs the chunked PyTorch code.
    return "triton" if impl == "triton" else "torch"


def _run_block(op, direct, *args):
    # Under torch.compile the block runs as a custom op (opaque, traced through its fake). In eager
    # mode it runs directly: same code, and tools that watch ATen ops (memory tests, profilers) see
    # inside it instead of one opaque call.
    if _checks._is_compiling():
        return op(*args)
    return direct(*args)


def clip_lse(x, y, scale, *, impl="torch", chunk_size=None):
    """Row and column log-sum-exp of the block ``s * x @ y.T``: ``(n,)`` and ``(N,)`` in fp32 (fp64 for fp64).

    Under ``torch.compile`` this is the custom op ``torch.ops.fastclip.clip_lse``. Inputs are detached.
    """
    args = (x.detach(), y.detach(), scale.detach(), _block_impl(impl), chunk_size)
    return _run_block(library.clip_lse_op, library.clip_lse_impl, *args)


def clip_grad(
    x, y, scale, lse_row, lse_col, coef_row, coef_col, offset, pos_coef, *, impl="torch", chunk_size=None
):
    """Gradients of a block, see the module docstring. Returns ``dx, dy`` (accumulation dtype) and ``ds`` (0-dim).

    Under ``torch.compile`` this is the custom op ``torch.ops.fastclip.clip_grad``. Inputs are detached.
    """
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
        _block_impl(impl),
        chunk_size,
    )
    return _run_block(library.clip_grad_op, library.clip_grad_impl, *args)


def nan_if_not_finite(loss: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Turn ``loss`` into NaN when any input holds NaN/Inf (no host sync; O(n·D) reads).

    The fused paths take maxima over tiles, and a maximum can step over a NaN; this makes the
    contract "non-finite features give a NaN loss, never a finite wrong number" hold for every impl.
    """
    ok = torch.ones((), dtype=torch.bool, device=loss.device)
    for t in tensors:
        ok = ok & torch.isfinite(t.detach()).all()
    return torch.where(ok, loss, torch.full_like(loss, float("nan")))


class ClipLossFunction(torch.autograd.Function):
    """Single-process CLIP loss; saves only x, y and the two (B,) log-sum-exp vectors."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, impl, chunk_size):
        n = x.shape[0]
        lse_row, lse_col = clip_lse(x, y, scale, impl=impl, chunk_size=chunk_size)
        pos = positive_logits(x, y, scale, 0)
        loss = (lse_row.sum() + lse_col.sum() - 2 * pos.sum()) / (2 * n)
        loss = nan_if_not_finite(loss, x, y)
        ctx.save_for_backward(x, y, scale, lse_row, lse_col)
        ctx.impl, ctx.chunk_size = impl, chunk_size
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, lse_row, lse_col = ctx.saved_tensors
        n = x.shape[0]
        need_x, need_y, need_s, need_b = ctx.needs_input_grad[:4]
        dx = dy = ds = db = None
        if need_x or need_y or need_s:
            coef = 1.0 / (2 * n)
            gx, gy, gs = clip_grad(
                x,
                y,
                scale,
                lse_row,
                lse_col,
                coef,
                coef,
                0,
                2 * coef,
                impl=ctx.impl,
                chunk_size=ctx.chunk_size,
            )
            g = grad_out.to(gx.dtype)
            # In place: gx, gy are fresh fp32 buffers; no third (n, D) fp32 temporary at the peak.
            dx = gx.mul_(g).to(x.dtype) if need_x else None
            del gx
            dy = gy.mul_(g).to(y.dtype) if need_y else None
            del gy
            ds = (gs * g).to(scale.dtype).reshape(scale.shape) if need_s else None
        if need_b:
            # The softmax loss is invariant to a shared bias: open_clip's gradient is exactly zero.
            db = torch.zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=x.device)
        return dx, dy, ds, db, None, None


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """CLIP softmax loss of one process's batch, without building the B×B logit matrix.

    Shapes: ``image_features (B, D)``, ``text_features (B, D)``, ``logit_scale`` 0-dim or 1-element
    (already exponentiated, as open_clip passes it), optional ``logit_bias`` likewise. Returns a 0-dim
    float32 tensor (float64 for float64 inputs). Equivalent to::

        logits = logit_scale * image_features @ text_features.T
        loss = (F.cross_entropy(logits, arange(B)) + F.cross_entropy(logits.T, arange(B))) / 2

    ``impl``: "auto" (Triton on CUDA, else "torch"), "triton", "torch" (chunked PyTorch, ``chunk_size``
    rows at a time) or "reference" (materialized). NaN/Inf in the features give a NaN loss; pass
    ``check_finite=True`` to raise a ``ValueError`` instead (costs one host sync).
    """
    _checks.check_features(image_features, text_features)
    logit_scale = _checks.check_scalar("logit_scale", logit_scale, device=image_features.device)
    if logit_bias is not None:
        logit_bias = _checks.check_scalar("logit_bias", logit_bias, device=image_features.device)
    impl = resolve_impl(_checks.check_impl(impl), image_features.device, dtype=image_features.dtype)
    chunk_size = _checks.check_chunk_size(chunk_size)
    if check_finite:
        _checks.check_all_finite("image_features", image_features)
        _checks.check_all_finite("text_features", text_features)
    if impl == "reference":
        return clip_loss_reference(image_features, text_features, logit_scale, logit_bias)
    return ClipLossFunction.apply(image_features, text_features, logit_scale, logit_bias, impl, chunk_size)
