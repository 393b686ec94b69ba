"""Drop-in replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments, same ``forward`` signature, same return conventions; fastclip-only
options are keyword-only and come after open_clip's. The modules are thin shells: argument checks
here, the math in ``fastclip.ops``.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from fastclip import _checks
from fastclip.ops.clip import clip_loss
from fastclip.ops.siglip import siglip_loss

CLIP_DIST_IMPLS = ("gather", "ring")
SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _check_rank(rank, world_size) -> None:
    _checks.check_int("world_size", world_size, minimum=1)
    _checks.check_int("rank", rank, minimum=0)
    if rank >= world_size:
        raise ValueError(f"rank: expected an int in [0, {world_size}) for world_size={world_size}, got {rank}")


class ClipLoss(nn.Module):
    """CLIP softmax contrastive loss (open_clip ``ClipLoss`` semantics), fused and memory-bounded.

    ``forward(image_features (n, D), text_features (n, D), logit_scale, logit_bias=None, output_dict=False)``
    returns a 0-dim float32 loss, or ``{"contrastive_loss": loss}`` with ``output_dict=True``.

    fastclip-only keywords: ``impl`` ("auto" | "triton" | "torch" | "reference"), ``dist_impl``
    ("gather" | "ring"), ``group`` (a process group; rank and world size then come from it),
    ``chunk_size`` (rows per chunk of the "torch" implementation), ``check_finite`` (raise on NaN/Inf
    features instead of returning a NaN loss).
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
        chunk_size: Optional[int] = None,
        check_finite: bool = False,
    ):
        super().__init__()
        for name, value in (
            ("local_loss", local_loss),
            ("gather_with_grad", gather_with_grad),
            ("cache_labels", cache_labels),
            ("use_horovod", use_horovod),
            ("check_finite", check_finite),
        ):
            _checks.check_bool(name, value)
        if use_horovod:
            raise ValueError("use_horovod: expected False (fastclip uses torch.distributed), got True")
        _check_rank(rank, world_size)
        _checks.check_impl(impl)
        if dist_impl not in CLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl: expected one of {CLIP_DIST_IMPLS}, got {dist_impl!r}")
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

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1 or self.group is not None:
            raise NotImplementedError(
                "ClipLoss with world_size > 1 (or a process group) is not implemented yet; "
                f"got world_size={self.world_size}"
            )
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


class SigLipLoss(nn.Module):
    """SigLIP sigmoid loss (open_clip ``SigLipLoss`` semantics), fused and memory-bounded.

    ``forward(image_features (n, D), text_features (n, D), logit_scale, logit_bias, output_dict=False)``;
    ``logit_bias`` is required. Keywords as :class:`ClipLoss`; ``dist_impl`` is one of
    "bidir" (default, as open_clip), "shift", "reduce", "gather".
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        *,
        impl: str = "auto",
        group=None,
        chunk_size: Optional[int] = None,
        check_finite: bool = False,
    ):
        super().__init__()
        _checks.check_bool("cache_labels", cache_labels)
        _checks.check_bool("check_finite", check_finite)
        _check_rank(rank, world_size)
        _checks.check_impl(impl)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl: expected one of {SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.impl = impl
        self.group = group
        self.chunk_size = _checks.check_chunk_size(chunk_size)
        self.check_finite = check_finite

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        if self.world_size > 1 or self.group is not None:
            raise NotImplementedError(
                "SigLipLoss with world_size > 1 (or a process group) is not implemented yet; "
                f"got world_size={self.world_size}"
            )
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


__all__ = ["ClipLoss", "SigLipLoss"]
