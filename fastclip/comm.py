"""Collectives with correct autograd, the P2P ring engine, and byte accounting.

Thin wrappers over ``torch.distributed`` that pick the torch 2.13 names (``all_gather_single``,
``reduce_scatter_single``) or the older ones (``all_gather_into_tensor``, ``reduce_scatter_tensor``,
torch 2.11) by feature detection, take any process group, and count the bytes they move
(:func:`comm_stats`). Imports nothing of fastclip: the distributed losses (``fastclip.distributed``)
are built on top of it.

Notation: W ranks in the group, local batch n, global batch N = W·n; gathered matrices stack ranks
in group-rank order, so rank r's rows are ``[r·n, (r+1)·n)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

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


def _compile_disabled(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)`` that imports ``torch._dynamo`` (over a second) at the first call, not
    at ``import fastclip``.

    ``torch._disable_dynamo`` is torch's own lazy form (its wrapper lives in a file dynamo never traces);
    the ``_torchdynamo_disable`` mark makes a trace stop at the call as at any disabled function.
    """
    lazy = getattr(torch, "_disable_dynamo", None)
    if lazy is None:  # a torch without the lazy form
        return torch.compiler.disable(fn)
    wrapper = lazy(fn)
    wrapper._torchdynamo_disable = True
    return wrapper


@_compile_disabled
def all_gather_with_grad(t: torch.Tensor, group=None) -> torch.Tensor:
    """Differentiable all-gather: ``(n, ...)`` -> ``(W·n, ...)``; rank r's gradient is the sum over
    ranks of the gradients of its block (what ``torch.distributed.nn.all_gather`` gives).

    Kept out of ``torch.compile`` graphs (a graph break): torch 2.11's compile traced this Function's
    backward into a graph whose reduce-scatter result was lost, so the gradients came back as zeros.
    """
    return AllGather.apply(t, group)


# Codes of what must agree across ranks before a loss's collectives run (dtype and device type travel
# as small integers in one all-gather).
_DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DEVICE_CODES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _code(value, table) -> int:
    return table.index(value) if value in table else len(table)


def check_batch_sizes(features: torch.Tensor, group=None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks hold features of the same local batch,
    feature dim, dtype and device type.

    Costs one all-gather of four int64 per rank and a host sync. Without it, unequal batches make the
    later collectives hang (P2P) or fail with an opaque error, and unequal dtypes abort the process
    inside gloo.
    """
    world = dist.get_world_size(group)
    n, d = features.shape
    mine = [n, d, _code(features.dtype, _DTYPE_CODES), _code(features.device.type, _DEVICE_CODES)]
    mine_t = torch.tensor(mine, dtype=torch.int64, device=features.device)
    table = torch.empty((world, 4), dtype=torch.int64, device=features.device)
    _ALL_GATHER(table, mine_t.reshape(1, 4), group=group)
    _count("check_batch_sizes", (world - 1) * 32, (world - 1) * 32)
    rows = [tuple(r) for r in table.tolist()]
    if len({r[:2] for r in rows}) != 1:
        sizes = [r[:2] for r in rows]
        raise ValueError(
            "image_features: expected the same local (batch, dim) on every rank of the group "
            f"(fastclip's distributed losses, like open_clip's, need equal local batches); got {sizes} "
            "by group rank. Drop the last incomplete batch (drop_last=True) or pad it."
        )
    if len({r[2:] for r in rows}) != 1:
        names = [
            (
                str(_DTYPE_CODES[r[2]]) if r[2] < len(_DTYPE_CODES) else "other dtype",
                _DEVICE_CODES[r[3]] if r[3] < len(_DEVICE_CODES) else "other device",
            )
            for r in rows
        ]
        raise ValueError(
            "image_features: expected the same dtype and device type on every rank of the group; got "
            f"{names} by group rank (cast the features to one dtype on every rank)"
        )


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


def stream_hops(dist_impl: str, world: int) -> tuple[int, int]:
    if dist_impl == "bidir":
        left = (world - 1) // 2
        return world - 1 - left, left
    return world - 1, 0


__all__ = [
    "AllGather",
    "CommStats",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_logsumexp",
    "all_reduce_sum",
    "check_batch_sizes",
    "comm_stats",
    "group_rank_and_size",
    "reduce_scatter_rows",
    "ring_exchange",
    "stream_hops",
]
