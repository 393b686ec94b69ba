"""The functional loss API of one process: ``clip_loss``, ``siglip_loss``, ``distill_clip_loss``.

This layer offers every ``impl``: the fused ones (``fastclip.ops``) and the materialized
``"reference"`` (``fastclip.reference``), behind the one input-validation path
(``fastclip.ops.inputs.prepare``). Under ``torch.autocast`` the losses compute on their own terms
(autocast off inside, float32 accumulation) and accept the mixed feature dtypes autocast produces.
"""

from __future__ import annotations

import torch

from fastclip import _checks
from fastclip.ops import distill
from fastclip.ops.amp import no_autocast
from fastclip.ops.clip import clip_loss_fused
from fastclip.ops.inputs import nan_if_not_finite, prepare
from fastclip.ops.siglip import siglip_loss_fused
from fastclip.reference import clip_loss_reference, distill_clip_loss_reference, siglip_loss_reference

__all__ = ["clip_loss", "distill_clip_loss", "siglip_loss"]


def _run(a, fused, reference) -> torch.Tensor:
    """The fused loss of checked inputs, or the materialized one (autocast off, NaN for non-finite
    inputs, as the fused paths give)."""
    if a.impl != "reference":
        return fused(a)
    with no_autocast(a.x.device):
        return nan_if_not_finite(reference(a.x, a.y, a.scale, a.bias), a.x, a.y, a.scale, a.bias)


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
    return _run(a, clip_loss_fused, clip_loss_reference)


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
    return _run(a, siglip_loss_fused, siglip_loss_reference)


def distill_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``DistillClipLoss`` of one process's batch, without any B×B matrix.

    Shapes: student ``image_features, text_features (B, D)``, teacher ``dist_image_features,
    dist_text_features (B, Dt)`` (``Dt`` may differ from ``D``), scales 0-dim or 1-element (already
    exponentiated). Returns ``(contrastive_loss, distill_loss)``, 0-dim float32 (float64 for float64
    inputs). Equivalent to::

        ls, lt = logit_scale * x @ y.T, dist_logit_scale * xt @ yt.T
        contrastive = (F.cross_entropy(ls, arange(B)) + F.cross_entropy(ls.T, arange(B))) / 2
        kl = lambda a, b: -(a.softmax(1) * b.log_softmax(1)).sum(1).mean()
        distill = (kl(lt, ls) + kl(lt.T, ls.T)) / 2

    Gradients reach every input that requires grad, the teacher's included (as open_clip's autograd
    gives them; detach the teacher to skip that work). ``impl``, ``chunk_size`` and ``check_finite``
    as :func:`fastclip.clip_loss`. Works under ``torch.autocast`` (computed with autocast off, fp32
    accumulation; mixed feature dtypes, accepted under autocast only, are cast as the
    materialized loss's matmul would cast them).
    """
    x, y, s, xt, yt, t = distill.check_distill_inputs(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
        check_finite=check_finite,
    )  # fmt: skip
    impl = distill.resolve_distill_impl(impl, x, xt)
    chunk_size = _checks.check_chunk_size(chunk_size)
    if impl == "reference":
        with no_autocast(x.device):
            return distill_clip_loss_reference(x, y, s, xt, yt, t)
    return distill.distill_block_loss(
        x, y, s, xt, yt, t, offset=0, both=True, impl=impl, chunk_size=chunk_size
    )
