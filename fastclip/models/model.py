"""The two-tower contrastive model.

    model = create_model("tiny")
    out = model(images, texts)     # {"image_features", "text_features", "logit_scale"[, "logit_bias"]}
    loss = ClipLoss()(**out)       # as with open_clip

``logit_scale`` and ``logit_bias`` are parameters of shape (1,) (DeepSpeed rejects 0-dim parameters);
``forward`` returns ``logit_scale.exp()`` and the bias as they are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastclip.models.configs import ModelConfig
from fastclip.models.text import TextTransformer
from fastclip.models.transformer import check_attn_impl
from fastclip.models.vision import VisionTransformer


class CLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a fastclip ModelConfig, got {type(config).__name__}")
        self.config = config
        self.visual = VisionTransformer(config.vision, config.embed_dim, config.attn_impl)
        self.text = TextTransformer(config.text, config.embed_dim, config.attn_impl)
        if self.visual.output_dim != self.text.output_dim:
            raise ValueError(
                f"config: image features ({self.visual.output_dim}) and text features ({self.text.output_dim}) "
                "must have the same dim"
            )
        self.logit_scale = nn.Parameter(torch.full((1,), float(config.init_logit_scale)))
        if config.siglip:
            self.logit_bias = nn.Parameter(torch.full((1,), float(config.init_logit_bias)))
        else:
            self.logit_bias = None
        self.set_grad_checkpointing(config.grad_checkpointing)

    @property
    def is_siglip(self) -> bool:
        return self.logit_bias is not None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Non-reentrant activation checkpointing of every block of both towers (training only)."""
        if not isinstance(enable, bool):
            raise TypeError(f"enable: expected a bool, got {type(enable).__name__}")
        self.visual.transformer.grad_checkpointing = enable
        self.text.transformer.grad_checkpointing = enable
        self.config.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        """Names of parameters usually trained without weight decay: biases, norms, embeddings of
        positions / class token / probe, logit scale and bias (every parameter with fewer than 2 dims,
        plus the position embeddings)."""
        return {n for n, p in self.named_parameters() if p.dim() < 2 or n.endswith(("pos_embed", "probe"))}

    def set_attn_impl(self, impl: str) -> None:
        """Switch the attention backend of both towers ("auto", "flash_attn", "varlen", "xformers", "sdpa", "math")."""
        check_attn_impl(impl)
        self.visual.attn_impl = self.text.attn_impl = impl
        self.config.attn_impl = impl

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim); L2-normalized when ``normalize``."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image_packed(self, images, normalize: bool = False) -> torch.Tensor:
        """A list of (C, H_i, W_i) images of different sizes, packed into one sequence -> (n, embed_dim)."""
        x = self.visual.forward_packed(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, texts: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, T) int64 token ids -> (B, embed_dim); L2-normalized when ``normalize``."""
        x = self.text(texts)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(texts, normalize=True)
        out = {
            "image_features": image_features,
            "text_features": text_features,
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out
