"""CLIP (softmax) loss across processes: each rank computes only its own rows, never an n×N matrix.

Strategies: all-gather (``dist_impl="gather"``, memory O(N·D)) or ring exchange (``"ring"``, P2P,
memory O(n·D)). Each rank's loss and gradients equal open_clip's ``ClipLoss`` with the same
``local_loss``/``gather_with_grad`` flags, its scaling quirks included (docs/distributed.md).
Built on the collectives of ``fastclip.comm`` and the block primitives of ``fastclip.ops``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fastclip import _checks
from fastclip.comm import (
    all_gather_rows,
    all_reduce_logsumexp,
    all_reduce_sum,
    reduce_scatter_rows,
    ring_exchange,
)
from fastclip.distributed.world import (
    check_dist_impl,
    checked_on_every_rank,
    pair_fields,
    require_process_group,
)
from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.blocks import InputMeta, clip_grad, clip_lse, positive_logits
from fastclip.ops.dispatch import acc_dtype
from fastclip.ops.family_inputs import Common
from fastclip.ops.inputs import LossInputs, all_finite, loss_options, nan_if_not_finite, prepare_with_options
from fastclip.reference import clip_loss_distributed_reference

CLIP_DIST_IMPLS = ("gather", "ring")

# ----------------------------------------------------------------------------------------------------
# open_clip's four flag combinations, for rank r with incoming gradient g_r (1 for loss.backward()):
#   local_loss  gather_with_grad  loss on rank r                 d(features of rank r)              d(scale)
#   True        True              L_r (own rows, 1/(2n))         sum_q g_q dL_q/dx_r                 g_r dL_r/ds
#   True        False             L_r                            g_r dL_r/dx_r, own-row terms only   g_r dL_r/ds
#   False       False             L (global, 1/(2N))             g_r dL/dx_r                         g_r dL/ds
#   False       True              L                              (sum_q g_q) dL/dx_r  (W x for g=1)   g_r dL/ds
# Here L_r = rows of rank r in both directions; L = sum_r P_r with P_r the same rows at 1/(2N).


def _clip_mode(local_loss: bool, gather_with_grad: bool) -> str:
    if local_loss:
        return "local_grad" if gather_with_grad else "local_nograd"
    return "global_grad" if gather_with_grad else "global_nograd"


def _clip_grads_out(ctx, dx, dy, ds):
    """Backward return of the ClipLoss Functions: gradients in the inputs' dtypes, a zero bias
    gradient (the softmax loss ignores a shared bias), None for the non-tensor arguments."""
    return ctx.inputs.grads(ctx.needs_input_grad, dx, dy, ds, zero_bias=True, extra=4)


class _ClipGather(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, y, scale, bias, mode, group, impl, chunk_size):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n, d = x.shape
        acc = acc_dtype(x.dtype)
        xy_all = all_gather_rows(torch.cat([x.detach(), y.detach()], dim=1), group)  # (N, 2D), one collective
        x_all, y_all = xy_all[:, :d].contiguous(), xy_all[:, d:].contiguous()
        lse_img, _ = clip_lse(x, y_all, scale, impl=impl, chunk_size=chunk_size)  # image rows vs all texts
        lse_txt, _ = clip_lse(y, x_all, scale, impl=impl, chunk_size=chunk_size)  # text rows vs all images
        pos = positive_logits(x, y, scale, 0)
        rows = lse_img.sum() + lse_txt.sum() - 2 * pos.sum()
        local = mode.startswith("local")
        coef = 1.0 / (2 * n) if local else 1.0 / (2 * n * world)
        loss = rows * coef
        if not local:
            loss = all_reduce_sum(loss, group)
        loss = nan_if_not_finite(loss.to(acc), xy_all, scale, bias)
        ctx.save_for_backward(x, y, scale, x_all, y_all, lse_img, lse_txt)
        ctx.cfg = (mode, group, impl, chunk_size, coef, rank, world)
        ctx.inputs = InputMeta.of(x, y, scale, bias)
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        x, y, scale, x_all, y_all, lse_img, lse_txt = ctx.saved_tensors
        mode, group, impl, chunk_size, coef, rank, world = ctx.cfg
        n = x.shape[0]
        g = grad_out.to(lse_img.dtype)
        kw = dict(impl=impl, chunk_size=chunk_size)
        # Row-direction blocks only (no column log-sum-exp): image rows, then text rows, positives at rank * n.
        row_terms = dict(lse_col=None, coef_row=coef, coef_col=0.0, offset=rank * n, pos_coef=coef, **kw)
        gx, gy_all, gs1 = clip_grad(x, y_all, scale, lse_row=lse_img, **row_terms)
        gy, gx_all, gs2 = clip_grad(y, x_all, scale, lse_row=lse_txt, **row_terms)
        ds = gs1 + gs2
        if mode == "local_nograd":
            # open_clip gathers without grad and keeps no local slot: only the own-row terms reach x, y.
            dx, dy = gx * g, gy * g
        else:
            gx_all[rank * n : (rank + 1) * n] += gx
            gy_all[rank * n : (rank + 1) * n] += gy
            gxy_all = torch.cat([gx_all, gy_all], dim=1)  # (N, 2D): one reduce-scatter for both
            del gx_all, gy_all
            if mode == "local_grad":
                # Every rank's loss depends on every rank's features: weight by this rank's g, then
                # sum over ranks (the global modes apply their weight after the sum, below).
                gxy_all.mul_(g)
            dxy = reduce_scatter_rows(gxy_all, group)
            dx, dy = dxy[:, : x.shape[1]], dxy[:, x.shape[1] :]
            if mode.startswith("global"):
                # ds of the global loss: sum the per-rank partials; the feature gradient is g_r times
                # dL/dx_r (no grad through the gather) or (sum_q g_q) times it (grad through the gather).
                red = all_reduce_sum(torch.stack([ds, g]), group)
                ds = red[0]
                mult = g if mode == "global_nograd" else red[1]
                dx, dy = dx * mult, dy * mult
        ds = ds * g
        return _clip_grads_out(ctx, dx, dy, ds)


class _ClipGatherGlobal(torch.autograd.Function):
    """local_loss=False by all-gather: one n×N block per rank (image rows of this rank against all
    texts). Its columns' log-sum-exp partials are merged over ranks (two all-reduces of N floats),
    which gives the text→image rows too, so only the texts are gathered and only dY is reduce-scattered.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, y, scale, bias, mode, group, impl, chunk_size):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x.shape[0]
        y_all = all_gather_rows(y, group)  # (N, D)
        lse_img, lse_col = clip_lse(x, y_all, scale, impl=impl, chunk_size=chunk_size)
        lse_col = all_reduce_logsumexp(lse_col, group)  # (N,) log-sum-exp of every column of L
        pos = positive_logits(x, y, scale, 0)
        coef = 1.0 / (2 * n * world)
        own_cols = lse_col[rank * n : (rank + 1) * n]
        loss = all_reduce_sum((lse_img.sum() + own_cols.sum() - 2 * pos.sum()) * coef, group)
        loss = nan_if_not_finite(loss, x, y_all, scale, bias)
        ctx.save_for_backward(x, y, scale, y_all, lse_img, lse_col)
        ctx.cfg = (mode, group, impl, chunk_size, coef, rank)
        ctx.inputs = InputMeta.of(x, y, scale, bias)
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        x, y, scale, y_all, lse_img, lse_col = ctx.saved_tensors
        mode, group, impl, chunk_size, coef, rank = ctx.cfg
        n = x.shape[0]
        g = grad_out.to(lse_img.dtype)
        # x_r appears only in this rank's rows of L, so gx is complete; every rank's rows touch y_r.
        gx, gy_all, gs = clip_grad(
            x, y_all, scale, lse_row=lse_img, lse_col=lse_col, coef_row=coef, coef_col=coef, offset=rank * n,
            pos_coef=2 * coef, impl=impl, chunk_size=chunk_size,
        )  # fmt: skip
        gy = reduce_scatter_rows(gy_all, group)
        red = all_reduce_sum(torch.stack([gs, g]), group)
        # g_r times dL/d(features) without grad through the gather, (sum_q g_q) times it with it.
        mult = g if mode == "global_nograd" else red[1]
        ds = red[0] * g
        return _clip_grads_out(ctx, gx * mult, gy * mult, ds)


class _ClipRing(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, x, y, scale, bias, mode, group, impl, chunk_size):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x.shape[0]
        acc = acc_dtype(x.dtype)
        x_d, y_d = x.detach(), y.detach()
        state = {"lse_img": None, "ok": all_finite(x_d, y_d, scale, bias)}

        def compute(owner, payload):
            (yq,) = payload
            if owner != rank:
                state["ok"] = state["ok"] & all_finite(yq)
            # One block per stage: its rows extend this rank's image log-sum-exp, its columns are
            # the text rows of the chunk's owner (their log-sum-exp travels with the chunk).
            row, col = clip_lse(x_d, yq, scale, impl=impl, chunk_size=chunk_size)
            li = state["lse_img"]
            state["lse_img"] = row if li is None else torch.logaddexp(li, row, out=li)
            return col

        own, arrived = ring_exchange(
            [y_d], compute, group=group, hops_right=world - 1, merge=lambda a, p: torch.logaddexp(a, p, out=a)
        )
        lse_txt = own
        for a in arrived:
            lse_txt = torch.logaddexp(lse_txt, a)
        lse_img = state["lse_img"]
        pos = positive_logits(x_d, y_d, scale, 0)
        local = mode.startswith("local")
        coef = 1.0 / (2 * n) if local else 1.0 / (2 * n * world)
        loss = (lse_img.sum() + lse_txt.sum() - 2 * pos.sum()) * coef
        if not local:
            loss = all_reduce_sum(loss, group)
        loss = torch.where(state["ok"], loss, torch.full_like(loss, float("nan"))).to(acc)
        ctx.save_for_backward(x, y, scale, lse_img, lse_txt)
        ctx.cfg = (mode, group, impl, chunk_size, coef, rank, world)
        ctx.inputs = InputMeta.of(x, y, scale, bias)
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        x, y, scale, lse_img, lse_txt = ctx.saved_tensors
        mode, group, impl, chunk_size, coef, rank, world = ctx.cfg
        n, d = x.shape
        accd = lse_img.dtype
        g = grad_out.to(accd).reshape(())
        kw = dict(impl=impl, chunk_size=chunk_size)
        local = mode.startswith("local")
        x_d, y_d = x.detach(), y.detach()
        # The payload carries what a visited rank needs to form the block's gradient: the chunk, its
        # text-row log-sum-exp, and (local modes) its owner's incoming gradient g_q.
        aux = torch.cat([lse_txt, g.reshape(1)])
        state = {
            "dx": torch.zeros((n, d), dtype=accd, device=x.device),
            "ds": torch.zeros((), dtype=accd, device=x.device),
        }

        def compute(owner, payload):
            yq, auxq = payload
            lse_q, g_q = auxq[:n], auxq[n]
            offset = 0 if owner == rank else None
            if local:
                # Split the block into its two owners' terms: the rows belong to L_r (weight g_r),
                # the columns are text rows of L_q (weight g_q); ds of each goes to its owner.
                gx1, gy1, gs1 = clip_grad(
                    x_d, yq, scale, lse_row=lse_img, lse_col=None, coef_row=coef, coef_col=0.0, offset=offset,
                    pos_coef=coef, **kw,
                )  # fmt: skip
                gx2, gy2, gs2 = clip_grad(
                    x_d, yq, scale, lse_row=None, lse_col=lse_q, coef_row=0.0, coef_col=coef, offset=offset,
                    pos_coef=coef, **kw,
                )  # fmt: skip
                state["ds"] += gs1 * g
                if mode == "local_nograd":
                    # open_clip: no grad through the gathered features, so x only gets its own rows'
                    # terms and y only its own text rows' terms.
                    state["dx"] += gx1 * g
                    dyq = gy2 * g_q
                else:
                    state["dx"] += gx1 * g + gx2 * g_q
                    dyq = gy1 * g + gy2 * g_q
                part = torch.cat([dyq.reshape(-1), (gs2 * g_q).reshape(1)])
            else:
                gx, gy, gs = clip_grad(
                    x_d, yq, scale, lse_row=lse_img, lse_col=lse_q, coef_row=coef, coef_col=coef, offset=offset,
                    pos_coef=2 * coef, **kw,
                )  # fmt: skip
                state["dx"] += gx
                state["ds"] += gs
                part = gy.reshape(-1)
            return part

        own, arrived = ring_exchange([y_d, aux], compute, group=group, hops_right=world - 1)
        total = own
        for a in arrived:
            total = total + a
        dx = state["dx"]
        dy = total[: n * d].reshape(n, d)
        if local:
            ds = state["ds"] + total[n * d]
        else:
            red = all_reduce_sum(torch.stack([state["ds"], g]), group)
            ds = red[0] * g
            mult = g if mode == "global_nograd" else red[1]
            dx, dy = dx * mult, dy * mult
        return _clip_grads_out(ctx, dx, dy, ds)


def clip_loss_distributed_fused(
    inputs: LossInputs, *, local_loss: bool, gather_with_grad: bool, dist_impl: str, group
) -> torch.Tensor:
    """The fused distributed loss of checked inputs (``fastclip.ops.inputs.prepare``), autocast off."""
    a = inputs
    mode = _clip_mode(local_loss, gather_with_grad)
    if dist_impl == "ring":
        fn = _ClipRing
    else:
        fn = _ClipGather if local_loss else _ClipGatherGlobal
    with no_autocast(a.x.device):
        return fn.apply(a.x, a.y, a.scale, a.bias, mode, group, a.impl, a.chunk_size)


def clip_loss_distributed(
    image_features,
    text_features,
    logit_scale,
    logit_bias=None,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    dist_impl: str = "gather",
    group=None,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
    check_batch_sizes: bool = True,
):
    """open_clip ``ClipLoss(local_loss, gather_with_grad, rank, world_size)`` over ``group`` (default:
    WORLD), without any n×N matrix: this rank's loss, with open_clip's gradients for this rank.

    Shapes: local ``image_features (n, D)``, ``text_features (n, D)`` (same n, D and dtype on every
    rank), ``logit_scale`` 0-dim or 1-element (exponentiated), optional ``logit_bias``. Equivalent to
    ``fastclip.reference.clip_loss_distributed_reference`` (which gathers and materializes).
    """
    _checks.check_bool("local_loss", local_loss)
    _checks.check_bool("gather_with_grad", gather_with_grad)
    _checks.check_bool("check_batch_sizes", check_batch_sizes)
    check_dist_impl(dist_impl, CLIP_DIST_IMPLS)
    options = loss_options(impl=impl, chunk_size=chunk_size, check_finite=check_finite, allow_reference=False)
    require_process_group("group", "a distributed loss")
    return clip_loss_distributed_with_options(
        image_features, text_features, logit_scale, logit_bias, options=options, local_loss=local_loss,
        gather_with_grad=gather_with_grad, dist_impl=dist_impl, group=group, check_batch_sizes=check_batch_sizes,
    )  # fmt: skip


def clip_loss_distributed_with_options(
    image_features, text_features, logit_scale, logit_bias=None, *, options: Common, local_loss: bool,
    gather_with_grad: bool, dist_impl: str, group, check_batch_sizes: bool,
) -> torch.Tensor:  # fmt: skip
    """:func:`clip_loss_distributed` of arguments checked at the boundary (the functional form above,
    or ``fastclip.ClipLoss`` at construction): no re-validation. ``impl="reference"`` runs the
    materialized distributed loss (``fastclip.reference``)."""

    def build():
        a = prepare_with_options(image_features, text_features, logit_scale, logit_bias, options)
        flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad)
        return a, pair_fields(a, dist_impl, CLIP_DIST_IMPLS, **flags)

    a = checked_on_every_rank(
        "clip_loss_distributed", build, anchor=image_features, group=group, check=check_batch_sizes
    )
    flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, group=group)
    if a.impl == "reference":
        with no_autocast(a.x.device):
            loss = clip_loss_distributed_reference(a.x, a.y, a.scale, a.bias, **flags)
            return nan_if_not_finite(loss, a.x, a.y, a.scale, a.bias)
    return clip_loss_distributed_fused(a, dist_impl=dist_impl, **flags)
