"""Distributed CLIP and SigLIP losses over a process group, built on ``fastclip.comm`` and ``fastclip.ops``.

``clip_loss_distributed``/``siglip_loss_distributed`` (functional) and the fused entry points the
modules call. The collectives (``comm_stats``, ``all_gather_with_grad``, ...) live in
``fastclip.comm`` and are re-exported here for convenience.
"""

from fastclip.comm import (
    AllGather,
    CommStats,
    all_gather_rows,
    all_gather_with_grad,
    all_reduce_sum,
    check_batch_sizes,
    comm_stats,
    group_rank_and_size,
    reduce_scatter_rows,
    ring_exchange,
)
from fastclip.distributed.clip import CLIP_DIST_IMPLS, clip_loss_distributed, clip_loss_distributed_fused
from fastclip.distributed.family import (
    FAMILY_DIST_IMPLS,
    gist_loss_distributed,
    info_nce_loss_distributed,
)
from fastclip.distributed.siglip import (
    SIGLIP_DIST_IMPLS,
    siglip_loss_distributed,
    siglip_loss_distributed_fused,
)

__all__ = [
    "CLIP_DIST_IMPLS",
    "FAMILY_DIST_IMPLS",
    "SIGLIP_DIST_IMPLS",
    "AllGather",
    "CommStats",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_sum",
    "check_batch_sizes",
    "clip_loss_distributed",
    "clip_loss_distributed_fused",
    "comm_stats",
    "gist_loss_distributed",
    "info_nce_loss_distributed",
    "group_rank_and_size",
    "reduce_scatter_rows",
    "ring_exchange",
    "siglip_loss_distributed",
    "siglip_loss_distributed_fused",
]
