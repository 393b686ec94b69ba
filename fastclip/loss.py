"""The module path of ``open_clip.loss``: change the import line, keep the rest of the code.

# from open_clip.loss import ClipLoss, SigLipLoss, DistillClipLoss, CoCaLoss
from fastclip.loss import ClipLoss, SigLipLoss, DistillClipLoss, CoCaLoss
"""

from fastclip.losses import ClipLoss, SigLipLoss
from fastclip.losses_distill import CoCaLoss, DistillClipLoss

__all__ = ["ClipLoss", "CoCaLoss", "DistillClipLoss", "SigLipLoss"]
