"""fastclip: fused, memory-bounded CLIP and SigLIP losses, encoder towers and a large-batch trainer.

from fastclip import ClipLoss, SigLipLoss      # drop-in for open_clip's classes (also DistillClipLoss, CoCaLoss)
from fastclip.loss import ClipLoss             # the module path of open_clip.loss
from fastclip import clip_loss, siglip_loss    # functional forms
from fastclip import info_nce_loss, InfoNCELoss  # the contrastive family: hard negatives, directions, ids, ...
from fastclip import gist_loss, GistLoss          # GISTEmbed's guided in-batch negatives
"""

import sys as _sys

__version__ = "0.1.0"

# Every name is imported on first use (`fastclip.X` or `from fastclip import X`), so that `import fastclip`
# and the `fastclip` command (`fastclip --help`) do not pay for torch until something needs it.
# name -> module that defines it
_LAZY = {
    "clip_loss": "fastclip.functional",
    "distill_clip_loss": "fastclip.functional",
    "siglip_loss": "fastclip.functional",
    "info_nce_loss": "fastclip.functional",
    "gist_loss": "fastclip.functional",
    "InfoNCELoss": "fastclip.losses_family",
    "GistLoss": "fastclip.losses_family",
    "ClipLoss": "fastclip.losses",
    "SigLipLoss": "fastclip.losses",
    "CoCaLoss": "fastclip.losses_distill",
    "DistillClipLoss": "fastclip.losses_distill",
    "create_model": "fastclip.models",
    "list_models": "fastclip.models",
    "load_pretrained": "fastclip.models",
    "create_model_and_transforms": "fastclip.models",
    "create_model_from_pretrained": "fastclip.models",
    "get_tokenizer": "fastclip.models",
    "list_pretrained": "fastclip.models",
    "clip_loss_distributed": "fastclip.distributed",
    "siglip_loss_distributed": "fastclip.distributed",
    "info_nce_loss_distributed": "fastclip.distributed",
    "gist_loss_distributed": "fastclip.distributed",
}


# torch.ops.fastclip.* (the custom ops torch.compile traces through) are registered when fastclip.ops is
# imported. When torch is loaded already, importing it costs little: do it, so that `import torch, fastclip`
# registers them as it always did; the `fastclip` command and a bare `import fastclip` stay torch-free.
if "torch" in _sys.modules:
    import fastclip.ops.library  # noqa: F401


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip __getattr__
        return value
    raise AttributeError(f"module 'fastclip' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["__version__", *_LAZY]
