"""open_clip's ``DistillClipLoss`` across processes: student and teacher features gathered as open_clip
gathers them (``gather_like_open_clip``), then the single-process distillation Function on the gathered
blocks, so each rank's losses and gradients equal open_clip's for the same ``local_loss`` /
``gather_with_grad``; no rank builds an n×N matrix.
"""

from __future__ import annotations

import torch

from fastclip.distributed.world import Signature, checked_on_every_rank, gather_like_open_clip, tensor_fields
from fastclip.ops.distill import distill_block_loss
from fastclip.ops.family_inputs import Common
from fastclip.ops.inputs import prepare_distill

__all__ = ["distill_clip_loss_distributed_with_options"]


def distill_clip_loss_distributed_with_options(
    image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
    *, options: Common, local_loss: bool, gather_with_grad: bool, rank: int, group, check_batch_sizes: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(contrastive, distill)`` of this rank, arguments checked at the boundary (``fastclip.DistillClipLoss``
    at construction). ``impl="reference"`` runs the chunked PyTorch code: there is no materialized
    multi-rank form, and the chunked one gives the same numbers."""

    def build():
        a = prepare_distill(
            image_features, text_features, logit_scale, dist_image_features, dist_text_features,
            dist_logit_scale, options,
        )  # fmt: skip
        teacher = tensor_fields("dist_image_features", a.tensors[3])[
            1:
        ]  # its rows: checked against the student's
        fields = [
            *tensor_fields("image_features", a.tensors[0]),
            *teacher,
            Signature("local_loss", int(local_loss)),
            Signature("gather_with_grad", int(gather_with_grad)),
        ]
        return a, fields

    a = checked_on_every_rank(
        "distill_clip_loss_distributed", build, anchor=image_features, group=group, check=check_batch_sizes
    )
    x, y, s, xt, yt, t = a.tensors
    impl = "torch" if a.impl == "reference" else a.impl
    flags = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, group=group)
    x_all, y_all = gather_like_open_clip(x, y, rank=rank, **flags)
    xt_all, yt_all = gather_like_open_clip(xt, yt, rank=rank, **flags)
    kw = dict(impl=impl, chunk_size=a.chunk_size)
    if not local_loss:
        # open_clip's global loss: the square (N, N) problem on the gathered features, on every rank.
        return distill_block_loss(x_all, y_all, s, xt_all, yt_all, t, offset=0, both=True, **kw)
    # Local loss: own image rows against all texts, own text rows against all images.
    offset = rank * x.shape[0]
    c_img, d_img = distill_block_loss(x, y_all, s, xt, yt_all, t, offset=offset, both=False, **kw)
    c_txt, d_txt = distill_block_loss(y, x_all, s, yt, xt_all, t, offset=offset, both=False, **kw)
    return (c_img + c_txt) / 2, (d_img + d_txt) / 2
