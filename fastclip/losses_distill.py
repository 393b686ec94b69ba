"""Drop-in replacements for open_clip's ``DistillClipLoss`` and ``CoCaLoss``.

Both subclass fastclip's :class:`~fastclip.losses.ClipLoss` as open_clip's subclass its ``ClipLoss``:
same constructor arguments (fastclip-only options keyword-only, after open_clip's), same ``forward``
signature, same tuple order and ``output_dict`` keys.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip import _checks
from fastclip.functional import distill_clip_loss
from fastclip.losses import ClipLoss, _check_world, gather_like_open_clip
from fastclip.ops.distill import distill_block_loss
from fastclip.ops.inputs import prepare_distill


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
        if self.world_size > 1:
            contrastive, distill = self._forward_distributed(
                image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale,
            )  # fmt: skip
        else:
            contrastive, distill = distill_clip_loss(
                image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, impl=self.impl, chunk_size=self.chunk_size, check_finite=self.check_finite,
            )  # fmt: skip
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill

    def _forward_distributed(self, x, y, s, xt, yt, t):
        from fastclip.comm import check_batch_sizes

        _check_world(self.group, self.rank, self.world_size)
        a = prepare_distill(
            x, y, s, xt, yt, t, impl=self.impl, chunk_size=self.chunk_size, check_finite=self.check_finite
        )
        x, y, s, xt, yt, t = a.tensors
        impl = a.impl
        if impl == "reference":
            impl = "torch"  # no materialized multi-rank form: the chunked one gives the same numbers
        if self.check_batch_sizes:
            check_batch_sizes(x, self.group)
        flags = dict(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, group=self.group)
        x_all, y_all = gather_like_open_clip(x, y, rank=self.rank, **flags)
        xt_all, yt_all = gather_like_open_clip(xt, yt, rank=self.rank, **flags)
        kw = dict(impl=impl, chunk_size=self.chunk_size)
        if not self.local_loss:
            # open_clip's global loss: the square (N, N) problem on the gathered features, on every rank.
            return distill_block_loss(x_all, y_all, s, xt_all, yt_all, t, offset=0, both=True, **kw)
        # Local loss: own image rows against all texts, own text rows against all images.
        offset = self.rank * x.shape[0]
        c_img, d_img = distill_block_loss(x, y_all, s, xt, yt_all, t, offset=offset, both=False, **kw)
        c_txt, d_txt = distill_block_loss(y, x_all, s, yt, xt_all, t, offset=offset, both=False, **kw)
        return (c_img + c_txt) / 2, (d_img + d_txt) / 2


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
