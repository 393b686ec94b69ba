"""Autograd Functions and the functional API; dispatch between implementations (``impl=``)."""

from fastclip.ops.clip import ClipLossFunction, clip_grad, clip_loss, clip_lse
from fastclip.ops.dispatch import resolve_impl, triton_available
from fastclip.ops.siglip import SigLipLossFunction, siglip_block, siglip_loss

__all__ = [
    "ClipLossFunction",
    "SigLipLossFunction",
    "clip_grad",
    "clip_loss",
    "clip_lse",
    "resolve_impl",
    "siglip_block",
    "siglip_loss",
    "triton_available",
]
