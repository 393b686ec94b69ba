"""The contrastive family across processes: each rank computes its own rows against every rank's columns.

Semantics (sentence-transformers' ``gather_across_devices=True``): the columns are the all-gathered
queries, positives and each negative group, in rank order (all positives, then all first negatives,
...), row i of rank r is global row ``r * n + i``; each rank's loss is the mean over its own rows, and
the gradients of the gathered columns flow back to their owners (the all-gather's backward is a
reduce-scatter: rank q's features get the sum over ranks of d loss_r / d features_q). The mean of the
ranks' losses is the single-process loss of the concatenated batch.

``dist_impl="gather"``: all-gather with gradient, memory O(N·D) for the gathered columns and their
gradients. Only the operands the chosen blocks read are gathered (queries only for
query_to_query/doc_to_query).
"""

from __future__ import annotations

import torch

from fastclip import comm
from fastclip.comm import all_gather_rows, all_gather_with_grad, group_rank_and_size
from fastclip.ops.family import gist_fused, info_nce_fused
from fastclip.ops.family_inputs import (
    common_options,
    gist_options,
    info_nce_options,
    prepare_gist,
    prepare_info_nce,
)

FAMILY_DIST_IMPLS = ("gather",)


def _check_dist(dist_impl, check_batch_sizes, group):
    if dist_impl not in FAMILY_DIST_IMPLS:
        raise ValueError(f"dist_impl: expected one of {FAMILY_DIST_IMPLS}, got {dist_impl!r}")
    if not isinstance(check_batch_sizes, bool):
        raise TypeError(f"check_batch_sizes: expected a bool, got {type(check_batch_sizes).__name__}")
    try:
        return group_rank_and_size(group)
    except RuntimeError as e:  # a usage error, not a runtime failure
        raise ValueError(str(e)) from None


def _gather_ids(t, group):
    return None if t is None else all_gather_rows(t, group)


def info_nce_loss_distributed(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives=None,
    *,
    scale=20.0,
    similarity: str = "cos",
    directions=("query_to_doc",),
    partition: str = "joint",
    hardness: str | None = None,
    hardness_strength: float = 0.0,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    negative_ids=None,
    duplicates: str = "ignore",
    label_smoothing: float = 0.0,
    bank: torch.Tensor | None = None,
    group=None,
    dist_impl: str = "gather",
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
    check_batch_sizes: bool = True,
) -> torch.Tensor:
    """:func:`fastclip.info_nce_loss` over a process group: this rank's ``(n, D)`` rows against the
    columns of all ranks (``bank`` stays local: each rank's own extra negatives). Returns this rank's
    loss (the mean over its rows); the same arguments as the single-process form plus ``group``,
    ``dist_impl`` and ``check_batch_sizes`` (an all-gather of two integers that turns unequal local
    batches into a ``ValueError`` on every rank instead of a hang)."""
    o = info_nce_options(
        directions=directions, partition=partition, hardness=hardness, hardness_strength=hardness_strength,
        duplicates=duplicates, label_smoothing=label_smoothing, similarity=similarity,
    )  # fmt: skip
    c = common_options(impl=impl, chunk_size=chunk_size, check_finite=check_finite, allow_reference=False)
    rank, world = _check_dist(dist_impl, check_batch_sizes, group)
    a = prepare_info_nce(query, positive, negatives, bank, scale, query_ids, doc_ids, negative_ids, o, c)
    if check_batch_sizes:
        comm.check_batch_sizes(a.q, group)
    if world == 1:
        return info_nce_fused(a, o, c.chunk_size)
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


def gist_loss_distributed(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    guide_query: torch.Tensor,
    guide_positive: torch.Tensor,
    guide_negative: torch.Tensor | None = None,
    temperature: float = 0.01,
    margin_strategy: str = "absolute",
    margin: float = 0.0,
    contrast_anchors: bool = True,
    contrast_positives: bool = True,
    group=None,
    dist_impl: str = "gather",
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
    check_batch_sizes: bool = True,
) -> torch.Tensor:
    """:func:`fastclip.gist_loss` over a process group, as sentence-transformers' GISTEmbedLoss with
    ``gather_across_devices=True``: positives and negatives (and their guide embeddings) are gathered,
    anchors stay local (the anchor->anchor block is this rank's)."""
    o = gist_options(
        margin_strategy=margin_strategy, margin=margin,
        contrast_anchors=contrast_anchors, contrast_positives=contrast_positives,
    )  # fmt: skip
    c = common_options(impl=impl, chunk_size=chunk_size, check_finite=check_finite, allow_reference=False)
    rank, world = _check_dist(dist_impl, check_batch_sizes, group)
    a = prepare_gist(query, positive, negative, guide_query, guide_positive, guide_negative, temperature, c)
    if check_batch_sizes:
        comm.check_batch_sizes(a.q, group)
    if world == 1:
        return gist_fused(a, o, c.chunk_size)
    columns = (
        all_gather_with_grad(a.p, group),
        [all_gather_with_grad(t, group) for t in a.negs],
        all_gather_rows(a.gp, group),
        [all_gather_rows(t, group) for t in a.gnegs],
    )
    return gist_fused(a, o, c.chunk_size, columns=columns, offset=rank * a.q.shape[0])
