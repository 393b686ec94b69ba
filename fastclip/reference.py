"""Materialized losses with open_clip's semantics: the ground truth for tests, the baseline for benchmarks.

These build the full logit matrix on purpose. They compute in the input dtype, exactly as open_clip's
``ClipLoss``/``SigLipLoss`` do, so that "error of the reference in dtype X against float64" is the
yardstick for the error budgets of the fused implementations (tests use ``err <= 2 * err_ref + eps``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Single-process CLIP loss, ``B = n = N``, positives on the diagonal. Materializes two B×B matrices.

    Equivalent to::

        logits = logit_scale * image_features @ text_features.T (+ logit_bias)
        loss = (cross_entropy(logits, arange(B)) + cross_entropy(logits.T, arange(B))) / 2
    """
    logits_per_image = logit_scale * image_features @ text_features.T  # (B, B)
    logits_per_text = logit_scale * text_features @ image_features.T  # (B, B)
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    negative_only: bool = False,
) -> torch.Tensor:
    """Single-block SigLIP loss: ``-sum(logsigmoid(z * logits)) / n`` with ``z = 2*eye - 1`` (or ``-1``)."""
    n = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T  # (n, N)
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = -torch.ones_like(logits)
    if not negative_only:
        labels = labels + 2 * torch.eye(n, logits.shape[1], device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum() / n
