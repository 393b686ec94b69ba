"""Drop-in replacements for open_clip's ``DistillClipLoss`` and ``CoCaLoss``.

Both subclass fastclip's :class:`~fastclip.losses.ClipLoss` as open_clip's subclass its ``ClipLoss``:
same constructor arguments (fastclip-only options keyword-only, after open_clip's), same ``forward``
signature, same tuple order and ``output_dict`` keys.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip import _checks
from fastclip.distributed.distill import distill_clip_loss_distributed_with_options
from fastclip.functional import distill_clip_loss_with_options
from fastclip.losses import ClipLoss


class DistillClipLoss(ClipLoss):
    """open_clip's ``DistillClipLoss``: the student's CLIP loss and its cross-entropy against the
    teacher's softmax over the batch, both directions, fused: neither B×B matrix is ever built.

    ``forward(image_features (n, D), text_features (n, D), logit_scale, dist_image_features (n, Dt),
    dist_text_features (n, Dt), dist_logit_scale, output_dict=False)`` returns
    ``(contrastive_loss, distill_loss)`` or ``{"contrastive_loss": ..., "distill_loss": ...}``.
    Constructor as :class:`~fastclip.losses.ClipLoss`: open_clip's arguments, then fastclip's
    keyword-only ``options`` (``impl``, ``chunk_size``, ``check_finite``, ...; ``dist_impl`` must be
    "gather"). With ``world_size > 1`` student and teacher features are gathered as open_clip
    gathers them, so each rank's losses and gradients equal open_clip's for the same
    ``local_loss``/``gather_with_grad``; no rank builds an n×N matrix.
    Gradients reach the teacher's inputs too when they require grad (as in open_clip).
    """

    def __init__(
        self,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
        **options,
    ):
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod, **options)
        if self.dist_impl != "gather":
            raise ValueError(f"dist_impl: expected 'gather' for DistillClipLoss, got {self.dist_impl!r}")

    def forward(
        self,
        image_features,
        text_features,
        logit_scale,
        dist_image_features,
        dist_text_features,
        dist_logit_scale,
        output_dict=False,
    ):
        args = (
            image_features,
            text_features,
            logit_scale,
            dist_image_features,
            dist_text_features,
            dist_logit_scale,
        )
        if self.world_size > 1:
            contrastive, distill = distill_clip_loss_distributed_with_options(
                *args, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, rank=self.rank,
                **self._world(),
            )  # fmt: skip
        else:
            contrastive, distill = distill_clip_loss_with_options(*args, options=self.options)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class CoCaLoss(ClipLoss):
    """open_clip's ``CoCaLoss``: ``clip_loss_weight`` × fastclip's CLIP loss and ``caption_loss_weight``
    × the captioning cross-entropy (``nn.CrossEntropyLoss(ignore_index=pad_id)`` over the vocabulary,
    computed exactly as open_clip computes it).

    ``forward(image_features (n, D), text_features (n, D), logits (n, T, V), labels (n, T), logit_scale,
    output_dict=False)`` returns ``(clip_loss, caption_loss)`` or ``{"contrastive_loss": ...,
    "caption_loss": ...}``. With ``clip_loss_weight`` 0 the contrastive loss is open_clip's
    ``torch.tensor(0)`` and the CLIP loss is not computed. Other arguments as
    :class:`~fastclip.losses.ClipLoss`.
    """

    def __init__(
        self,
        caption_loss_weight,
        clip_loss_weight,
        pad_id=0,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
        **kwargs,
    ):
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
            use_horovod=use_horovod,
            **kwargs,
        )
        for name, v in (("caption_loss_weight", caption_loss_weight), ("clip_loss_weight", clip_loss_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
        _checks.check_int("pad_id", pad_id, minimum=-(2**63))
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.caption_loss = nn.CrossEntropyLoss(ignore_index=pad_id)

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict=False):
        _checks.check_tensor("logits", logits, ndim=3)
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
            got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise TypeError(f"labels: expected an int64 tensor of token ids, got {got}")
        if tuple(labels.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"labels: expected shape {tuple(logits.shape[:2])} (logits' batch and length), "
                f"got {tuple(labels.shape)}"
            )
        if self.clip_loss_weight:
            clip_loss = super().forward(image_features, text_features, logit_scale)
            clip_loss = self.clip_loss_weight * clip_loss
        else:
            clip_loss = torch.tensor(0, device=logits.device)
        caption_loss = self.caption_loss(logits.permute(0, 2, 1), labels) * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": clip_loss, "caption_loss": caption_loss}
        return clip_loss, caption_loss


__all__ = ["CoCaLoss", "DistillClipLoss"]
