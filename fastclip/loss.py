"""The module path of ``open_clip.loss``: change the import line, keep the rest of the code.

# from open_clip.loss import ClipLoss, SigLipLoss
from fastclip.loss import ClipLoss, SigLipLoss
"""

from fastclip.losses import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
