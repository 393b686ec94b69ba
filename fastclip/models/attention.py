"""Multi-head attention behind one switch: ``attn_impl = "auto" | "flash_attn" | "xformers" | "sdpa" | "math"``.

    out = attention(q, k, v, causal=False, impl="auto")          # q, k, v, out: (B, T, H, Dh)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=m)        # packed: B == 1, cu = [0, T_1, T_1+T_2, ...]

Equivalent plain PyTorch (the "math" backend, which upcasts to float32 and is the reference)::

    s = (q.transpose(1, 2) @ k.transpose(1, 2).mT) * Dh**-0.5   # (B, H, T, T), plus -inf where masked
    out = (s.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)

Backends:
- ``flash_attn``: FlashAttention 2 (``flash_attn``) or 3 (``flash_attn_interface``), CUDA and fp16/bf16 only;
  packed sequences use ``flash_attn_varlen_func`` (no mask is materialized).
- ``xformers``: ``memory_efficient_attention``; packed sequences use a ``BlockDiagonalMask``. xformers has
  no CPU kernel.
- ``sdpa``: ``F.scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels on GPU); packed
  sequences get a boolean block-diagonal mask of T x T (memory O(T^2): fine for packs of a few thousand
  tokens; use flash_attn or xformers for more).
- ``math``: explicit softmax attention in float32.
- ``auto``: flash_attn for CUDA fp16/bf16 inputs when installed, else xformers on CUDA when installed,
  else sdpa.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastclip.models.configs import ATTN_IMPLS

HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _flash():
    """(flash_attn_func, flash_attn_varlen_func, version) or None when neither FA3 nor FA2 imports."""
    try:  # FlashAttention 3 (Hopper) installs as ``flash_attn_interface``
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func

        return flash_attn_func, flash_attn_varlen_func, 3
    except Exception:
        pass
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        return flash_attn_func, flash_attn_varlen_func, 2
    except Exception:
        return None


@functools.cache
def _xformers():
    try:
        import xformers.ops as xops

        return xops
    except Exception:
        return None


def available_impls() -> list[str]:
    """The backends that can run here (``math`` and ``sdpa`` always; the others when they import)."""
    out = ["sdpa", "math"]
    if _flash() is not None:
        out.insert(0, "flash_attn")
    if _xformers() is not None:
        out.insert(-2, "xformers")
    return out


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype, packed: bool = False) -> str:
    """The concrete backend ``impl`` stands for on ``device``/``dtype``."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if device.type == "cuda":
        if dtype in HALF and _flash() is not None:
            return "flash_attn"
        if _xformers() is not None and (packed or dtype in HALF):
            return "xformers"
    return "sdpa"


def _segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    # position t belongs to segment i when cu[i] <= t < cu[i+1]
    pos = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(pos.dtype), pos, right=True)


def packed_mask(cu_seqlens: torch.Tensor, total: int, causal: bool = False) -> torch.Tensor:
    """Boolean (T, T) block-diagonal mask (True = attend) for a pack described by ``cu_seqlens``."""
    seg = _segment_ids(cu_seqlens, total)
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask = mask & torch.ones(total, total, dtype=torch.bool, device=mask.device).tril()
    return mask


def _math(q, k, v, causal, mask, scale):
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = (t.transpose(1, 2).to(compute) for t in (q, k, v))  # (B, H, T, Dh)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        tq, tk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(dim=-1) @ v).transpose(1, 2)


def _sdpa(q, k, v, causal, mask, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
    if mask is not None and causal:
        tq, tk = q.shape[-2], k.shape[-2]
        mask = mask & torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
        causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    impl: str = "auto",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention. q: (B, Tq, H, Dh), k/v: (B, Tk, H, Dh) -> (B, Tq, H, Dh), in q's dtype.

    ``cu_seqlens`` (int32, (n+1,), starting at 0 and ending at T) marks a packed batch of n sequences in
    one row (B == 1, Tq == Tk): attention stays inside each sequence (block-diagonal). ``max_seqlen`` is
    the longest sequence (needed by varlen flash-attn; computed when omitted).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-D (B, T, H, Dh) tensors, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q, k, v: expected matching batch, heads and head dims, got {q.shape}, {k.shape}, {v.shape}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = cu_seqlens is not None
    if packed:
        if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
            raise ValueError(
                f"q: a packed batch (cu_seqlens given) needs B == 1 and Tq == Tk, got {tuple(q.shape)}"
            )
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens: expected a 1-D tensor [0, ..., T], got shape {tuple(cu_seqlens.shape)}"
            )
    impl = resolve_impl(impl, q.device, q.dtype, packed)

    if impl == "flash_attn":
        fns = _flash()
        if fns is None:
            raise ValueError(
                "attn_impl: 'flash_attn' requested but neither flash_attn nor flash_attn_interface imports"
            )
        if q.device.type != "cuda" or q.dtype not in HALF:
            raise ValueError(
                f"attn_impl: 'flash_attn' needs CUDA fp16/bf16 inputs, got {q.device.type} {q.dtype}"
            )
        func, varlen, _ = fns
        if packed:
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
            m = int(max_seqlen) if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())
            out = varlen(q[0], k[0], v[0], cu, cu, m, m, softmax_scale=scale, causal=causal)
            out = out[0] if isinstance(out, tuple) else out  # FA3 may return (out, lse)
            return out.unsqueeze(0)
        out = func(q, k, v, softmax_scale=scale, causal=causal)
        return out[0] if isinstance(out, tuple) else out

    if impl == "xformers":
        xops = _xformers()
        if xops is None:
            raise ValueError("attn_impl: 'xformers' requested but xformers does not import")
        bias = None
        if packed:
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            bias = xops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens)
            if causal:
                bias = bias.make_causal()
        elif causal:
            bias = xops.LowerTriangularMask()
        return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)

    mask = packed_mask(cu_seqlens.to(q.device), q.shape[1]) if packed else None
    if impl == "math":
        return _math(q, k, v, causal, mask, scale).to(q.dtype)
    return _sdpa(q, k, v, causal, mask, scale)
