"""Vision Transformer tower: patch embedding, optional class token, learned position embeddings,
pre-norm blocks, pooling by class token / mean / attention-pool head, projection.

    tower = VisionTransformer(VisionConfig(image_size=32, patch_size=4, width=96, depth=2, heads=4), embed_dim=64)
    feats = tower(images)                    # (B, 3, 32, 32) -> (B, 64)
    feats = tower.forward_packed([a, b, c])  # images of different sizes, one packed sequence -> (3, 64)

Shapes: N = (H/p)·(W/p) patches, P = N + class token, W = width.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastclip.models.configs import VisionConfig
from fastclip.models.host_checked import values_checked
from fastclip.models.transformer import AttentionPool, Transformer, check_attn_impl, init_transformer_


def _is_compiling() -> bool:
    return bool(hasattr(torch, "compiler") and torch.compiler.is_compiling())


def keep_count(num_patches: int, patch_dropout: float) -> int:
    """Patches FLIP patch dropout keeps: ``max(1, int(num_patches * (1 - patch_dropout)))``."""
    return max(1, int(num_patches * (1.0 - patch_dropout)))


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, embed_dim: int, attn_impl: str = "auto"):
        super().__init__()
        if not isinstance(config, VisionConfig):
            raise TypeError(f"config: expected a VisionConfig, got {type(config).__name__}")
        c = self.config = config
        self.attn_impl = check_attn_impl(attn_impl)
        self.patch_embed = nn.Conv2d(c.in_channels, c.width, c.patch_size, c.patch_size, bias=c.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(c.width)) if c.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(c.grid_size**2 + c.num_prefix_tokens, c.width))
        self.norm_pre = nn.LayerNorm(c.width, eps=c.norm_eps) if c.pre_norm else nn.Identity()
        self.transformer = Transformer(
            c.width, c.depth, c.heads, c.mlp_dim, c.act, c.norm_eps, c.qkv_bias, c.ls_init
        )
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.attn_pool = (
            AttentionPool(c.width, c.heads, c.mlp_dim, c.act, c.norm_eps) if c.pool == "map" else None
        )
        self.proj = nn.Linear(c.width, embed_dim, bias=False) if c.proj else nn.Identity()
        self.output_dim = embed_dim if c.proj else c.width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        w = self.config.width
        nn.init.normal_(self.patch_embed.weight, std=(self.patch_embed.weight[0].numel()) ** -0.5)
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=w**-0.5)
        nn.init.normal_(self.pos_embed, std=0.02)
        init_transformer_(self.transformer, w)
        if self.attn_pool is not None:
            nn.init.normal_(self.attn_pool.probe, std=w**-0.5)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=w**-0.5)

    # ------------------------------------------------------------------ pieces
    def pos_embed_for(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a grid_h x grid_w patch grid: (P, W). The learned grid is resized by
        bicubic interpolation when the grid differs (prefix tokens keep theirs)."""
        c = self.config
        npre, g = c.num_prefix_tokens, c.grid_size
        if (grid_h, grid_w) == (g, g):
            return self.pos_embed
        prefix, grid = self.pos_embed[:npre], self.pos_embed[npre:]
        grid = grid.reshape(1, g, g, c.width).permute(0, 3, 1, 2)  # (1, W, g, g)
        grid = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(grid_h * grid_w, c.width)
        return torch.cat([prefix, grid], dim=0)

    def _check_image(self, name: str, images: torch.Tensor, ndim: int) -> None:
        c = self.config
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(
                f"{name}: expected a floating tensor (float32/bfloat16/float16), got {images.dtype}"
            )
        shape = "(B, C, H, W)" if ndim == 4 else "(C, H, W)"
        if images.dim() != ndim:
            raise ValueError(f"{name}: expected a {ndim}-D {shape} tensor, got shape {tuple(images.shape)}")
        if images.shape[-3] != c.in_channels:
            raise ValueError(f"{name}: expected {c.in_channels} channels, got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % c.patch_size or w % c.patch_size or h == 0 or w == 0:
            raise ValueError(
                f"{name}: expected height and width that are positive multiples of patch_size={c.patch_size}, "
                f"got {h}x{w}"
            )
        if not _is_compiling() and not values_checked() and not bool(torch.isfinite(images).all()):
            raise ValueError(f"{name}: expected finite pixel values, got NaN or Inf")

    def _embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> tokens with position embeddings (B, P, W), prefix tokens first."""
        x = self.patch_embed(x.to(self.patch_embed.weight.dtype))  # (B, W, gh, gw)
        b, w, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        pos = self.pos_embed_for(gh, gw).to(x.dtype)
        npre = self.config.num_prefix_tokens
        x = x + pos[npre:]
        if npre:
            cls = (self.cls_token + pos[0]).to(x.dtype).expand(b, 1, w)
            x = torch.cat([cls, x], dim=1)
        return x

    def _patch_dropout(self, x: torch.Tensor) -> torch.Tensor:
        """FLIP: keep a random subset of patch tokens per image (prefix tokens always kept); train only."""
        p = self.config.patch_dropout
        if not self.training or p <= 0.0:
            return x
        npre = self.config.num_prefix_tokens
        prefix, patches = x[:, :npre], x[:, npre:]
        b, n, w = patches.shape
        keep = keep_count(n, p)
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]  # (B, keep)
        patches = patches.gather(1, idx.unsqueeze(-1).expand(b, keep, w))
        return torch.cat([prefix, patches], dim=1)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        pool = self.config.pool
        if pool == "tok":
            return self.norm(x[:, 0])  # LayerNorm is per token: norm-then-pick equals pick-then-norm
        x = self.norm(x)
        if pool == "mean":
            return x[:, self.config.num_prefix_tokens :].mean(dim=1)
        return self.attn_pool(x, impl=self.attn_impl)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float -> (B, output_dim). H = W = image_size unless ``config.dynamic_size``."""
        self._check_image("images", images, 4)
        c = self.config
        if not c.dynamic_size and tuple(images.shape[-2:]) != (c.image_size, c.image_size):
            raise ValueError(
                f"images: expected {c.image_size}x{c.image_size} images (config.image_size), got "
                f"{images.shape[-2]}x{images.shape[-1]}; set dynamic_size=True to interpolate position "
                "embeddings, or use forward_packed for mixed sizes"
            )
        x = self._embed_tokens(images)
        x = self._patch_dropout(x)
        x = self.norm_pre(x)
        x = self.transformer(x, impl=self.attn_impl)
        return self.proj(self._pool(x))

    def forward_packed(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Patch n' Pack (NaViT): images of different sizes and aspect ratios, each (C, H_i, W_i) with
        sides multiples of the patch size, run as ONE sequence with block-diagonal attention and pooled
        per image. Equals running each image alone (``forward(img[None])`` with ``dynamic_size``).
        Position embeddings are interpolated per image. Returns (n, output_dim).

        The blocks get ``cu_seqlens`` (on the tokens' device) and ``max_seqlen`` (from the host), so the
        attention backend never reads offsets back from the GPU; with ``attn_impl="auto"`` that backend is
        torch's ``varlen_attn`` on CUDA fp16/bf16 (autocast included) and the SDPA block-diagonal mask on
        CPU / fp32 (``fastclip.models.attention.resolve_impl`` says which)."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise ValueError(
                f"images: expected a non-empty list of (C, H, W) tensors, got {type(images).__name__}"
            )
        tokens = []
        for i, img in enumerate(images):
            self._check_image(f"images[{i}]", img, 3)
            tokens.append(self._patch_dropout(self._embed_tokens(img.unsqueeze(0)))[0])  # (P_i, W)
        lens = torch.tensor([t.shape[0] for t in tokens], dtype=torch.int32)
        cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0)).to(tokens[0].device)  # (n+1,)
        x = torch.cat(tokens, dim=0).unsqueeze(0)  # (1, T, W)
        x = self.norm_pre(x)
        x = self.transformer(x, impl=self.attn_impl, cu_seqlens=cu, max_seqlen=int(lens.max()))
        x = x[0]  # (T, W)
        n, pool, npre = len(images), self.config.pool, self.config.num_prefix_tokens
        if pool == "tok":
            pooled = self.norm(x[cu[:-1].long()])
        else:
            x = self.norm(x)
            seg = torch.repeat_interleave(torch.arange(n, device=x.device), lens.to(x.device).long())  # (T,)
            if pool == "mean":
                is_patch = torch.ones_like(seg, dtype=torch.bool)
                is_patch[cu[:-1].long()] = npre == 0  # drop the class token from the mean
                sums = x.new_zeros(n, x.shape[1]).index_add_(0, seg[is_patch], x[is_patch])
                pooled = sums / (lens.to(x.device) - npre).to(x.dtype).unsqueeze(1)
            else:
                pooled = self.attn_pool(x.unsqueeze(0), impl=self.attn_impl, segment_ids=seg, num_segments=n)
        return self.proj(pooled)
