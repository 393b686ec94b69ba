"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments, same ``forward`` signature, same return conventions; fastclip-only
options are keyword-only and come after open_clip's. The modules are thin shells: argument checks
here, the math in ``fastclip.ops``.
"""

from __future__ import annotations

from torch import nn

from fastclip import _checks
from fastclip.ops.clip import clip_loss
from fastclip.ops.dispatch import resolve_impl
from fastclip.ops.siglip import siglip_loss

CLIP_DIST_IMPLS = ("gather", "ring")
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


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


def _resolve(impl: str, features) -> str:
    return resolve_impl(impl, features.device, dtype=features.dtype)


def _check_inputs(
    image_features, text_features, logit_scale, logit_bias, *, bias_required: bool, check_finite
):
    _checks.check_features(image_features, text_features)
    device = image_features.device
    logit_scale = _checks.check_scalar("logit_scale", logit_scale, device=device)
    if logit_bias is None and bias_required:
        raise ValueError("logit_bias: expected a 0-dim or 1-element tensor (SigLIP needs a bias), got None")
    if logit_bias is not None:
        logit_bias = _checks.check_scalar("logit_bias", logit_bias, device=device)
    if check_finite:
        _checks.check_all_finite("image_features", image_features)
        _checks.check_all_finite("text_features", text_features)
    return logit_scale, logit_bias


def _prepare_distributed(module, image_features, text_features, logit_scale, logit_bias, *, bias_required):
    """Checks shared by both modules' multi-rank forward: the process group, the inputs, the
    implementation and (unless turned off) equal local batch sizes. Returns (scale, bias, impl)."""
    from fastclip import distributed

    _check_world(module.group, module.rank, module.world_size)
    logit_scale, logit_bias = _check_inputs(
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        bias_required=bias_required,
        check_finite=module.check_finite,
    )
    impl = _resolve(module.impl, image_features)
    if module.check_batch_sizes:
        distributed.check_batch_sizes(image_features, module.group)
    return logit_scale, logit_bias, impl


class ClipLoss(nn.Module):
    """CLIP softmax contrastive loss (open_clip ``ClipLoss`` semantics), fused and memory-bounded.

    ``forward(image_features (n, D), text_features (n, D), logit_scale, logit_bias=None, output_dict=False)``
    returns a 0-dim float32 loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    fastclip-only keywords: ``impl`` ("auto" | "triton" | "torch" | "reference"), ``dist_impl``
    ("gather" | "ring"), ``group`` (a process group; rank and world size then come from it),
    ``chunk_size`` (rows per chunk of the "torch" implementation), ``check_finite`` (raise on NaN/Inf
    features instead of returning a NaN loss), ``check_batch_sizes`` (with more than one rank: one
    all-gather of the local (n, D) per call, so that unequal batches raise instead of hanging).

    With ``world_size > 1`` (or a group of several ranks) each rank's loss and gradients equal
    open_clip's with the same ``local_loss``/``gather_with_grad`` (quirks included, see
    docs/distributed.md); no rank builds an n×N matrix. ``dist_impl="gather"`` all-gathers the
    features (memory O(N·D)); ``"ring"`` passes them around the ring by P2P (memory O(n·D)).
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
            ("check_finite", check_finite),
            ("check_batch_sizes", check_batch_sizes),
        ):
            _checks.check_bool(name, value)
        if use_horovod:
            raise ValueError("use_horovod: expected False (fastclip uses torch.distributed), got True")
        _check_rank(rank, world_size)
        _checks.check_impl(impl)
        if dist_impl not in CLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl: expected one of {CLIP_DIST_IMPLS}, got {dist_impl!r}")
        rank, world_size = _resolve_group(group, rank, world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: fastclip builds no label tensor
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.impl = impl
        self.dist_impl = dist_impl
        self.group = group
        self.chunk_size = _checks.check_chunk_size(chunk_size)
        self.check_finite = check_finite
        self.check_batch_sizes = check_batch_sizes

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            loss = self._forward_distributed(image_features, text_features, logit_scale, logit_bias)
            return {"contrastive_loss": loss} if output_dict else loss
        loss = clip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            impl=self.impl,
            chunk_size=self.chunk_size,
            check_finite=self.check_finite,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def _forward_distributed(self, image_features, text_features, logit_scale, logit_bias):
        from fastclip import distributed

        logit_scale, logit_bias, impl = _prepare_distributed(
            self, image_features, text_features, logit_scale, logit_bias, bias_required=False
        )
        if impl == "reference":
            from fastclip.reference import clip_loss_distributed_reference

            return clip_loss_distributed_reference(
                image_features,
                text_features,
                logit_scale,
                logit_bias,
                local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad,
                group=self.group,
            )
        return distributed._apply_clip(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            self.local_loss,
            self.gather_with_grad,
            self.dist_impl,
            self.group,
            impl,
            self.chunk_size,
        )


class SigLipLoss(nn.Module):
    """SigLIP sigmoid loss (open_clip ``SigLipLoss`` semantics), fused and memory-bounded.

    ``forward(image_features (n, D), text_features (n, D), logit_scale, logit_bias, output_dict=False)``;
    ``logit_bias`` is required. Keywords as :class:`ClipLoss`; ``dist_impl`` is one of
    "bidir" (default, as open_clip), "shift", "reduce", "gather": all give open_clip's numbers;
    "bidir"/"shift" pass text chunks by P2P (memory O(n·D)), "gather"/"reduce" share one all-gather
    path (memory O(N·D)). ``check_batch_sizes`` as :class:`ClipLoss`.
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        impl: str = "auto",
        group=None,
        chunk_size: int | None = None,
        check_finite: bool = False,
        check_batch_sizes: bool = True,
    ):
        super().__init__()
        _checks.check_bool("cache_labels", cache_labels)
        _checks.check_bool("check_finite", check_finite)
        _checks.check_bool("check_batch_sizes", check_batch_sizes)
        _check_rank(rank, world_size)
        _checks.check_impl(impl)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl: expected one of {SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
        rank, world_size = _resolve_group(group, rank, world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.impl = impl
        self.group = group
        self.chunk_size = _checks.check_chunk_size(chunk_size)
        self.check_finite = check_finite
        self.check_batch_sizes = check_batch_sizes

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        if self.world_size > 1:
            loss = self._forward_distributed(image_features, text_features, logit_scale, logit_bias)
            return {"contrastive_loss": loss} if output_dict else loss
        loss = siglip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            impl=self.impl,
            chunk_size=self.chunk_size,
            check_finite=self.check_finite,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def _forward_distributed(self, image_features, text_features, logit_scale, logit_bias):
        from fastclip import distributed

        logit_scale, logit_bias, impl = _prepare_distributed(
            self, image_features, text_features, logit_scale, logit_bias, bias_required=True
        )
        if impl == "reference":
            from fastclip.reference import siglip_loss_distributed_reference

            return siglip_loss_distributed_reference(
                image_features, text_features, logit_scale, logit_bias, group=self.group
            )
        return distributed._apply_siglip(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            self.dist_impl,
            self.group,
            impl,
            self.chunk_size,
        )


__all__ = ["ClipLoss", "SigLipLoss"]
