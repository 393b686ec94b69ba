"""Triton kernels for the fused contrastive losses (installed as ``fastclip.kernels``).

* ``fastclip.kernels.clip``: ``clip_lse`` (row/column log-sum-exp of a block) and ``clip_grad``
  (its gradients) for the CLIP softmax loss.
* ``fastclip.kernels.siglip``: ``siglip_block`` (loss sum and gradients of a block) for the SigLIP loss.
* ``fastclip.kernels.config``: block sizes per GPU architecture and workspace budgets.

Submodules import ``triton``; this package does not, so ``KERNELS_READY`` can be read anywhere.
``KERNELS_READY`` tells ``fastclip.ops`` that the launchers are complete. See docs/kernels.md.
"""

KERNELS_READY = True
