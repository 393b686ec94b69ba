"""Collectives with correct autograd, a P2P ring engine, and the distributed CLIP/SigLIP losses.

Two halves:

* **Collectives** (``all_gather_rows``, ``reduce_scatter_rows``, ``all_reduce_sum``, ``AllGather``,
  ``ring_exchange``): thin wrappers over ``torch.distributed`` that pick the torch 2.13 names
  (``all_gather_single``, ``reduce_scatter_single``) or the older ones (``all_gather_into_tensor``,
  ``reduce_scatter_tensor``, torch 2.11) by feature detection, take any process group, and count the
  bytes they move (:func:`comm_stats`).
* **Distributed losses** (``clip_loss_distributed``, ``siglip_loss_distributed``): autograd Functions
  that compose the block primitives of :mod:`fastclip.ops` with the collectives. Each rank computes
  only its own rows and never holds an n×N logit matrix; each rank's loss value and gradients equal
  open_clip's ``ClipLoss``/``SigLipLoss`` with the same flags (see ``docs/distributed.md``).

Notation: W ranks in the group, local batch n, global batch N = W·n, feature dim D, rank r; the
gathered feature matrices stack ranks in group-rank order, so rank r's rows are ``[r·n, (r+1)·n)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from fastclip.ops.clip import clip_grad, clip_lse, nan_if_not_finite, positive_logits
from fastclip.ops.dispatch import acc_dtype
from fastclip.ops.siglip import siglip_block

# ----------------------------------------------------------------------------------------------------
# feature detection (torch 2.13 renamed the tensor collectives; torch 2.11 has only the old names)

_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _p2p_op(op, tensor: torch.Tensor, peer: int, group, tag: int = 0) -> dist.P2POp:
    """A P2POp addressed by *group* rank (``group_peer`` where torch has it, else the global rank).

    Tags keep the streams of the ring apart on gloo (NCCL ignores them and matches in issue order,
    which every rank keeps identical).
    """
    try:
        return dist.P2POp(op, tensor, group=group, tag=tag, group_peer=peer)
    except TypeError:  # older torch: peer is a global rank
        global_peer = peer if group is None else dist.get_global_rank(group, peer)
        return dist.P2POp(op, tensor, global_peer, group=group, tag=tag)


# ----------------------------------------------------------------------------------------------------
# byte counting


@dataclass
class CommStats:
    """Bytes this rank sent and received, by collective. Filled while :func:`comm_stats` is active.

    Collectives count the traffic of the bandwidth-optimal ring algorithm per rank (all-gather and
    reduce-scatter of a ``W·m``-byte buffer: ``(W-1)·m`` bytes each way; all-reduce of ``m`` bytes:
    ``2·(W-1)/W·m`` each way); point-to-point messages count exactly what was sent and received.
    """

    sent: dict = field(default_factory=dict)
    received: dict = field(default_factory=dict)

    def add(self, kind: str, sent: int, received: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(sent)
        self.received[kind] = self.received.get(kind, 0) + int(received)

    @property
    def total_sent(self) -> int:
        return sum(self.sent.values())

    @property
    def total_received(self) -> int:
        return sum(self.received.values())


_STATS: list[CommStats] = []


@contextlib.contextmanager
def comm_stats():
    """``with comm_stats() as stats: ...`` counts the bytes the fastclip collectives move on this rank."""
    stats = CommStats()
    _STATS.append(stats)
    try:
        yield stats
    finally:
        _STATS.remove(stats)


def _count(kind: str, sent: int, received: int) -> None:
    for stats in _STATS:
        stats.add(kind, sent, received)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------------
# group helpers and collectives


def group_rank_and_size(group=None) -> tuple[int, int]:
    """(rank, world size) of this process in ``group`` (the default group when None)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group(...) before "
            "using a loss with world_size > 1 or a process group"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def all_gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """``(n, ...)`` on each rank -> ``(W·n, ...)`` stacked in group-rank order. No autograd."""
    world = dist.get_world_size(group)
    t = t.detach().contiguous()
    out = torch.empty((world * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    _ALL_GATHER(out, t, group=group)
    _count("all_gather", (world - 1) * _nbytes(t), (world - 1) * _nbytes(t))
    return out


def reduce_scatter_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """``(W·n, ...)`` on each rank -> this rank's ``(n, ...)`` block of the sum over ranks. No autograd."""
    world = dist.get_world_size(group)
    if t.shape[0] % world:
        raise ValueError(
            f"reduce_scatter_rows: expected a first dim divisible by {world}, got {tuple(t.shape)}"
        )
    t = t.detach().contiguous()
    out = torch.empty((t.shape[0] // world, *t.shape[1:]), dtype=t.dtype, device=t.device)
    _REDUCE_SCATTER(out, t, op=dist.ReduceOp.SUM, group=group)
    _count("reduce_scatter", (world - 1) * _nbytes(out), (world - 1) * _nbytes(out))
    return out


def all_reduce_sum(t: torch.Tensor, group=None, op=None) -> torch.Tensor:
    """Sum (or ``op``) over ranks (a new tensor). No autograd."""
    world = dist.get_world_size(group)
    out = t.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM if op is None else op, group=group)
    moved = 2 * (world - 1) * _nbytes(out) // world
    _count("all_reduce", moved, moved)
    return out


def all_reduce_logsumexp(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise log-sum-exp over ranks of log-sum-exp partials: a max, then a sum of exp(t - max)."""
    m = all_reduce_sum(t, group, op=dist.ReduceOp.MAX)
    # -inf partials everywhere (an empty column) stay -inf instead of turning into NaN.
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m_safe + torch.log(all_reduce_sum(torch.exp(t - m_safe), group))


class AllGather(torch.autograd.Function):
    """All-gather along dim 0 whose backward is a reduce-scatter (sum over ranks of the gradients)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        return all_gather_rows(t, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(grad, ctx.group), None


def all_gather_with_grad(t: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather: ``(n, ...)`` -> ``(W·n, ...)``; rank r's gradient is the sum over
    ranks of the gradients of its block (what ``torch.distributed.nn.all_gather`` gives)."""
    return AllGather.apply(t, group)


def check_batch_sizes(features: torch.Tensor, group=None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold the same ``(n, D)`` features.

    Costs one all-gather of two int64 per rank and a host sync. Without it, unequal batches make the
    later collectives hang (P2P) or fail with an opaque error (gather).
    """
    world = dist.get_world_size(group)
    mine = torch.tensor(list(features.shape), dtype=torch.int64, device=features.device)
    sizes = torch.empty((world, 2), dtype=torch.int64, device=features.device)
    _ALL_GATHER(sizes, mine.reshape(1, 2), group=group)
    _count("check_batch_sizes", (world - 1) * 16, (world - 1) * 16)
    sizes = [tuple(s) for s in sizes.tolist()]
    if len(set(sizes)) != 1:
        raise ValueError(
            "image_features: expected the same local (batch, dim) on every rank of the group "
            f"(fastclip's distributed losses, like open_clip's, need equal local batches); got {sizes} "
            "by group rank. Drop the last incomplete batch (drop_last=True) or pad it."
        )


_check_batch_sizes = check_batch_sizes  # the functional forms' keyword of the same name shadows it


# ----------------------------------------------------------------------------------------------------
# ring engine


def _start(ops: list) -> list:
    if not ops:
        return []
    for op in ops:
        nbytes = _nbytes(op.tensor)
        is_send = op.op is dist.isend
        _count("p2p", nbytes if is_send else 0, 0 if is_send else nbytes)
    return dist.batch_isend_irecv(ops)


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _add_(acc: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    return acc.add_(part)


def ring_exchange(
    payload: list,
    compute: Callable,
    *,
    group=None,
    hops_right: int,
    hops_left: int = 0,
    merge: Callable = _add_,
):
    """Visit every rank's ``payload`` by P2P, overlapping the next transfer with the current compute.

    Two streams: payloads travel ``hops_right`` steps to the right (rank r receives from r-1, r-2, ...)
    and ``hops_left`` steps to the left; ``hops_right + hops_left == W - 1`` visits every payload once.
    At each stage a rank calls ``compute(owner, payload_of_owner)`` -> this stage's part of the
    owner's accumulator (a tensor; None when there is no accumulator). Stage 0 runs on the rank's own
    payload. Parts for other ranks' payloads are merged in place into the accumulator that travels
    with the payload (``merge(acc, part)``: a sum by default, a logaddexp for log-sum-exps), sent on
    after the compute (the next payload is already in flight meanwhile), and sent straight back to
    the owner after the last hop.

    Returns ``(own_part, arrived)``: stage 0's part and the accumulators that came home (one per
    non-empty stream). Memory: two payload buffers and two accumulator buffers per stream, allocated
    once whatever W, plus what ``compute`` allocates.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if hops_right + hops_left != world - 1 or hops_right < 0 or hops_left < 0:
        raise ValueError(
            f"ring_exchange: expected hops_right + hops_left == {world - 1}, got {hops_right} + {hops_left}"
        )
    streams = [(d, k) for d, k in ((+1, hops_right), (-1, hops_left)) if k > 0]
    tag = {+1: 0, -1: 1}  # payload tensor j uses tag + 4j, accumulators tag + 2
    payload = [t.contiguous() for t in payload]
    # Double buffers, allocated once: stage s receives into buffer s % 2 while computing on the other.
    pbuf = {d: [[torch.empty_like(t) for t in payload] for _ in range(2)] for d, _ in streams}
    abuf = {d: None for d, _ in streams}
    current = {d: payload for d, _ in streams}
    incoming = {d: None for d, _ in streams}
    arrived, own_part = [], None
    for stage in range(max([0] + [k for _, k in streams]) + 1):
        # 1) payloads of the next stage: in flight while this stage computes.
        ops, nxt = [], {}
        for d, k in streams:
            if stage + 1 <= k:
                nxt[d] = pbuf[d][stage % 2]
                for j, t in enumerate(current[d]):
                    ops.append(_p2p_op(dist.isend, t, (rank + d) % world, group, tag[d] + 4 * j))
                for j, t in enumerate(nxt[d]):
                    ops.append(_p2p_op(dist.irecv, t, (rank - d) % world, group, tag[d] + 4 * j))
        feature_works = _start(ops)
        # 2) compute this stage.
        outgoing = {}
        if stage == 0:
            own_part = compute(rank, payload)
        else:
            for d, k in streams:
                if stage <= k:
                    part = compute((rank - d * stage) % world, current[d])
                    if part is not None:
                        part = part.contiguous()
                        outgoing[d] = part if incoming[d] is None else merge(incoming[d], part)
        # 3) accumulators: onward with their payload, or home to the owner after the last hop.
        ops, recv = [], {}
        for d, k in streams:
            if d not in outgoing:
                continue
            acc = outgoing[d]
            if abuf[d] is None:
                abuf[d] = [torch.empty_like(acc), torch.empty_like(acc)]
            recv[d] = abuf[d][1] if acc is abuf[d][0] else abuf[d][0]
            if stage < k:
                peer_to, peer_from = (rank + d) % world, (rank - d) % world
            else:
                peer_to, peer_from = (rank - d * stage) % world, (rank + d * stage) % world
            ops.append(_p2p_op(dist.isend, acc, peer_to, group, tag[d] + 2))
            ops.append(_p2p_op(dist.irecv, recv[d], peer_from, group, tag[d] + 2))
        acc_works = _start(ops)
        _wait(feature_works)
        _wait(acc_works)
        del ops, feature_works, acc_works, outgoing  # sends done: release their buffers now
        for d, k in streams:
            if d in recv:
                if stage < k:
                    incoming[d] = recv[d]
                else:
                    arrived.append(recv[d])
            if d in nxt:
                current[d] = nxt[d]
    return own_part, arrived


def _stream_hops(dist_impl: str, world: int) -> tuple[int, int]:
    if dist_impl == "bidir":
        left = (world - 1) // 2
        return world - 1 - left, left
    return world - 1, 0


# ----------------------------------------------------------------------------------------------------
# CLIP (softmax) loss
#
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


def _finite_flag(*tensors) -> torch.Tensor:
    ok = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok = ok & torch.isfinite(t).all()
    return ok


def _clip_grads_out(ctx, x, y, scale, dx, dy, ds):
    """Backward return of the ClipLoss Functions: gradients in the inputs' dtypes, a zero bias
    gradient (the softmax loss ignores a shared bias), None for the non-tensor arguments."""
    need = ctx.needs_input_grad
    db = None
    if need[3]:
        db = torch.zeros(ctx.bias_meta[0], dtype=ctx.bias_meta[1], device=x.device)
    return (
        dx.to(x.dtype) if need[0] else None,
        dy.to(y.dtype) if need[1] else None,
        ds.to(scale.dtype).reshape(scale.shape) if need[2] else None,
        db,
        None,
        None,
        None,
        None,
    )


class _ClipGather(torch.autograd.Function):
    @staticmethod
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
        loss = nan_if_not_finite(loss.to(acc), xy_all)
        ctx.save_for_backward(x, y, scale, x_all, y_all, lse_img, lse_txt)
        ctx.cfg = (mode, group, impl, chunk_size, coef, rank, world)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, x_all, y_all, lse_img, lse_txt = ctx.saved_tensors
        mode, group, impl, chunk_size, coef, rank, world = ctx.cfg
        n = x.shape[0]
        g = grad_out.to(lse_img.dtype)
        kw = dict(impl=impl, chunk_size=chunk_size)
        gx, gy_all, gs1 = clip_grad(x, y_all, scale, lse_img, None, coef, 0.0, rank * n, coef, **kw)
        gy, gx_all, gs2 = clip_grad(y, x_all, scale, lse_txt, None, coef, 0.0, rank * n, coef, **kw)
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
        return _clip_grads_out(ctx, x, y, scale, dx, dy, ds)


class _ClipGatherGlobal(torch.autograd.Function):
    """local_loss=False by all-gather: one n×N block per rank (image rows of this rank against all
    texts). Its columns' log-sum-exp partials are merged over ranks (two all-reduces of N floats),
    which gives the text→image rows too, so only the texts are gathered and only dY is reduce-scattered.
    """

    @staticmethod
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
        loss = nan_if_not_finite(loss, x, y_all)
        ctx.save_for_backward(x, y, scale, y_all, lse_img, lse_col)
        ctx.cfg = (mode, group, impl, chunk_size, coef, rank)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, y_all, lse_img, lse_col = ctx.saved_tensors
        mode, group, impl, chunk_size, coef, rank = ctx.cfg
        n = x.shape[0]
        g = grad_out.to(lse_img.dtype)
        # x_r appears only in this rank's rows of L, so gx is complete; every rank's rows touch y_r.
        gx, gy_all, gs = clip_grad(
            x,
            y_all,
            scale,
            lse_img,
            lse_col,
            coef,
            coef,
            rank * n,
            2 * coef,
            impl=impl,
            chunk_size=chunk_size,
        )
        gy = reduce_scatter_rows(gy_all, group)
        red = all_reduce_sum(torch.stack([gs, g]), group)
        # g_r times dL/d(features) without grad through the gather, (sum_q g_q) times it with it.
        mult = g if mode == "global_nograd" else red[1]
        ds = red[0] * g
        return _clip_grads_out(ctx, x, y, scale, gx * mult, gy * mult, ds)


class _ClipRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, mode, group, impl, chunk_size):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x.shape[0]
        acc = acc_dtype(x.dtype)
        x_d, y_d = x.detach(), y.detach()
        state = {"lse_img": None, "ok": _finite_flag(x_d, y_d)}

        def compute(owner, payload):
            (yq,) = payload
            if owner != rank:
                state["ok"] = state["ok"] & torch.isfinite(yq).all()
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
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        return loss

    @staticmethod
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
                gx1, gy1, gs1 = clip_grad(x_d, yq, scale, lse_img, None, coef, 0.0, offset, coef, **kw)
                gx2, gy2, gs2 = clip_grad(x_d, yq, scale, None, lse_q, 0.0, coef, offset, coef, **kw)
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
                gx, gy, gs = clip_grad(x_d, yq, scale, lse_img, lse_q, coef, coef, offset, 2 * coef, **kw)
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
        return _clip_grads_out(ctx, x, y, scale, dx, dy, ds)


# ----------------------------------------------------------------------------------------------------
# SigLIP (sigmoid) loss
#
# open_clip, rank r: L_r = 1/n [block(x_r, y_r, positives) + sum_{q != r} block(x_r, y_q, negatives only)]
# for every dist_impl; the exchanges carry gradients back, so rank q's text gradient is
# sum_r g_r dL_r/dy_q, while image features, scale and bias get g_r dL_r/d(.) (local).


class _SigLipGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, group, impl, chunk_size):
        rank = dist.get_rank(group)
        n = x.shape[0]
        y_all = all_gather_rows(y, group)  # (N, D)
        need_grad = any(ctx.needs_input_grad[:4])
        total, gx, gy_all, gs, gb = siglip_block(
            x, y_all, scale, bias, rank * n, need_grad, impl=impl, chunk_size=chunk_size
        )
        loss = nan_if_not_finite(total / n, x, y_all)
        if need_grad:
            ctx.save_for_backward(gx / n, gy_all / n, gs / n, gb / n)
        ctx.meta = (
            group,
            x.dtype,
            scale.dtype,
            scale.shape,
            None if bias is None else (bias.dtype, bias.shape),
        )
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        gx, gy_all, gs, gb = ctx.saved_tensors
        group, dtype, s_dtype, s_shape, b_meta = ctx.meta
        g = grad_out.to(gx.dtype)
        dy = reduce_scatter_rows(gy_all * g, group)
        need = ctx.needs_input_grad
        return (
            (gx * g).to(dtype) if need[0] else None,
            dy.to(dtype) if need[1] else None,
            (gs * g).to(s_dtype).reshape(s_shape) if need[2] else None,
            (gb * g).to(b_meta[0]).reshape(b_meta[1]) if need[3] else None,
            None,
            None,
            None,
        )


class _SigLipRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, dist_impl, group, impl, chunk_size):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = x.shape[0]
        x_d, y_d = x.detach(), y.detach()
        hr, hl = _stream_hops(dist_impl, world)
        state = {
            "total": torch.zeros((), dtype=acc_dtype(x.dtype), device=x.device),
            "ok": _finite_flag(x_d, y_d),
        }

        def compute(owner, payload):
            (yq,) = payload
            if owner != rank:
                state["ok"] = state["ok"] & torch.isfinite(yq).all()
            offset = 0 if owner == rank else None
            total, *_ = siglip_block(x_d, yq, scale, bias, offset, False, impl=impl, chunk_size=chunk_size)
            state["total"] = state["total"] + total
            return None

        ring_exchange([y_d], compute, group=group, hops_right=hr, hops_left=hl)
        loss = state["total"] / n
        loss = torch.where(state["ok"], loss, torch.full_like(loss, float("nan")))
        ctx.save_for_backward(x, y, scale, *(() if bias is None else (bias,)))
        ctx.cfg = (dist_impl, group, impl, chunk_size, rank, world, bias is not None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        dist_impl, group, impl, chunk_size, rank, world, has_bias = ctx.cfg
        x, y, scale, *rest = ctx.saved_tensors
        bias = rest[0] if has_bias else None
        n, d = x.shape
        accd = acc_dtype(x.dtype)
        g = grad_out.to(accd).reshape(()) / n
        hr, hl = _stream_hops(dist_impl, world)
        x_d, y_d = x.detach(), y.detach()
        zero = torch.zeros((), dtype=accd, device=x.device)
        state = {"dx": torch.zeros((n, d), dtype=accd, device=x.device), "ds": zero, "db": zero}

        def compute(owner, payload):
            # Recompute the block with gradients; the text gradient is weighted by this rank's g and
            # travels with the chunk back to its owner (open_clip sends it back through the exchanges).
            (yq,) = payload
            offset = 0 if owner == rank else None
            _, gx, gy, gs, gb = siglip_block(
                x_d, yq, scale, bias, offset, True, impl=impl, chunk_size=chunk_size
            )
            state["dx"] = state["dx"] + gx * g
            state["ds"] = state["ds"] + gs * g
            state["db"] = state["db"] + gb * g
            return gy * g

        own, arrived = ring_exchange([y_d], compute, group=group, hops_right=hr, hops_left=hl)
        dy = own
        for a in arrived:
            dy = dy + a
        need = ctx.needs_input_grad
        return (
            state["dx"].to(x.dtype) if need[0] else None,
            dy.to(y.dtype) if need[1] else None,
            state["ds"].to(scale.dtype).reshape(scale.shape) if need[2] else None,
            state["db"].to(bias.dtype).reshape(bias.shape) if (need[3] and bias is not None) else None,
            None,
            None,
            None,
            None,
        )


# ----------------------------------------------------------------------------------------------------
# functional entry points (called by fastclip.losses after argument checks)


def _apply_clip(x, y, scale, bias, local_loss, gather_with_grad, dist_impl, group, impl, chunk_size):
    """The checked-inputs entry point (fastclip.losses calls it after its own checks)."""
    mode = _clip_mode(local_loss, gather_with_grad)
    if dist_impl == "ring":
        fn = _ClipRing
    else:
        fn = _ClipGather if local_loss else _ClipGatherGlobal
    return fn.apply(x, y, scale, bias, mode, group, impl, chunk_size)


def _apply_siglip(x, y, scale, bias, dist_impl, group, impl, chunk_size):
    if dist_impl in ("gather", "reduce"):
        return _SigLipGather.apply(x, y, scale, bias, group, impl, chunk_size)
    return _SigLipRing.apply(x, y, scale, bias, dist_impl, group, impl, chunk_size)


def _check_call(
    x, y, scale, bias, *, bias_required, dist_impl, allowed, group, impl, chunk_size, check_finite
):
    from fastclip import _checks
    from fastclip.ops.dispatch import resolve_impl

    if dist_impl not in allowed:
        raise ValueError(f"dist_impl: expected one of {allowed}, got {dist_impl!r}")
    _checks.check_bool("check_finite", check_finite)
    _checks.check_features(x, y)
    scale = _checks.check_scalar("logit_scale", scale, device=x.device)
    if bias is None and bias_required:
        raise ValueError("logit_bias: expected a 0-dim or 1-element tensor (SigLIP needs a bias), got None")
    if bias is not None:
        bias = _checks.check_scalar("logit_bias", bias, device=x.device)
    if _checks.check_impl(impl) == "reference":
        raise ValueError(
            "impl: expected 'auto', 'triton' or 'torch' for the distributed functional forms, got 'reference' "
            "(use fastclip.reference.*_distributed_reference)"
        )
    impl = resolve_impl(impl, x.device, dtype=x.dtype)
    chunk_size = _checks.check_chunk_size(chunk_size)
    if check_finite:
        _checks.check_all_finite("image_features", x)
        _checks.check_all_finite("text_features", y)
    group_rank_and_size(group)  # raises when torch.distributed is not initialized
    return scale, bias, impl, chunk_size


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

    Shapes: local ``image_features (n, D)``, ``text_features (n, D)`` (same n on every rank),
    ``logit_scale`` 0-dim or 1-element (exponentiated), optional ``logit_bias``. Equivalent to
    ``fastclip.reference.clip_loss_distributed_reference`` (which gathers and materializes).
    """
    from fastclip import _checks

    _checks.check_bool("local_loss", local_loss)
    _checks.check_bool("gather_with_grad", gather_with_grad)
    _checks.check_bool("check_batch_sizes", check_batch_sizes)
    logit_scale, logit_bias, impl, chunk_size = _check_call(
        image_features, text_features, logit_scale, logit_bias, bias_required=False, dist_impl=dist_impl,
        allowed=("gather", "ring"), group=group, impl=impl, chunk_size=chunk_size, check_finite=check_finite,
    )  # fmt: skip
    if check_batch_sizes:
        _check_batch_sizes(image_features, group)
    return _apply_clip(
        image_features, text_features, logit_scale, logit_bias, local_loss, gather_with_grad, dist_impl, group,
        impl, chunk_size,
    )  # fmt: skip


def siglip_loss_distributed(
    image_features,
    text_features,
    logit_scale,
    logit_bias,
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
    ring (both directions, or to the right only). Shapes as :func:`clip_loss_distributed`;
    ``logit_bias`` is required."""
    from fastclip import _checks

    _checks.check_bool("check_batch_sizes", check_batch_sizes)
    logit_scale, logit_bias, impl, chunk_size = _check_call(
        image_features, text_features, logit_scale, logit_bias, bias_required=True, dist_impl=dist_impl,
        allowed=("bidir", "shift", "reduce", "gather"), group=group, impl=impl, chunk_size=chunk_size,
        check_finite=check_finite,
    )  # fmt: skip
    if check_batch_sizes:
        _check_batch_sizes(image_features, group)
    return _apply_siglip(
        image_features, text_features, logit_scale, logit_bias, dist_impl, group, impl, chunk_size
    )


__all__ = [
    "AllGather",
    "CommStats",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_sum",
    "check_batch_sizes",
    "clip_loss_distributed",
    "comm_stats",
    "group_rank_and_size",
    "reduce_scatter_rows",
    "ring_exchange",
    "siglip_loss_distributed",
]
