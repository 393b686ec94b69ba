"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments, same ``forward`` signature, same return conventions, same helper
methods (``get_logits``, ``get_ground_truth``); fastclip-only options are keyword-only and come
after open_clip's. The modules are thin shells: flags and process-group checks here, inputs checked
by ``fastclip.ops.inputs.prepare``, the math in ``fastclip.ops`` / ``fastclip.distributed``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastclip import _checks
from fastclip.comm import all_gather_rows, all_gather_with_grad
from fastclip.distributed.clip import CLIP_DIST_IMPLS, clip_loss_distributed_fused
from fastclip.distributed.siglip import SIGLIP_DIST_IMPLS, siglip_loss_distributed_fused
from fastclip.functional import clip_loss, siglip_loss
from fastclip.ops.amp import no_autocast
from fastclip.ops.inputs import nan_if_not_finite, prepare
from fastclip.reference import clip_loss_distributed_reference, siglip_loss_distributed_reference


def _check_rank(rank, world_size) -> None:
    _checks.check_int("world_size", world_size, minimum=1)
    _checks.check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(
            f"rank: expected an int in [0, {world_size}) for world_size={world_size}, got {rank}"
        )


def _resolve_group(group, rank: int, world_size: int) -> tuple[int, int]:
    """(rank, world_size) from ``group`` when given, checked against explicit ``rank``/``world_size``."""
    if group is None:
        return rank, world_size
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "group: expected a process group of an initialized torch.distributed, got one without it"
        )
    g_rank = dist.get_rank(group)  # -1 when this process is not a member
    if g_rank < 0:
        raise ValueError(
            f"group: expected a group that contains this process (global rank {dist.get_rank()})"
        )
    g_size = dist.get_world_size(group)
    if (rank, world_size) != (0, 1) and (rank, world_size) != (g_rank, g_size):
        raise ValueError(
            f"rank/world_size: expected the group's ({g_rank}, {g_size}) or the defaults (0, 1) when group "
            f"is given, got ({rank}, {world_size})"
        )
    return g_rank, g_size


def _check_world(group, rank: int, world_size: int) -> None:
    """Before a distributed forward: torch.distributed is up and agrees with rank/world_size."""
    if group is not None:
        return  # checked in __init__ (rank and world size came from the group)
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"world_size={world_size} needs torch.distributed: call torch.distributed.init_process_group(...) "
            "before the first forward"
        )
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(
            f"rank/world_size: expected the default group's ({dist.get_rank()}, {dist.get_world_size()}), "
            f"got ({rank}, {world_size}); pass group= to use another process group"
        )


def gather_like_open_clip(a, b, *, local_loss, gather_with_grad, rank, group):
    """open_clip's ``gather_features`` for one (image, text) pair: ``(W·n, D)`` each, in rank order.

    With grad: a differentiable all-gather (gradients summed over ranks). Without: a plain gather,
    and for the global loss the local slot is the local tensor itself (gradients of the own rows only).
    One collective for both tensors (concatenated along the feature dim).
    """
    d = a.shape[1]
    both = torch.cat([a, b], dim=1)
    if gather_with_grad:
        gathered = all_gather_with_grad(both, group)
    else:
        gathered = all_gather_rows(both, group)
        if not local_loss:
            n = a.shape[0]
            gathered = torch.cat([gathered[: rank * n], both, gathered[(rank + 1) * n :]], dim=0)
    return gathered[:, :d], gathered[:, d:]


class _LossBase(nn.Module):
    """What both modules share: fastclip's keyword options and the multi-rank prologue."""

    def _init_options(self, impl, group, chunk_size, check_finite, check_batch_sizes, rank, world_size):
        _checks.check_bool("check_finite", check_finite)
        _checks.check_bool("check_batch_sizes", check_batch_sizes)
        _check_rank(rank, world_size)
        _checks.check_impl(impl)
        self.rank, self.world_size = _resolve_group(group, rank, world_size)
        self.impl = impl
        self.group = group
        self.chunk_size = _checks.check_chunk_size(chunk_size)
        self.check_finite = check_finite
        self.check_batch_sizes = check_batch_sizes

    def _prepare_distributed(self, image_features, text_features, logit_scale, logit_bias):
        """The process group, the inputs, the implementation and (unless turned off) equal local
        batches, dtypes and devices on every rank."""
        from fastclip import comm

        _check_world(self.group, self.rank, self.world_size)
        a = prepare(
            image_features, text_features, logit_scale, logit_bias,
            impl=self.impl, chunk_size=self.chunk_size, check_finite=self.check_finite,
        )  # fmt: skip
        if self.check_batch_sizes:
            comm.check_batch_sizes(a.x, self.group)
        return a


class ClipLoss(_LossBase):
    """CLIP softmax contrastive loss (open_clip ``ClipLoss`` semantics), fused and memory-bounded.

    ``forward(image_features (n, D), text_features (n, D), logit_scale, logit_bias=None, output_dict=False)``
    returns a 0-dim float32 loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    fastclip-only keywords: ``impl`` ("auto" | "triton" | "torch" | "reference"), ``dist_impl``
    ("gather" | "ring"), ``group`` (a process group; rank and world size then come from it),
    ``chunk_size`` (rows per chunk of the "torch" implementation), ``check_finite`` (raise on NaN/Inf
    inputs instead of returning a NaN loss), ``check_batch_sizes`` (with more than one rank: one
    all-gather of four integers per call, so that unequal batches or dtypes raise instead of hanging).

    With ``world_size > 1`` (or a group of several ranks) each rank's loss and gradients equal
    open_clip's with the same ``local_loss``/``gather_with_grad`` (quirks included, see
    docs/distributed.md); no rank builds an n×N matrix. ``dist_impl="gather"`` all-gathers the
    features (memory O(N·D)); ``"ring"`` passes them around the ring by P2P (memory O(n·D)).
    Works under ``torch.autocast`` (computes in float32 inside; see docs/design.md).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        impl: str = "auto",
        dist_impl: str = "gather",
        group=None,
        chunk_size: int | None = None,
        check_finite: bool = False,
        check_batch_sizes: bool = True,
    ):
        super().__init__()
        for name, value in (
            ("local_loss", local_loss),
            ("gather_with_grad", gather_with_grad),
            ("cache_labels", cache_labels),
            ("use_horovod", use_horovod),
        ):
            _checks.check_bool(name, value)
        if use_horovod:
            raise ValueError("use_horovod: expected False (fastclip uses torch.distributed), got True")
        if dist_impl not in CLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl: expected one of {CLIP_DIST_IMPLS}, got {dist_impl!r}")
        self._init_options(impl, group, chunk_size, check_finite, check_batch_sizes, rank, world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: the loss path builds no labels
        self.use_horovod = use_horovod
        self.dist_impl = dist_impl
        self.prev_num_logits = 0
        self.labels = {}

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            loss = self._forward_distributed(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = clip_loss(
                image_features, text_features, logit_scale, logit_bias,
                impl=self.impl, chunk_size=self.chunk_size, check_finite=self.check_finite,
            )  # fmt: skip
        return {"contrastive_loss": loss} if output_dict else loss

    def _forward_distributed(self, image_features, text_features, logit_scale, logit_bias):
        a = self._prepare_distributed(image_features, text_features, logit_scale, logit_bias)
        flags = dict(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, group=self.group)
        if a.impl == "reference":
            with no_autocast(a.x.device):
                loss = clip_loss_distributed_reference(a.x, a.y, a.scale, a.bias, **flags)
                return nan_if_not_finite(loss, a.x, a.y, a.scale, a.bias)
        return clip_loss_distributed_fused(a, dist_impl=self.dist_impl, **flags)

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        """open_clip's labels: ``arange(num_logits)`` (+ ``num_logits * rank`` with ``local_loss`` on
        several ranks), cached per device with ``cache_labels`` as open_clip does. For logging and
        metrics; the loss path never builds them."""
        if self.cache_labels and self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        if self.cache_labels:
            self.labels[device] = labels
            self.prev_num_logits = num_logits
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``(logits_per_image, logits_per_text)``, gathered across ranks as its flags say.

        **Materializes** the n×N (or N×N) matrices by nature: for logging and retrieval metrics,
        never called by the loss.
        """
        a = prepare(image_features, text_features, logit_scale, logit_bias, impl="reference",
                    chunk_size=None, check_finite=False)  # fmt: skip
        x, y = a.x, a.y
        if self.world_size > 1:
            _check_world(self.group, self.rank, self.world_size)
            all_x, all_y = gather_like_open_clip(
                x, y, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, rank=self.rank,
                group=self.group,
            )  # fmt: skip
            if self.local_loss:
                logits_per_image = a.scale * x @ all_y.T
                logits_per_text = a.scale * y @ all_x.T
            else:
                logits_per_image = a.scale * all_x @ all_y.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = a.scale * x @ y.T
            logits_per_text = a.scale * y @ x.T
        if a.bias is not None:
            if self.world_size > 1 and not self.local_loss:
                # open_clip's quirk: its in-place adds hit one storage (logits_per_text is a transposed
                # view of logits_per_image), so both carry the bias twice (see fastclip/reference.py).
                logits_per_image = logits_per_image + 2 * a.bias
                return logits_per_image, logits_per_image.T
            logits_per_image = logits_per_image + a.bias
            logits_per_text = logits_per_text + a.bias
        return logits_per_image, logits_per_text


class SigLipLoss(_LossBase):
    """SigLIP sigmoid loss (open_clip ``SigLipLoss`` semantics), fused and memory-bounded.

    ``SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=None, *, ...)``:
    open_clip's arguments in open_clip's order; ``chunk_size`` (open_clip's fifth argument) is the
    number of rows computed at a time, ``0`` or None for fastclip's default budget — the numbers do
    not depend on it. ``forward(image_features (n, D), text_features (n, D), logit_scale,
    logit_bias=None, output_dict=False)``; ``logit_bias=None`` computes without a bias (no bias
    gradient). ``dist_impl``: "bidir" (default, as open_clip), "shift", "reduce", "gather": all give
    open_clip's numbers; "bidir"/"shift" pass text chunks by P2P (memory O(n·D)), "gather"/"reduce"
    share one all-gather path (memory O(N·D)). Other keywords as :class:`ClipLoss`.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        chunk_size: int | None = None,
        *,
        impl: str = "auto",
        group=None,
        check_finite: bool = False,
        check_batch_sizes: bool = True,
    ):
        super().__init__()
        _checks.check_bool("cache_labels", cache_labels)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl: expected one of {SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
        if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size == 0:
            chunk_size = None  # open_clip's "no chunking": fastclip's default budget, same numbers
        self._init_options(impl, group, chunk_size, check_finite, check_batch_sizes, rank, world_size)
        self.cache_labels = cache_labels
        self.dist_impl = dist_impl
        self.prev_num_logits = 0
        self.labels = {}

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            loss = self._forward_distributed(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = siglip_loss(
                image_features, text_features, logit_scale, logit_bias,
                impl=self.impl, chunk_size=self.chunk_size, check_finite=self.check_finite,
            )  # fmt: skip
        return {"contrastive_loss": loss} if output_dict else loss

    def _forward_distributed(self, image_features, text_features, logit_scale, logit_bias):
        a = self._prepare_distributed(image_features, text_features, logit_scale, logit_bias)
        if a.impl == "reference":
            with no_autocast(a.x.device):
                loss = siglip_loss_distributed_reference(a.x, a.y, a.scale, a.bias, group=self.group)
                return nan_if_not_finite(loss, a.x, a.y, a.scale, a.bias)
        return siglip_loss_distributed_fused(a, dist_impl=self.dist_impl, group=self.group)

    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        """open_clip's ``(num_logits, num_logits)`` labels: +1 on the diagonal, -1 elsewhere (all -1
        with ``negative_only``). **Materializes** a B×B matrix: for metrics, never used by the loss."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's local ``logit_scale * image_features @ text_features.T (+ logit_bias)``.
        **Materializes** the n×n matrix: for logging and metrics, never called by the loss."""
        a = prepare(image_features, text_features, logit_scale, logit_bias, impl="reference",
                    chunk_size=None, check_finite=False)  # fmt: skip
        logits = a.scale * a.x @ a.y.T
        return logits if a.bias is None else logits + a.bias


__all__ = ["ClipLoss", "SigLipLoss"]
