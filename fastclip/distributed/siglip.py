"""SigLIP (sigmoid) loss across processes, with open_clip's semantics for every ``dist_impl``.

open_clip, rank r: ``L_r = 1/n [block(x_r, y_r, positives) + sum_{q != r} block(x_r, y_q, negatives only)]``;
the exchanges carry gradients back, so rank q's text gradient is ``sum_r g_r dL_r/dy_q``, while image
features, scale and bias get ``g_r dL_r/d(.)``. "gather"/"reduce" all-gather the texts (memory
O(N·D)); "bidir"/"shift" pass them around the ring by P2P (memory O(n·D)).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastclip import _checks
from fastclip.comm import all_gather_rows, reduce_scatter_rows, ring_exchange, stream_hops
from fastclip.distributed.world import (
    check_dist_impl,
    checked_on_every_rank,
    pair_fields,
    require_process_group,
)
from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.blocks import InputMeta, siglip_block
from fastclip.ops.dispatch import acc_dtype
from fastclip.ops.family_inputs import Common
from fastclip.ops.inputs import LossInputs, all_finite, loss_options, nan_if_not_finite, prepare_with_options
from fastclip.reference import siglip_loss_distributed_reference

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

# ----------------------------------------------------------------------------------------------------
# open_clip, rank r: L_r = 1/n [block(x_r, y_r, positives) + sum_{q != r} block(x_r, y_q, negatives only)]
# for every dist_impl; the exchanges carry gradients back, so rank q's text gradient is
# sum_r g_r dL_r/dy_q, while image features, scale and bias get g_r dL_r/d(.) (local).


class _SigLipGather(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, y, scale, bias, group, impl, chunk_size):
        rank = dist.get_rank(group)
        n = x.shape[0]
        y_all = all_gather_rows(y, group)  # (N, D)
        need_grad = any(ctx.needs_input_grad[:4])
        total, gx, gy_all, gs, gb = siglip_block(
            x, y_all, scale, bias, offset=rank * n, need_grad=need_grad, impl=impl, chunk_size=chunk_size
        )
        loss = nan_if_not_finite(total / n, x, y_all, scale, bias)
        if need_grad:
            # Divided in place (fresh tensors); the local image gradient in the features' dtype as in
            # the single-process Function, the gathered text gradient in fp32 for its reduce-scatter.
            ctx.save_for_backward(gx.div_(n).to(x.dtype), gy_all.div_(n), gs / n, gb / n)
        ctx.group, ctx.inputs = group, InputMeta.of(x, y, scale, bias)
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        gx, gy_all, gs, gb = ctx.saved_tensors
        g = grad_out.to(gs.dtype)  # the accumulation dtype (fp32; fp64 for fp64 inputs)
        dy = reduce_scatter_rows(gy_all * g, ctx.group)
        return ctx.inputs.grads(ctx.needs_input_grad, gx * g, dy, gs * g, gb * g, extra=3)


class _SigLipRing(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, y, scale, bias, dist_impl, group, impl, chunk_size):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x.shape[0]
        x_d, y_d = x.detach(), y.detach()
        hr, hl = stream_hops(dist_impl, world)
        state = {
            "total": torch.zeros((), dtype=acc_dtype(x.dtype), device=x.device),
            "ok": all_finite(x_d, y_d, scale, bias),
        }

        def compute(owner, payload):
            (yq,) = payload
            if owner != rank:
                state["ok"] = state["ok"] & all_finite(yq)
            offset = 0 if owner == rank else None
            total, *_ = siglip_block(
                x_d, yq, scale, bias, offset=offset, need_grad=False, impl=impl, chunk_size=chunk_size
            )
            state["total"] = state["total"] + total
            return None

        ring_exchange([y_d], compute, group=group, hops_right=hr, hops_left=hl)
        loss = state["total"] / n
        loss = torch.where(state["ok"], loss, torch.full_like(loss, float("nan")))
        ctx.save_for_backward(x, y, scale, *(() if bias is None else (bias,)))
        ctx.cfg = (dist_impl, group, impl, chunk_size, rank, world, bias is not None)
        ctx.inputs = InputMeta.of(x, y, scale, bias)
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        dist_impl, group, impl, chunk_size, rank, world, has_bias = ctx.cfg
        x, y, scale, *rest = ctx.saved_tensors
        bias = rest[0] if has_bias else None
        n, d = x.shape
        accd = acc_dtype(x.dtype)
        g = grad_out.to(accd).reshape(()) / n
        hr, hl = stream_hops(dist_impl, world)
        x_d, y_d = x.detach(), y.detach()
        zero = torch.zeros((), dtype=accd, device=x.device)
        state = {"dx": torch.zeros((n, d), dtype=accd, device=x.device), "ds": zero, "db": zero}

        def compute(owner, payload):
            # Recompute the block with gradients; the text gradient is weighted by this rank's g and
            # travels with the chunk back to its owner (open_clip sends it back through the exchanges).
            (yq,) = payload
            offset = 0 if owner == rank else None
            _, gx, gy, gs, gb = siglip_block(
                x_d, yq, scale, bias, offset=offset, need_grad=True, impl=impl, chunk_size=chunk_size
            )
            state["dx"] = state["dx"] + gx * g
            state["ds"] = state["ds"] + gs * g
            state["db"] = state["db"] + gb * g
            return gy * g

        own, arrived = ring_exchange([y_d], compute, group=group, hops_right=hr, hops_left=hl)
        dy = own
        for a in arrived:
            dy = dy + a
        return ctx.inputs.grads(ctx.needs_input_grad, state["dx"], dy, state["ds"], state["db"], extra=4)


def siglip_loss_distributed_fused(inputs: LossInputs, *, dist_impl: str, group) -> torch.Tensor:
    """The fused distributed loss of checked inputs (``fastclip.ops.inputs.prepare``), autocast off."""
    a = inputs
    with no_autocast(a.x.device):
        if dist_impl in ("gather", "reduce"):
            return _SigLipGather.apply(a.x, a.y, a.scale, a.bias, group, a.impl, a.chunk_size)
        return _SigLipRing.apply(a.x, a.y, a.scale, a.bias, dist_impl, group, a.impl, a.chunk_size)


def siglip_loss_distributed(
    image_features,
    text_features,
    logit_scale,
    logit_bias=None,
    *,
    dist_impl: str = "bidir",
    group=None,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
    check_batch_sizes: bool = True,
):
    """open_clip ``SigLipLoss(rank, world_size, dist_impl)`` over ``group``: this rank's loss with
    open_clip's gradients. "gather" and "reduce" share the all-gather code (same numbers as open_clip's
    per-rank all-reduce loop at 1/W of its traffic); "bidir" and "shift" pass text chunks around the
    ring (both directions, or to the right only). Shapes as ``clip_loss_distributed``;
    ``logit_bias=None`` computes without a bias."""
    _checks.check_bool("check_batch_sizes", check_batch_sizes)
    check_dist_impl(dist_impl, SIGLIP_DIST_IMPLS)
    options = loss_options(impl=impl, chunk_size=chunk_size, check_finite=check_finite, allow_reference=False)
    require_process_group("group", "a distributed loss")
    return siglip_loss_distributed_with_options(
        image_features, text_features, logit_scale, logit_bias, options=options, dist_impl=dist_impl,
        group=group, check_batch_sizes=check_batch_sizes,
    )  # fmt: skip


def siglip_loss_distributed_with_options(
    image_features, text_features, logit_scale, logit_bias=None, *, options: Common, dist_impl: str, group,
    check_batch_sizes: bool,
) -> torch.Tensor:  # fmt: skip
    """:func:`siglip_loss_distributed` of arguments checked at the boundary (the functional form above,
    or ``fastclip.SigLipLoss`` at construction): no re-validation. ``impl="reference"`` runs the
    materialized distributed loss (``fastclip.reference``)."""

    def build():
        a = prepare_with_options(image_features, text_features, logit_scale, logit_bias, options)
        return a, pair_fields(a, dist_impl, SIGLIP_DIST_IMPLS)

    a = checked_on_every_rank(
        "siglip_loss_distributed", build, anchor=image_features, group=group, check=check_batch_sizes
    )
    if a.impl == "reference":
        with no_autocast(a.x.device):
            loss = siglip_loss_distributed_reference(a.x, a.y, a.scale, a.bias, group=group)
            return nan_if_not_finite(loss, a.x, a.y, a.scale, a.bias)
    return siglip_loss_distributed_fused(a, dist_impl=dist_impl, group=group)
