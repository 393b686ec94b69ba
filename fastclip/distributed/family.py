"""The contrastive family across processes: each rank computes its own rows against every rank's columns.

Semantics (sentence-transformers' ``gather_across_devices=True``): the columns are the all-gathered
queries, positives and each negative group, in rank order (all positives, then all first negatives,
...), row i of rank r is global row ``r * n + i``; each rank's loss is the mean over its own rows, and
the gradients of the gathered columns flow back to their owners (the all-gather's backward is a
reduce-scatter: rank q's features get the sum over ranks of d loss_r / d features_q). The mean of the
ranks' losses is the single-process loss of the concatenated batch.

``dist_impl="gather"``: all-gather with gradient, memory O(N·D) for the gathered columns and their
gradients; 3 GEMMs per block. Only the operands the chosen blocks read are gathered (queries only
for query_to_query/doc_to_query).

``dist_impl="ring"``: no rank ever holds all ranks' features. Every rank's shard (its queries,
positives, negatives and ids) travels around the ring twice by P2P (``comm.ring_exchange``, the next
transfer overlapping the current block): the first lap merges each row's log-sum-exps and target
sums over every shard (``RowStats``), the second forms the gradients with the complete statistics,
the column gradients travelling home with their shard. Memory O(n·D) per rank whatever the world
size; 4 GEMMs per block (the similarity is formed on both laps). The blocks run on the chunked
PyTorch implementation (its GEMMs are the device's BLAS either way).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from fastclip import comm
from fastclip.comm import all_gather_rows, all_gather_with_grad, group_rank_and_size, ring_exchange
from fastclip.distributed.world import (
    Signature,
    check_dist_impl,
    checked_on_every_rank,
    require_process_group,
    show_bits,
    show_given,
    show_table,
    tensor_fields,
)
from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.family import gist_fused, info_nce_fused
from fastclip.ops.family_impl import family_torch
from fastclip.ops.family_inputs import normalize, prepare_gist, prepare_info_nce
from fastclip.ops.family_variants import GistOptions, InfoNCEOptions, Layout, info_nce_spec
from fastclip.ops.inputs import Common, all_finite, no_reference
from fastclip.ops.signatures import split_options, takes_options

FAMILY_DIST_IMPLS = ("gather", "ring")


def _check_dist(check_batch_sizes, group):
    if not isinstance(check_batch_sizes, bool):
        raise TypeError(f"check_batch_sizes: expected a bool, got {type(check_batch_sizes).__name__}")
    require_process_group("group", "a multi-process loss")
    return group_rank_and_size(group)


_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _gather_ids(t, group):
    return None if t is None else all_gather_rows(t, group)


@takes_options(InfoNCEOptions, Common)
def info_nce_loss_distributed(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives=None,
    *,
    scale=20.0,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    negative_ids=None,
    bank: torch.Tensor | None = None,
    group=None,
    dist_impl: str = "gather",
    check_batch_sizes: bool = True,
    **options,
) -> torch.Tensor:
    """:func:`fastclip.info_nce_loss` over a process group: this rank's ``(n, D)`` rows against the
    columns of all ranks (``bank`` stays local: each rank's own extra negatives). Returns this rank's
    loss (the mean over its rows); the same arguments as the single-process form plus ``group``,
    ``dist_impl`` and ``check_batch_sizes`` (one all-gather of a few integers: ranks that disagree on
    the local batch, feature dim, dtype, number of negative groups, which ids are given, directions or
    ``dist_impl`` get the same ``ValueError`` on every rank instead of a hang; ``False`` skips it)."""

    def checked_options():
        o, c = split_options("info_nce_loss_distributed", options, InfoNCEOptions, Common)
        return o, no_reference(c)

    return info_nce_distributed_with_options(
        query, positive, negatives, scale=scale, query_ids=query_ids, doc_ids=doc_ids, negative_ids=negative_ids,
        bank=bank, group=group, dist_impl=dist_impl, check_batch_sizes=check_batch_sizes, options=checked_options,
    )  # fmt: skip


def info_nce_distributed_with_options(
    query, positive, negatives=None, *, scale, query_ids=None, doc_ids=None, negative_ids=None, bank=None,
    group, dist_impl: str, check_batch_sizes: bool, options: Callable[[], tuple[InfoNCEOptions, Common]],
) -> torch.Tensor:  # fmt: skip
    """:func:`info_nce_loss_distributed` with its options from ``options()``, called inside the ranks'
    agreement (a refused option stops every rank): the keywords' split there, the checked objects
    ``fastclip.InfoNCELoss`` holds since its construction (no re-validation per call)."""
    rank, world = _check_dist(check_batch_sizes, group)

    def build():
        check_dist_impl(dist_impl, FAMILY_DIST_IMPLS)
        o, c = options()
        a = prepare_info_nce(query, positive, negatives, bank, scale, query_ids, doc_ids, negative_ids, o, c)
        neg_ids_mask = sum(1 << j for j, t in enumerate(a.neg_ids) if t is not None and j < 62)
        fields = [
            *tensor_fields("query", a.q),
            Signature("negatives: number of negative groups (K)", len(a.negs)),
            Signature("query_ids", int(query_ids is not None), show_given),
            Signature("doc_ids", int(doc_ids is not None), show_given),
            Signature("negative_ids: the negative groups with ids", neg_ids_mask, show_bits(str)),
            Signature("directions", sum(1 << _DIRECTIONS.index(x) for x in o.directions),
                      show_bits(lambda j: _DIRECTIONS[j])),
            Signature("dist_impl", FAMILY_DIST_IMPLS.index(dist_impl), show_table(FAMILY_DIST_IMPLS)),
        ]  # fmt: skip
        return (o, c, a), fields

    o, c, a = checked_on_every_rank(
        "info_nce_loss_distributed", build, anchor=query, group=group, check=check_batch_sizes
    )
    if world == 1:
        return info_nce_fused(a, o, c.chunk_size)
    if dist_impl == "ring":
        return _info_nce_ring(a, o, c.chunk_size, group, rank, world)
    needs_q = bool({"query_to_query", "doc_to_query"} & set(o.directions))
    Q = all_gather_with_grad(a.q, group) if needs_q else a.q  # unused when not needed
    P = all_gather_with_grad(a.p, group)
    N = [all_gather_with_grad(t, group) for t in a.negs]
    ids = a.q_ids is not None
    columns = (
        Q,
        P,
        N,
        _gather_ids(a.q_ids, group) if ids and needs_q else a.q_ids,
        _gather_ids(a.p_ids, group) if ids else None,
        [_gather_ids(t, group) if ids else None for t in a.neg_ids],
    )
    return info_nce_fused(a, o, c.chunk_size, columns=columns, offset=rank * a.q.shape[0])


@takes_options(GistOptions, Common)
def gist_loss_distributed(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    guide_query: torch.Tensor,
    guide_positive: torch.Tensor,
    guide_negative: torch.Tensor | None = None,
    temperature: float = 0.01,
    group=None,
    dist_impl: str = "gather",
    check_batch_sizes: bool = True,
    **options,
) -> torch.Tensor:
    """:func:`fastclip.gist_loss` over a process group, as sentence-transformers' GISTEmbedLoss with
    ``gather_across_devices=True``: positives and negatives (and their guide embeddings) are gathered,
    anchors stay local (the anchor->anchor block is this rank's). ``check_batch_sizes``: ranks that
    disagree on the local batch, feature dim, dtype, whether a negative is given or the guide's dim
    get the same ``ValueError`` on every rank (one all-gather of a few integers), not mismatched
    collectives."""

    def checked_options():
        o, c = split_options("gist_loss_distributed", options, GistOptions, Common)
        return o, no_reference(c)

    return gist_distributed_with_options(
        query, positive, negative, guide_query=guide_query, guide_positive=guide_positive,
        guide_negative=guide_negative, temperature=temperature, group=group, dist_impl=dist_impl,
        check_batch_sizes=check_batch_sizes, options=checked_options,
    )  # fmt: skip


def check_gist_dist_impl(dist_impl) -> str:
    """GIST has the gather strategy only."""
    check_dist_impl(dist_impl, FAMILY_DIST_IMPLS)
    if dist_impl != "gather":
        raise ValueError(
            f"dist_impl: expected 'gather' for GIST (sentence-transformers' gather_across_devices; no "
            f"ring form is built), got {dist_impl!r}"
        )
    return dist_impl


def gist_distributed_with_options(
    query, positive, negative=None, *, guide_query, guide_positive, guide_negative=None, temperature,
    group, dist_impl: str, check_batch_sizes: bool, options: Callable[[], tuple[GistOptions, Common]],
) -> torch.Tensor:  # fmt: skip
    """:func:`gist_loss_distributed` with its options from ``options()`` (as
    :func:`info_nce_distributed_with_options`; ``fastclip.GistLoss`` passes the ones it holds)."""
    rank, world = _check_dist(check_batch_sizes, group)

    def build():
        check_gist_dist_impl(dist_impl)
        o, c = options()
        a = prepare_gist(
            query, positive, negative, guide_query, guide_positive, guide_negative, temperature, c
        )
        fields = [
            *tensor_fields("query", a.q),
            Signature("negative", int(bool(a.negs)), show_given),
            Signature("guide_query/guide_positive/guide_negative: the guide's feature dim", a.gq.shape[1]),
            Signature("guide_query/guide_positive/guide_negative: dtype",
                      comm._code(a.gq.dtype, comm._DTYPE_CODES), show_table(comm._DTYPE_CODES)),
        ]  # fmt: skip
        return (o, c, a), fields

    o, c, a = checked_on_every_rank(
        "gist_loss_distributed", build, anchor=query, group=group, check=check_batch_sizes
    )
    if world == 1:
        return gist_fused(a, o, c.chunk_size)
    columns = (
        all_gather_with_grad(a.p, group),
        [all_gather_with_grad(t, group) for t in a.negs],
        all_gather_rows(a.gp, group),
        [all_gather_rows(t, group) for t in a.gnegs],
    )
    return gist_fused(a, o, c.chunk_size, columns=columns, offset=rank * a.q.shape[0])


# ----------------------------------------------------------------------------------------------------
# ring


class _RingPlan:
    """What travels and how a stage's operands are laid out.

    A shard is ``[Q (if a block reads the queries), P, N_1..N_K, ids of those (when ids are used)]``.
    Stage operands: local rows q (0), p (1), the shard's feature tensors, and the bank on the rank's own
    stage; row i's own column is ``i + (rank - owner) * n``, in range only on the own stage."""

    def __init__(self, o, k_negs, needs_q, has_ids, neg_has_ids, has_bank, rank, n):
        self.o, self.k, self.needs_q, self.has_ids = o, k_negs, needs_q, has_ids
        self.neg_has_ids, self.has_bank, self.rank, self.n = neg_has_ids, has_bank, rank, n
        self.n_feats = (1 if needs_q else 0) + 1 + k_negs

    def stage(self, owner, feats, row_ids, payload, bank):
        cols = list(payload[: self.n_feats])
        ts = [feats[0], feats[1], *cols]
        base = 2
        Q = base if self.needs_q else 0
        P = base + (1 if self.needs_q else 0)
        N = tuple(range(P + 1, P + 1 + self.k))
        ids = [row_ids[0], row_ids[1]] + [None] * len(cols)
        with_ids = set()
        if self.has_ids:
            id_list = iter(payload[self.n_feats :])
            with_ids = {0, 1}
            if self.needs_q:
                ids[Q] = next(id_list)
                with_ids.add(Q)
            ids[P] = next(id_list)
            with_ids.add(P)
            for j, has in enumerate(self.neg_has_ids):
                if has:
                    ids[N[j]] = next(id_list)
                    with_ids.add(N[j])
        bank_idx = None
        if self.has_bank and owner == self.rank:
            bank_idx = len(ts)
            ts.append(bank)
            ids.append(None)
        lay = Layout(
            q=0, p=1, Q=Q, P=P, N=N, bank=bank_idx, with_ids=frozenset(with_ids),
            offset=(self.rank - owner) * self.n,
        )  # fmt: skip
        return info_nce_spec(self.o, lay, self.n), ts, ids, P


class _InfoNCERing(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, plan, group, chunk_size, scale, q, p, bank, *rest):
        k = plan.k
        negs = list(rest[:k])
        id_tensors = list(rest[k:])  # q_ids, p_ids, then the negative groups' ids that exist
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n = q.shape[0]
        need_s = ctx.needs_input_grad[3]
        need_feat = [ctx.needs_input_grad[4], ctx.needs_input_grad[5], *ctx.needs_input_grad[7 : 7 + k]]
        feats = [q.detach(), p.detach(), *(t.detach() for t in negs)]
        bank_d = None if bank is None else bank.detach()
        row_ids = (id_tensors[0], id_tensors[1]) if plan.has_ids else (None, None)
        shard = ([feats[0]] if plan.needs_q else []) + feats[1:]
        if plan.has_ids:
            shard += ([id_tensors[0]] if plan.needs_q else []) + id_tensors[1:]
        # gradient of each shard tensor: the queries', the positives', each negative group's
        need_shard = ([need_feat[0]] if plan.needs_q else []) + need_feat[1:]
        state = {"stats": None, "spec": None, "ok": all_finite(scale, *feats)}

        def lap1(owner, payload):
            spec, ts, ids, _ = plan.stage(owner, feats, row_ids, payload, bank_d)
            if owner != rank:
                state["ok"] = state["ok"] & all_finite(*payload[: plan.n_feats])
            st = family_torch(
                spec, ts, ids, [None] * len(ts), None, scale, [False] * len(ts), chunk_size=chunk_size,
                stats_only=True,
            )  # fmt: skip
            state["stats"] = st if state["stats"] is None else state["stats"].merge(st)
            state["spec"] = spec
            return None

        ring_exchange(shard, lap1, group=group, hops_right=world - 1)
        stats = state["stats"]
        acc = stats.pos_sum.dtype
        loss = stats.loss_sum(state["spec"]) * (1.0 / n)
        loss = torch.where(state["ok"], loss, torch.full_like(loss, float("nan"))).to(acc)
        ctx.consumed, ctx.k = False, k
        ctx.meta = [(t.dtype, t.shape) for t in (q, p, *negs)] + [(scale.dtype, scale.shape)]
        ctx.n_ids = len(id_tensors)
        if not (any(need_feat) or need_s):
            ctx.present = [False] * (2 + k)
            ctx.save_for_backward()
            return loss
        row_grads = [
            torch.zeros(feats[j].shape, dtype=acc, device=q.device) if need_feat[j] else None for j in (0, 1)
        ]
        ds_total = [torch.zeros((), dtype=acc, device=q.device)]

        def lap2(owner, payload):
            spec, ts, ids, _ = plan.stage(owner, feats, row_ids, payload, bank_d)
            need = [need_feat[0], need_feat[1], *need_shard] + [False] * (len(ts) - 2 - plan.n_feats)
            _, ds, grads = family_torch(
                spec, ts, ids, [None] * len(ts), None, scale, need, need_s, chunk_size, stats=stats
            )
            ds_total[0] += ds
            for j in (0, 1):
                if grads[j] is not None:
                    row_grads[j].add_(grads[j])
            parts = [g.reshape(-1) for g in grads[2 : 2 + plan.n_feats] if g is not None]
            return torch.cat(parts) if parts else None

        own, arrived = ring_exchange(shard, lap2, group=group, hops_right=world - 1)
        col_total = own
        for part in arrived:
            col_total = col_total + part
        # Shard gradients came home: add each to the matching local feature's gradient.
        out = [row_grads[0], row_grads[1]] + [None] * k
        targets = ([0] if plan.needs_q else []) + [1] + [2 + j for j in range(k)]
        offset, d = 0, q.shape[1]
        for target, want in zip(targets, need_shard):
            if not want:
                continue
            piece = col_total[offset : offset + n * d].reshape(n, d)
            offset += n * d
            out[target] = piece if out[target] is None else out[target].add_(piece)
        ctx.present = [g is not None for g in out]
        ctx.save_for_backward(ds_total[0], *[g for g in out if g is not None])
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        k = ctx.k
        nones_tail = [None] * ctx.n_ids
        if not any(ctx.present) and not ctx.needs_input_grad[3]:
            return (None, None, None, None, None, None, None, *([None] * k), *nones_tail)
        if ctx.consumed:
            raise RuntimeError("fastclip's ring InfoNCE loss was backpropagated twice; compute it again")
        ctx.consumed = True
        ds, *saved = ctx.saved_tensors
        g = grad_out.to(ds.dtype)
        it = iter(saved)
        feats = []
        for present, (dtype, _) in zip(ctx.present, ctx.meta[:-1]):
            feats.append(next(it).mul_(g).to(dtype) if present else None)
        s_dtype, s_shape = ctx.meta[-1]
        d_scale = (ds * g).to(s_dtype).reshape(s_shape) if ctx.needs_input_grad[3] else None
        return (None, None, None, d_scale, feats[0], feats[1], None, *feats[2:], *nones_tail)


@comm._compile_disabled
def _info_nce_ring(a, o, chunk_size, group, rank, world):
    has_ids = a.q_ids is not None
    needs_q = bool({"query_to_query", "doc_to_query"} & set(o.directions))
    neg_has_ids = tuple(has_ids and t is not None for t in a.neg_ids)
    ids = [a.q_ids, a.p_ids, *(t for t, has in zip(a.neg_ids, neg_has_ids) if has)] if has_ids else []
    plan = _RingPlan(o, len(a.negs), needs_q, has_ids, neg_has_ids, a.bank is not None, rank, a.q.shape[0])
    q, p, negs, bank = a.q, a.p, list(a.negs), a.bank
    if o.similarity == "cos":  # unit rows by autograd: the shards travel normalized
        q, p, negs = normalize(q), normalize(p), [normalize(t) for t in negs]
        bank = None if bank is None else normalize(bank)
    with no_autocast(q.device):
        return _InfoNCERing.apply(plan, group, chunk_size, a.scale, q, p, bank, *negs, *ids)
