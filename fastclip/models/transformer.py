"""Layers shared by both towers: pre-norm blocks, the block stack with gradient checkpointing, the
SigLIP attention-pool ("MAP") head.

One block, in plain PyTorch (x: (B, T, W))::

    x = x + ls1 * attn(norm1(x))         # multi-head self-attention, fused qkv projection
    x = x + ls2 * fc2(act(fc1(norm2(x))))
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastclip.models.attention import attention


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return functools.partial(F.gelu, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"act: expected one of ('gelu', 'gelu_tanh', 'quick_gelu'), got {name!r}")


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = activation(act)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)  # rows: [q; k; v], as open_clip's in_proj
        self.proj = nn.Linear(width, width)

    def forward(self, x, *, causal=False, impl="auto", cu_seqlens=None, max_seqlen=None):
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).unbind(2)  # each (B, T, H, Dh)
        out = attention(q, k, v, causal=causal, impl=impl, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.proj(out.reshape(b, t, w))


class Block(nn.Module):
    def __init__(self, width, heads, mlp_dim, act, norm_eps, qkv_bias=True, ls_init=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = SelfAttention(width, heads, qkv_bias)
        self.ls1 = LayerScale(width, ls_init) if ls_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_dim, act)
        self.ls2 = LayerScale(width, ls_init) if ls_init is not None else nn.Identity()

    def forward(self, x, causal=False, impl="auto", cu_seqlens=None, max_seqlen=None):
        x = x + self.ls1(
            self.attn(self.norm1(x), causal=causal, impl=impl, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        )
        return x + self.ls2(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of pre-norm blocks. ``grad_checkpointing`` recomputes each block in backward
    (non-reentrant ``torch.utils.checkpoint``), only while training with autograd on."""

    def __init__(self, width, depth, heads, mlp_dim, act, norm_eps, qkv_bias=True, ls_init=None):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Block(width, heads, mlp_dim, act, norm_eps, qkv_bias, ls_init) for _ in range(depth)]
        )
        self.grad_checkpointing = False

    def forward(self, x, *, causal=False, impl="auto", cu_seqlens=None, max_seqlen=None):
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            if ckpt:
                fn = functools.partial(
                    blk, causal=causal, impl=impl, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
                )
                x = checkpoint(fn, x, use_reentrant=False)
            else:
                x = blk(x, causal=causal, impl=impl, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return x


class AttentionPool(nn.Module):
    """SigLIP's multihead attention pooling head: a learned probe attends to all tokens, then a
    residual MLP. Returns one vector per image: (B, T, W) -> (B, W)."""

    def __init__(self, width, heads, mlp_dim, act, norm_eps):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x, *, impl="auto", segment_ids=None, num_segments=None):
        """``segment_ids`` ((T,), with x of shape (1, T, W)): pool each packed image separately."""
        b, t, w = x.shape
        h, dh = self.heads, w // self.heads
        k, v = self.kv(x).view(b, t, 2, h, dh).unbind(2)  # (B, T, H, Dh)
        q = self.q(self.probe).view(1, 1, h, dh)
        if segment_ids is None:
            out = attention(q.expand(b, 1, h, dh), k, v, impl=impl).reshape(b, 1, w)
        else:
            # One probe per packed image; each sees only its own image's tokens.
            n = int(num_segments)
            mask = segment_ids[None, :] == torch.arange(n, device=x.device)[:, None]  # (n, T)
            qs = q.expand(1, n, h, dh).transpose(1, 2)  # (1, H, n, Dh)
            if impl == "math":
                s = (qs.float() @ k.transpose(1, 2).float().transpose(-1, -2)) * dh**-0.5
                s = s.masked_fill(~mask, float("-inf"))
                o = (s.softmax(-1) @ v.transpose(1, 2).float()).to(x.dtype)
            else:
                o = F.scaled_dot_product_attention(qs, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
            out = o.transpose(1, 2).reshape(n, 1, w)
        out = self.proj(out)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


def init_transformer_(tr: Transformer, width: int) -> None:
    """open_clip / GPT-2 style init: N(0, 0.02) weights, residual projections scaled by 1/sqrt(2·depth)."""
    depth = len(tr.blocks)
    for blk in tr.blocks:
        for lin in (blk.attn.qkv, blk.mlp.fc1):
            nn.init.normal_(lin.weight, std=width**-0.5)
        for lin in (blk.attn.proj, blk.mlp.fc2):
            nn.init.normal_(lin.weight, std=(width**-0.5) / math.sqrt(2 * depth))
        for lin in (blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2):
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


def check_attn_impl(impl) -> str:
    from fastclip.models.configs import ATTN_IMPLS

    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {impl!r}")
    return impl


__all__ = ["Block", "Transformer", "AttentionPool", "MLP", "SelfAttention", "LayerScale", "activation"]
