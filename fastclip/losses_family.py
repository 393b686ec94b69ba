"""``InfoNCELoss``: the contrastive family as a module. It holds validated flags and calls one entry.

The options are checked once, at construction, into frozen objects; ``forward`` passes them to
``fastclip.functional.info_nce_with_options`` (one process) or
``fastclip.distributed.info_nce_loss_distributed`` (``distributed=True``: this rank's rows against every
rank's columns). A learnable temperature: pass ``scale`` as a tensor to ``forward``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastclip import _checks
from fastclip.functional import info_nce_with_options
from fastclip.ops.family_variants import InfoNCEOptions
from fastclip.ops.inputs import Common, loss_options
from fastclip.ops.signatures import split_options, takes_options


class InfoNCELoss(nn.Module):
    """InfoNCE / multiple-negatives ranking loss with hard negatives, directions, duplicate masks,
    hardness weighting, label smoothing and a no-gradient bank (:func:`fastclip.info_nce_loss`).

    ``forward(query, positive, negatives=None, *, scale=None, query_ids=None, doc_ids=None,
    negative_ids=None, bank=None)`` -> 0-dim loss; ``scale=None`` uses the constructor's ``scale``.
    The options after ``dist_impl`` are :func:`fastclip.info_nce_loss`'s (one definition:
    ``InfoNCEOptions`` and ``Common``), keyword-only.
    """

    @takes_options(InfoNCEOptions, Common)
    def __init__(
        self,
        scale: float = 20.0,
        *,
        distributed: bool = False,
        group=None,
        dist_impl: str = "gather",
        **options,
    ):
        super().__init__()
        self.options, common = split_options("InfoNCELoss", options, InfoNCEOptions, Common)
        self.distributed = _checks.check_bool("distributed", distributed)
        self.common = loss_options(**dataclasses.asdict(common), allow_reference=not distributed)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale: expected a positive float, got {scale!r}")
        self.scale = float(scale)
        from fastclip.distributed.family import FAMILY_DIST_IMPLS
        from fastclip.distributed.world import check_dist_impl

        # Checked whatever ``distributed`` says: a typo must not wait for the multi-process run.
        check_dist_impl(dist_impl, FAMILY_DIST_IMPLS)
        self.group = group
        self.dist_impl = dist_impl

    def forward(
        self,
        query,
        positive,
        negatives=None,
        *,
        scale=None,
        query_ids=None,
        doc_ids=None,
        negative_ids=None,
        bank=None,
    ) -> torch.Tensor:
        scale = self.scale if scale is None else scale
        if self.distributed:
            from fastclip.distributed.family import info_nce_loss_distributed

            return info_nce_loss_distributed(
                query, positive, negatives, scale=scale, query_ids=query_ids, doc_ids=doc_ids,
                negative_ids=negative_ids, bank=bank, group=self.group, dist_impl=self.dist_impl,
                **dataclasses.asdict(self.options), **dataclasses.asdict(self.common),
            )  # fmt: skip
        return info_nce_with_options(
            query, positive, negatives, scale=scale, query_ids=query_ids, doc_ids=doc_ids,
            negative_ids=negative_ids, bank=bank, options=self.options, common=self.common,
        )  # fmt: skip

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"scale={self.scale}, similarity={o.similarity!r}, directions={o.directions}, partition={o.partition!r}, "
            f"hardness={o.hardness!r}, hardness_strength={o.hardness_strength}, duplicates={o.duplicates!r}, "
            f"label_smoothing={o.label_smoothing}, distributed={self.distributed}"
        )
