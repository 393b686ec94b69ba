"""fastclip: fused, memory-bounded CLIP and SigLIP losses, encoder towers and a large-batch trainer.

from fastclip import ClipLoss, SigLipLoss      # drop-in for open_clip's classes (also DistillClipLoss, CoCaLoss)
from fastclip.loss import ClipLoss             # the module path of open_clip.loss
from fastclip import clip_loss, siglip_loss    # functional forms
"""

from fastclip.functional import clip_loss, distill_clip_loss, siglip_loss
from fastclip.losses import ClipLoss, SigLipLoss
from fastclip.losses_distill import CoCaLoss, DistillClipLoss

__version__ = "0.1.0"

# The model API is imported on first use so that `import fastclip` stays light for loss-only users.
_LAZY = {
    "create_model": "fastclip.models",
    "list_models": "fastclip.models",
    "load_pretrained": "fastclip.models",
    "create_model_and_transforms": "fastclip.models",
    "create_model_from_pretrained": "fastclip.models",
    "get_tokenizer": "fastclip.models",
    "list_pretrained": "fastclip.models",
    "clip_loss_distributed": "fastclip.distributed",
    "siglip_loss_distributed": "fastclip.distributed",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastclip' has no attribute {name!r}")


__all__ = [
    "ClipLoss",
    "CoCaLoss",
    "DistillClipLoss",
    "SigLipLoss",
    "clip_loss",
    "distill_clip_loss",
    "siglip_loss",
    "__version__",
    *_LAZY,
]
