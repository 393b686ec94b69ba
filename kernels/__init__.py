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

if __name__ == "kernels":
    # Imported as the top-level ``kernels``: Python was started in the checkout's root (``python -m
    # pytest``, ``python -m fastclip.cli``, ``torchrun -m``, ``python -c``), which puts the root first on
    # sys.path. That name belongs to another package (Hugging Face's ``kernels``, which transformers
    # imports): hand the import over to the installed one, or fail as if this folder were not here.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _rest = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    _spec = _machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            "No module named 'kernels' (the checkout's kernels/ folder is fastclip.kernels, not a top-level "
            "package)",
            name="kernels",
        )
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        _sys.modules.pop("kernels", None)
        raise
