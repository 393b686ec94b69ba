"""Materialized losses with open_clip's semantics: the ground truth for tests, the baseline for benchmarks.

These build the full logit matrix on purpose. They compute in the input dtype, exactly as open_clip's
``ClipLoss``/``SigLipLoss`` do, so that "error of the reference in dtype X against float64" is the
yardstick for the error budgets of the fused implementations (tests use ``err <= 2 * err_ref + eps``).

They are the raw open_clip math: infinite features can give an infinite loss here, where the public
API (``fastclip.clip_loss(..., impl="reference")``) turns any non-finite input into a NaN loss.

The distributed references use ``torch.distributed`` directly (``all_gather`` into a list; where
gradients flow through the gather, as in open_clip, an ``all_reduce`` of the gradient) and nothing
of fastclip: the ground truth shares no code with what it verifies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gather(t: torch.Tensor, group) -> torch.Tensor:
    """All ranks' ``t`` stacked along dim 0 in group-rank order, as constants (no gradient)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.detach().contiguous(), group=group)
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient (an all-reduce) and keeps the own block.

    Deliberately not the reduce-scatter of ``fastclip.comm``: same mathematics, independent code.
    (``torch.distributed.nn.functional.all_gather`` would do, but its backward fails on subgroups in
    torch 2.13: it passes a global rank where ``scatter`` expects a group rank.)
    """

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        ctx.rank, ctx.n = dist.get_rank(group), t.shape[0]
        return _gather(t, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def _gather_with_grad(t: torch.Tensor, group) -> torch.Tensor:
    """All ranks' ``t`` stacked along dim 0; the gradient of each block goes back to its owner (summed)."""
    return _GatherWithGrad.apply(t, group)


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


# ----------------------------------------------------------------------------------------------------
# Distributed references: open_clip's semantics over a process group, materialized on every rank.


def clip_loss_distributed_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    group=None,
) -> torch.Tensor:
    """open_clip ``ClipLoss`` with ``world_size > 1`` over ``group``: gathers the features and builds
    ``(n, N)`` (``local_loss``) or ``(N, N)`` logits on every rank. Reproduces each quirk below.
    """
    rank = dist.get_rank(group)
    n = image_features.shape[0]
    if gather_with_grad:
        # Quirk: the gathered features carry gradients to their owners (backward = reduce-scatter),
        # so every rank's loss sends gradient to every rank's features. With local_loss=False each
        # rank's loss is the global loss, and its features receive the sum of W identical
        # gradients: W times the gradient of the global loss (logit_scale keeps 1x).
        all_x = _gather_with_grad(image_features, group)
        all_y = _gather_with_grad(text_features, group)
    else:
        all_x = _gather(image_features, group)  # constants: no gradient to anyone
        all_y = _gather(text_features, group)
        if not local_loss:
            # Quirk: open_clip puts the local tensors back in their slot so that the local rows keep a
            # gradient; the gradient a rank gets is then exactly d(global loss)/d(own features).
            # With local_loss=True it does not: the gathered copies stay constants, so the image
            # features only get the image-row terms and the text features only the text-row terms.
            all_x = torch.cat([all_x[: rank * n], image_features, all_x[(rank + 1) * n :]])
            all_y = torch.cat([all_y[: rank * n], text_features, all_y[(rank + 1) * n :]])
    if local_loss:
        logits_per_image = logit_scale * image_features @ all_y.T  # (n, N)
        logits_per_text = logit_scale * text_features @ all_x.T  # (n, N)
        # Positives of the local rows sit at columns rank * n + i of the gathered matrix.
        labels = torch.arange(n, device=image_features.device) + rank * n
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
    else:
        logits_per_image = logit_scale * all_x @ all_y.T  # (N, N)
        if logit_bias is not None:
            # Quirk: open_clip adds the bias in place to logits_per_image and then to logits_per_text,
            # which is a transposed view of the same storage: the bias is added twice. A shift shared
            # by a whole row cancels in the softmax, so the loss and its gradients do not change.
            logits_per_image = logits_per_image + 2 * logit_bias
        logits_per_text = logits_per_image.T
        labels = torch.arange(logits_per_image.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_distributed_reference(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    group=None,
) -> torch.Tensor:
    """open_clip ``SigLipLoss`` with ``world_size > 1`` over ``group`` (every ``dist_impl`` gives these
    numbers: "bidir", "shift", "reduce" and "gather" differ only in how the texts travel).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = image_features.shape[0]
    # Quirk: the exchanged texts carry gradients back to their owner, so a rank's text features get
    # the gradient of every rank's loss (the sum over ranks), while image features, logit_scale and
    # logit_bias get only the local loss's gradient.
    all_y = _gather_with_grad(text_features, group)
    loss = siglip_loss_reference(image_features, text_features, logit_scale, logit_bias)
    for q in range(world):
        if q != rank:
            # Quirk: every block, positive or negative-only, is divided by the *local* n: the loss of
            # a rank is a sum over W blocks, not a mean over the N columns.
            block = all_y[q * n : (q + 1) * n]
            loss = loss + siglip_loss_reference(
                image_features, block, logit_scale, logit_bias, negative_only=True
            )
    return loss


def distill_clip_loss_reference(x, y, s, xt, yt, t):
    """open_clip's ``DistillClipLoss`` of one process, materialized (two B×B matrices):
    ``(contrastive_loss, distill_loss)`` for student ``x, y, s`` and teacher ``xt, yt, t``."""
    ls = s * x @ y.T
    lt = t * xt @ yt.T
    labels = torch.arange(x.shape[0], device=x.device)
    ce = F.cross_entropy
    contrastive = (ce(ls, labels) + ce(ls.T, labels)) / 2

    def kl(teacher, student):
        return -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    return contrastive, (kl(lt, ls) + kl(lt.T, ls.T)) / 2
