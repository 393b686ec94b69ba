"""Triton kernels for the fused contrastive losses (installed as ``fastclip.kernels``).

* ``fastclip.kernels.clip``: ``clip_lse`` (row/column log-sum-exp of a block) and ``clip_grad``
  (its gradients) for the CLIP softmax loss.
* ``fastclip.kernels.siglip``: ``siglip_block`` (loss sum and gradients of a block) for the SigLIP loss.
* ``fastclip.kernels.common``: the similarity tile, grid order and input checks both use.
* ``fastclip.kernels.gemm``: the cuBLAS half of the gradients (fp32-output GEMMs), the TF32 setting.
* ``fastclip.kernels.config``: block sizes per GPU architecture, workspace budgets, chunk sizing.

Submodules import ``triton``; this package does not, so importing it is cheap anywhere.
See docs/kernels.md.
"""
