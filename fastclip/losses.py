"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments, same ``forward`` signature, same return conventions, same helper
methods (``get_logits``, ``get_ground_truth``); fastclip-only options are keyword-only and come
after open_clip's. The modules are thin shells: they hold flags checked once at construction (the
options by ``fastclip.ops.inputs.loss_options``, the process group by ``fastclip.distributed.world``)
and call one entry: ``fastclip.functional`` for one process, ``fastclip.distributed`` for several.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastclip import _checks
from fastclip.distributed.clip import CLIP_DIST_IMPLS, clip_loss_distributed_with_options
from fastclip.distributed.siglip import SIGLIP_DIST_IMPLS, siglip_loss_distributed_with_options
from fastclip.distributed.world import check_dist_impl, check_world, gather_like_open_clip, resolve_world
from fastclip.functional import clip_loss_with_options, siglip_loss_with_options
from fastclip.ops.inputs import loss_options, prepare


def _option(name: str) -> property:
    """A module attribute backed by the checked options (``self.options``); setting it re-checks."""

    def get(self):
        return getattr(self.options, name)

    def set_(self, value):
        fields = dataclasses.asdict(self.options) | {name: value}
        self.options = loss_options(**fields)

    return property(get, set_, doc=f"``{name}``, as checked into ``self.options``.")


class _LossBase(nn.Module):
    """What the modules share: fastclip's keyword options, checked once at construction."""

    impl = _option("impl")
    chunk_size = _option("chunk_size")
    check_finite = _option("check_finite")

    def _init_options(self, impl, group, chunk_size, check_finite, check_batch_sizes, rank, world_size):
        self.check_batch_sizes = _checks.check_bool("check_batch_sizes", check_batch_sizes)
        self.options = loss_options(impl=impl, chunk_size=chunk_size, check_finite=check_finite)
        self.rank, self.world_size = resolve_world(group, rank, world_size)
        self.group = group

    def _world(self) -> dict:
        """The keywords of a distributed entry (``check_world`` first: the group is up and agrees)."""
        check_world(self.group, self.rank, self.world_size)
        return dict(options=self.options, group=self.group, check_batch_sizes=self.check_batch_sizes)


class ClipLoss(_LossBase):
    """CLIP softmax contrastive loss (open_clip ``ClipLoss`` semantics), fused and memory-bounded.

    ``forward(image_features (n, D), text_features (n, D), logit_scale, logit_bias=None, output_dict=False)``
    returns a 0-dim float32 loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    fastclip-only keywords: ``impl`` ("auto" | "triton" | "torch" | "reference"), ``dist_impl``
    ("gather" | "ring"), ``group`` (a process group; rank and world size then come from it),
    ``chunk_size`` (rows per chunk of the "torch" implementation), ``check_finite`` (raise on NaN/Inf
    inputs instead of returning a NaN loss), ``check_batch_sizes`` (with more than one rank: one
    all-gather of 16 integers per call, so that unequal batches or dtypes, or one rank's refused
    arguments, raise on every rank instead of hanging).

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
        check_dist_impl(dist_impl, CLIP_DIST_IMPLS)
        self._init_options(impl, group, chunk_size, check_finite, check_batch_sizes, rank, world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: the loss path builds no labels
        self.use_horovod = use_horovod
        self.dist_impl = dist_impl
        self.prev_num_logits = 0
        self.labels = {}

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        args = (image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            loss = clip_loss_distributed_with_options(
                *args, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                dist_impl=self.dist_impl, **self._world(),
            )  # fmt: skip
        else:
            loss = clip_loss_with_options(*args, options=self.options)
        return {"contrastive_loss": loss} if output_dict else loss

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
            check_world(self.group, self.rank, self.world_size)
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
        args = (image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            loss = siglip_loss_distributed_with_options(*args, dist_impl=self.dist_impl, **self._world())
        else:
            loss = siglip_loss_with_options(*args, options=self.options)
        return {"contrastive_loss": loss} if output_dict else loss

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


# gather_like_open_clip: importable from here as before (it lives in fastclip/distributed/world.py).
__all__ = ["ClipLoss", "SigLipLoss"]
