"""The functional loss API of one process: ``clip_loss`` and ``siglip_loss``.

This layer offers every ``impl``: the fused ones (``fastclip.ops``) and the materialized
``"reference"`` (``fastclip.reference``), behind the one input-validation path
(``fastclip.ops.inputs.prepare``). Under ``torch.autocast`` the losses compute on their own terms
(autocast off inside, float32 accumulation) and accept the mixed feature dtypes autocast produces.
"""

from __future__ import annotations

import torch

from fastclip.ops.amp import no_autocast
from fastclip.ops.clip import clip_loss_fused
from fastclip.ops.inputs import nan_if_not_finite, prepare
from fastclip.ops.siglip import siglip_loss_fused
from fastclip.reference import clip_loss_reference, siglip_loss_reference

__all__ = ["clip_loss", "siglip_loss"]


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """CLIP softmax loss of one process's batch, without building the B×B logit matrix.

    Shapes: ``image_features (B, D)``, ``text_features (B, D)``, ``logit_scale`` 0-dim or 1-element
    (already exponentiated, as open_clip passes it), optional ``logit_bias`` likewise. Returns a 0-dim
    float32 tensor (float64 for float64 inputs). Equivalent to::

        logits = logit_scale * image_features @ text_features.T
        loss = (F.cross_entropy(logits, arange(B)) + F.cross_entropy(logits.T, arange(B))) / 2

    ``impl``: "auto" (Triton on CUDA, else "torch"), "triton", "torch" (chunked PyTorch, ``chunk_size``
    rows at a time) or "reference" (materialized). NaN/Inf in the features, scale or bias give a NaN
    loss; ``check_finite=True`` raises a ``ValueError`` instead (one reduction and host sync).
    """
    a = prepare(
        image_features, text_features, logit_scale, logit_bias,
        impl=impl, chunk_size=chunk_size, check_finite=check_finite,
    )  # fmt: skip
    if a.impl == "reference":
        with no_autocast(a.x.device):
            loss = clip_loss_reference(a.x, a.y, a.scale, a.bias)
            return nan_if_not_finite(loss, a.x, a.y, a.scale, a.bias)
    return clip_loss_fused(a)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """SigLIP sigmoid loss of one process's batch, without building the B×B logit matrix.

    Shapes: ``image_features (B, D)``, ``text_features (B, D)``; ``logit_scale`` and ``logit_bias``
    0-dim or 1-element tensors (scale already exponentiated; ``logit_bias=None``: no bias, as
    open_clip computes it). Returns a 0-dim float32 tensor (float64 for float64 inputs). Equivalent to::

        logits = logit_scale * image_features @ text_features.T + logit_bias
        labels = 2 * torch.eye(B) - 1
        loss = -F.logsigmoid(labels * logits).sum() / B

    ``impl`` and ``check_finite`` as in :func:`clip_loss`.
    """
    a = prepare(
        image_features, text_features, logit_scale, logit_bias,
        impl=impl, chunk_size=chunk_size, check_finite=check_finite,
    )  # fmt: skip
    if a.impl == "reference":
        with no_autocast(a.x.device):
            loss = siglip_loss_reference(a.x, a.y, a.scale, a.bias)
            return nan_if_not_finite(loss, a.x, a.y, a.scale, a.bias)
    return siglip_loss_fused(a)
