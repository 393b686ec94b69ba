"""``InfoNCELoss`` and ``GistLoss``: the contrastive family as modules. Each holds validated flags and
calls one entry.

The options are checked once, at construction, into frozen objects; ``forward`` passes them to
``fastclip.functional.info_nce_with_options`` / ``gist_with_options`` (one process) or
``fastclip.distributed.info_nce_loss_distributed`` / ``gist_loss_distributed`` (``distributed=True``:
this rank's rows against every rank's columns). A learnable temperature: pass ``scale`` (InfoNCE) as a
tensor to ``forward``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip import _checks
from fastclip.functional import gist_with_options, info_nce_with_options
from fastclip.ops.family_variants import GistOptions, InfoNCEOptions
from fastclip.ops.inputs import Common, no_reference
from fastclip.ops.signatures import split_options, takes_options


class _FamilyModule(nn.Module):
    """What the family's modules share: the options checked once, at construction (``kind`` and
    ``Common``; no ``impl="reference"`` across processes), ``distributed``, ``group``, ``dist_impl``."""

    def _hold(self, name: str, options: dict, kind, distributed, group, dist_impl) -> None:
        self.options, common = split_options(name, options, kind, Common)
        self.distributed = _checks.check_bool("distributed", distributed)
        self.common = no_reference(common) if self.distributed else common
        self.group, self.dist_impl = group, dist_impl

    def _held(self):
        """The checked options, as the distributed entries ask for them."""
        return self.options, self.common


class InfoNCELoss(_FamilyModule):
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
        from fastclip.distributed.family import FAMILY_DIST_IMPLS
        from fastclip.distributed.world import check_dist_impl

        self._hold("InfoNCELoss", options, InfoNCEOptions, distributed, group, dist_impl)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"scale: expected a positive float, got {scale!r}")
        self.scale = float(scale)
        # Checked whatever ``distributed`` says: a typo must not wait for the multi-process run.
        check_dist_impl(dist_impl, FAMILY_DIST_IMPLS)

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
            from fastclip.distributed.family import info_nce_distributed_with_options

            return info_nce_distributed_with_options(
                query, positive, negatives, scale=scale, query_ids=query_ids, doc_ids=doc_ids,
                negative_ids=negative_ids, bank=bank, group=self.group, dist_impl=self.dist_impl,
                check_batch_sizes=True, options=self._held,
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


class GistLoss(_FamilyModule):
    """GISTEmbed's guided in-batch-negatives loss (:func:`fastclip.gist_loss`) as a module.

    ``forward(query, positive, negative=None, *, guide_query, guide_positive, guide_negative=None)`` ->
    0-dim loss; the guide model's embeddings of the same texts come with each call (no gradient).
    ``distributed=True``: sentence-transformers' ``gather_across_devices=True`` (positives, negatives and
    their guide embeddings gathered, anchors local; ``dist_impl`` "gather" only). The options after
    ``dist_impl`` are ``gist_loss``'s (``GistOptions`` and ``Common``), keyword-only.
    """

    @takes_options(GistOptions, Common)
    def __init__(
        self, temperature: float = 0.01, *, distributed: bool = False, group=None, dist_impl: str = "gather",
        **options,
    ):  # fmt: skip
        super().__init__()
        from fastclip.distributed.family import check_gist_dist_impl

        self._hold("GistLoss", options, GistOptions, distributed, group, dist_impl)
        self.temperature = _checks.check_real("temperature", temperature, lo=0.0, lo_open=True)
        check_gist_dist_impl(dist_impl)

    def forward(self, query, positive, negative=None, *, guide_query, guide_positive, guide_negative=None):
        guides = dict(guide_query=guide_query, guide_positive=guide_positive, guide_negative=guide_negative)
        if self.distributed:
            from fastclip.distributed.family import gist_distributed_with_options

            return gist_distributed_with_options(
                query, positive, negative, **guides, temperature=self.temperature, group=self.group,
                dist_impl=self.dist_impl, check_batch_sizes=True, options=self._held,
            )  # fmt: skip
        return gist_with_options(
            query, positive, negative, **guides, temperature=self.temperature, options=self.options,
            common=self.common,
        )  # fmt: skip

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"temperature={self.temperature}, margin_strategy={o.margin_strategy!r}, margin={o.margin}, "
            f"contrast_anchors={o.contrast_anchors}, contrast_positives={o.contrast_positives}, "
            f"distributed={self.distributed}"
        )
