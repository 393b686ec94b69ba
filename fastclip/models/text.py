"""Text Transformer tower: token and position embeddings, causal (CLIP) or bidirectional (SigLIP)
blocks, final norm, pooling by argmax-EOT / eos id / last / first token, projection.

    tower = TextTransformer(TextConfig(context_length=16, vocab_size=512, width=96, depth=2, heads=4), embed_dim=64)
    feats = tower(ids)     # (B, T) int64 with T <= context_length -> (B, 64)

Texts longer than ``context_length`` are an error here; tokenizers truncate (WordTokenizer keeps the
end-of-text token as the last position).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastclip.models.configs import TextConfig
from fastclip.models.host_checked import values_checked
from fastclip.models.transformer import Transformer, check_attn_impl, init_transformer_


def _is_compiling() -> bool:
    return bool(hasattr(torch, "compiler") and torch.compiler.is_compiling())


class TextTransformer(nn.Module):
    def __init__(self, config: TextConfig, embed_dim: int, attn_impl: str = "auto"):
        super().__init__()
        if not isinstance(config, TextConfig):
            raise TypeError(f"config: expected a TextConfig, got {type(config).__name__}")
        c = self.config = config
        self.attn_impl = check_attn_impl(attn_impl)
        self.token_embed = nn.Embedding(c.vocab_size, c.width)
        self.pos_embed = nn.Parameter(torch.zeros(c.context_length, c.width))
        self.transformer = Transformer(
            c.width, c.depth, c.heads, c.mlp_dim, c.act, c.norm_eps, c.qkv_bias, c.ls_init
        )
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)
        self.proj = nn.Linear(c.width, embed_dim, bias=c.proj_bias) if c.proj else nn.Identity()
        self.output_dim = embed_dim if c.proj else c.width
        self.reset_parameters()

    def reset_parameters(self) -> None:
        w = self.config.width
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        init_transformer_(self.transformer, w)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=w**-0.5)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def check_ids(self, ids) -> None:
        c = self.config
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"texts: expected a torch.Tensor of token ids, got {type(ids).__name__}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"texts: expected an integer tensor (int64) of token ids, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"texts: expected a 2-D (B, T) tensor, got shape {tuple(ids.shape)}")
        if ids.shape[1] == 0 or ids.shape[1] > c.context_length:
            raise ValueError(
                f"texts: expected 1 <= T <= context_length={c.context_length} tokens per text, got T={ids.shape[1]} "
                "(tokenize with truncation to the context length)"
            )
        if ids.numel() and not _is_compiling() and not values_checked():
            lo, hi = torch.stack([ids.min(), ids.max()]).tolist()  # one host sync
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"texts: expected token ids in [0, {c.vocab_size}), got ids in [{lo}, {hi}]")

    def pool_index(self, ids: torch.Tensor) -> torch.Tensor:
        """Position pooled for each text: (B,) int64."""
        pool = self.config.pool
        if pool == "argmax":  # end-of-text has the largest id (OpenAI CLIP convention)
            return ids.argmax(dim=-1)
        if pool == "eos":  # first occurrence of eos_id (Hugging Face CLIP); 0 when absent
            return (ids == self.config.eos_id).int().argmax(dim=-1)
        if pool == "last":
            return torch.full_like(ids[:, 0], ids.shape[1] - 1)
        return torch.zeros_like(ids[:, 0])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) integer ids -> (B, output_dim)."""
        self.check_ids(ids)
        t = ids.shape[1]
        x = self.token_embed(ids) + self.pos_embed[:t].to(self.token_embed.weight.dtype)  # (B, T, W)
        x = self.transformer(x, causal=self.config.causal, impl=self.attn_impl)
        x = x[torch.arange(x.shape[0], device=x.device), self.pool_index(ids)]  # (B, W)
        return self.proj(self.norm(x))  # LayerNorm is per token: pooling first is the same
