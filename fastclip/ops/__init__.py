"""The loss core below the public API: block primitives, their custom ops, the autograd Functions.

Layers, each importing only those above it in this list: ``dispatch`` (impl choice, chunk sizes),
``torch_impl`` (chunked PyTorch block primitives), ``library`` (``torch.ops.fastclip.*`` custom ops
over ``torch_impl`` and ``fastclip.kernels``), ``blocks`` (the primitives behind one switch), ``amp``
and ``inputs`` (autocast handling, the one input-validation path), ``clip``/``siglip`` (Functions).
Nothing here imports ``fastclip.reference`` or ``fastclip.distributed``. See docs/design.md.
"""

from fastclip.ops.blocks import clip_grad, clip_lse, siglip_block
from fastclip.ops.clip import ClipLossFunction
from fastclip.ops.dispatch import resolve_impl, triton_available
from fastclip.ops.siglip import SigLipLossFunction

__all__ = [
    "ClipLossFunction",
    "SigLipLossFunction",
    "clip_grad",
    "clip_lse",
    "resolve_impl",
    "siglip_block",
    "triton_available",
]
