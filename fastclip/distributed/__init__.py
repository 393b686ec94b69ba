"""Every multi-rank loss over a process group, built on ``fastclip.comm`` and ``fastclip.ops``.

``clip_loss_distributed``/``siglip_loss_distributed`` (functional), the entries the modules call
(``*_with_options``: arguments checked at the boundary; DistillClipLoss's in ``distill.py``) and the
process-group checks (``world.py``, one :class:`ProcessGroupError` when torch.distributed is not
up). The collectives (``comm_stats``, ``all_gather_with_grad``, ...) live in ``fastclip.comm`` and are
re-exported here for convenience.
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
from fastclip.distributed.clip import (
    CLIP_DIST_IMPLS,
    clip_loss_distributed,
    clip_loss_distributed_fused,
    clip_loss_distributed_with_options,
)
from fastclip.distributed.distill import distill_clip_loss_distributed_with_options
from fastclip.distributed.family import (
    FAMILY_DIST_IMPLS,
    gist_loss_distributed,
    info_nce_loss_distributed,
)
from fastclip.distributed.siglip import (
    SIGLIP_DIST_IMPLS,
    siglip_loss_distributed,
    siglip_loss_distributed_fused,
    siglip_loss_distributed_with_options,
)
from fastclip.distributed.world import ProcessGroupError, gather_like_open_clip

__all__ = [
    "CLIP_DIST_IMPLS",
    "FAMILY_DIST_IMPLS",
    "SIGLIP_DIST_IMPLS",
    "AllGather",
    "CommStats",
    "ProcessGroupError",
    "all_gather_rows",
    "all_gather_with_grad",
    "all_reduce_sum",
    "check_batch_sizes",
    "clip_loss_distributed",
    "clip_loss_distributed_fused",
    "clip_loss_distributed_with_options",
    "comm_stats",
    "distill_clip_loss_distributed_with_options",
    "gather_like_open_clip",
    "gist_loss_distributed",
    "info_nce_loss_distributed",
    "group_rank_and_size",
    "reduce_scatter_rows",
    "ring_exchange",
    "siglip_loss_distributed",
    "siglip_loss_distributed_fused",
    "siglip_loss_distributed_with_options",
]
