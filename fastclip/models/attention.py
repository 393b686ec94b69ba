"""Multi-head attention behind one switch:
``attn_impl = "auto" | "flash_attn" | "xformers" | "varlen" | "sdpa" | "math"``.

    out = attention(q, k, v, causal=False, impl="auto")          # q, k, v, out: (B, T, H, Dh)
    out = attention(q, k, v, cu_seqlens=cu, max_seqlen=m)        # packed: B == 1, cu = [0, T_1, T_1+T_2, ...]
    resolve_impl("auto", q.device, q.dtype, packed=True, head_dim=Dh)   # the backend that call runs

Equivalent plain PyTorch (the "math" backend, which upcasts to float32 and is the reference)::

    s = (q.transpose(1, 2) @ k.transpose(1, 2).mT) * Dh**-0.5   # (B, H, T, T), plus -inf where masked
    out = (s.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)

Backends:
- ``flash_attn``: FlashAttention 2 (``flash_attn``) or 3 (``flash_attn_interface``), CUDA and fp16/bf16 only;
  packed sequences use ``flash_attn_varlen_func`` (no mask is materialized).
- ``xformers``: ``memory_efficient_attention``; packed sequences use a ``BlockDiagonalMask``. xformers has
  no CPU kernel.
- ``varlen``: torch's own ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10; its FlashAttention-2
  kernel): CUDA sm8x/sm90/sm10x/sm120, fp16/bf16, head dim a multiple of 8 up to 256, forward and
  backward. Packed sequences run as (total_tokens, H, Dh) with ``cu_seqlens``, no mask is materialized;
  a dense batch runs as B sequences of length T.
- ``sdpa``: ``F.scaled_dot_product_attention`` (FlashAttention / memory-efficient kernels on GPU); packed
  sequences get a boolean block-diagonal mask of T x T (memory O(T^2), and the kernels do the masked-out
  work too: the fallback for packs on CPU, in fp32, on old torch or for head dims varlen does not take).
- ``math``: explicit softmax attention in float32.
- ``auto``: on CUDA with fp16/bf16 inputs, flash_attn when installed; else, for packed sequences, varlen
  where it can run (see ``varlen_problem``); else xformers on CUDA when installed (fp16/bf16, or any
  packed batch); else sdpa. ``resolve_impl`` returns the name of the backend a call runs.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from fastclip.models.configs import ATTN_IMPLS

HALF = (torch.float16, torch.bfloat16)


def _is_compiling() -> bool:
    return bool(hasattr(torch, "compiler") and torch.compiler.is_compiling())


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


# What the varlen checks found, by key: a plain dict rather than functools.cache, which torch.compile
# traces through with a warning on every compile.
_VARLEN_MEMO: dict = {}


def _varlen():
    """torch's ``varlen_attn`` (torch >= 2.10), or None when this torch has none."""
    if "fn" not in _VARLEN_MEMO:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except Exception:
            varlen_attn = None
        _VARLEN_MEMO["fn"] = varlen_attn
    return _VARLEN_MEMO["fn"]


def _varlen_params(fn) -> frozenset:
    """The keyword names ``fn`` takes. torch's signature moved: the first version took ``is_causal``
    (and later ``scale``); since then it is ``(..., max_q, max_k, *, return_aux, scale, window_size, ...)``
    with causal attention as ``window_size=(-1, 0)``."""
    key = ("params", fn)
    if key not in _VARLEN_MEMO:
        try:
            _VARLEN_MEMO[key] = frozenset(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            _VARLEN_MEMO[key] = frozenset()
    return _VARLEN_MEMO[key]


def _varlen_device_rule(device: torch.device) -> str | None:
    """Why torch's varlen kernel (the FlashAttention 2 inside torch) cannot run on ``device``, or None.
    The architectures are the ones torch's flash_api.cpp accepts: sm8x, sm90, sm10x, sm120/121."""
    if device.type != "cuda":
        return f"runs on CUDA only, got a {device.type} tensor"
    available = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    if not available():
        return "needs a torch build with FlashAttention kernels (this one has none)"
    major, minor = torch.cuda.get_device_capability(device)
    if not (major in (8, 10) or (major, minor) in ((9, 0), (12, 0), (12, 1))):
        return f"runs on sm8x/sm90/sm10x/sm120 GPUs (torch's FlashAttention 2), got sm{major}{minor}"
    return None


def _varlen_device_problem(device: torch.device) -> str | None:
    """``_varlen_device_rule``, once per device."""
    key = ("device", device.type, device.index)
    if key not in _VARLEN_MEMO:
        _VARLEN_MEMO[key] = _varlen_device_rule(device)
    return _VARLEN_MEMO[key]


def varlen_problem(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
) -> str | None:
    """Why ``impl="varlen"`` cannot run these inputs (a sentence), or None when it can. ``scale``:
    the softmax scale when it is not the default ``head_dim**-0.5``."""
    fn = _varlen()
    if fn is None:
        return (
            f"needs torch.nn.attention.varlen.varlen_attn (torch >= 2.10), not in torch {torch.__version__}"
        )
    problem = _varlen_device_problem(torch.device(device))
    if problem:
        return problem
    if dtype not in HALF:
        return f"takes fp16/bf16 inputs only, got {dtype}"
    if head_dim is not None and (head_dim % 8 or head_dim > 256):
        return f"needs a head dim that is a multiple of 8 and at most 256, got {head_dim}"
    params = _varlen_params(fn)
    if causal and not ({"window_size", "is_causal"} & params):
        return "of this torch has no causal mode"
    if scale is not None and "scale" not in params:
        return "of this torch takes no softmax scale"
    return None


def available_impls() -> list[str]:
    """The backends that can run here, in the order ``auto`` prefers them for a packed fp16/bf16 batch
    (``sdpa`` and ``math`` always; ``flash_attn``/``xformers`` when they import; ``varlen`` when this
    torch has ``varlen_attn`` and the current CUDA device can run it)."""
    out = []
    if _flash() is not None:
        out.append("flash_attn")
    if torch.cuda.is_available() and varlen_problem(torch.device("cuda"), torch.bfloat16) is None:
        out.append("varlen")
    if _xformers() is not None:
        out.append("xformers")
    return out + ["sdpa", "math"]


def resolve_impl(
    impl: str,
    device: torch.device,
    dtype: torch.dtype,
    packed: bool = False,
    *,
    head_dim: int | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> str:
    """The concrete backend ``impl`` stands for on ``device``/``dtype`` (``packed``: a cu_seqlens batch;
    ``head_dim``, ``causal`` and a non-default ``scale`` decide whether varlen can take it). The one place
    where ``auto`` is decided: ``attention`` runs the backend this returns."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl: expected one of {ATTN_IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    cuda = device.type == "cuda"
    if cuda and dtype in HALF and _flash() is not None:
        return "flash_attn"
    if packed and varlen_problem(device, dtype, head_dim, causal=causal, scale=scale) is None:
        return "varlen"  # CUDA only: varlen_problem says so for other devices
    if cuda and _xformers() is not None and (packed or dtype in HALF):
        return "xformers"
    return "sdpa"


def check_cu_seqlens(cu_seqlens, total: int, max_seqlen: int | None = None) -> int | None:
    """Check a packed batch's ``cu_seqlens`` ((n+1,) integers: 0, then non-decreasing, ending at ``total``)
    and return the longest sequence (``max_seqlen`` when given and not checked). The values are read (one
    host copy) when the tensor is on the CPU or ``max_seqlen`` is omitted; a CUDA ``cu_seqlens`` with a
    ``max_seqlen`` is checked for shape and dtype only, so that a forward pass does not wait on the GPU."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(
            f"cu_seqlens: expected a 1-D int32 tensor [0, ..., T], got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens: expected a 1-D tensor [0, ..., T], got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens: expected an integer (int32) tensor, got {cu_seqlens.dtype}")
    if max_seqlen is not None and int(max_seqlen) < 1:
        raise ValueError(f"max_seqlen: expected a positive length, got {max_seqlen}")
    if _is_compiling() or (max_seqlen is not None and cu_seqlens.device.type != "cpu"):
        return None if max_seqlen is None else int(max_seqlen)
    vals = cu_seqlens.tolist()
    if vals[0] != 0 or vals[-1] != total:
        raise ValueError(
            f"cu_seqlens: expected offsets that start at 0 and end at the packed length T={total}, "
            f"got {vals[0]} ... {vals[-1]}"
        )
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    if min(lens) < 0:
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {vals}")
    longest = max(lens)
    if max_seqlen is not None and int(max_seqlen) < longest:
        raise ValueError(f"max_seqlen: {max_seqlen} is shorter than the longest packed sequence ({longest})")
    return longest if max_seqlen is None else int(max_seqlen)


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


def _varlen_attention(q, k, v, causal, cu_seqlens, max_seqlen, scale):
    """torch's varlen_attn on (total, H, Dh) views of q, k, v; a dense batch is B sequences of length T."""
    fn = _varlen()
    b, tq, h, dh = q.shape
    tk = k.shape[1]
    if cu_seqlens is not None:
        cu_q = cu_k = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        max_q = max_k = max_seqlen
        q2, k2, v2 = q[0], k[0], v[0]
    else:
        if causal and tq != tk:
            raise ValueError(f"attn_impl: 'varlen' with causal=True needs Tq == Tk, got Tq={tq}, Tk={tk}")
        cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=q.device)
        cu_k = cu_q if tk == tq else torch.arange(0, (b + 1) * tk, tk, dtype=torch.int32, device=q.device)
        max_q, max_k = tq, tk
        q2, k2, v2 = q.reshape(b * tq, h, dh), k.reshape(b * tk, h, dh), v.reshape(b * tk, h, dh)
    params = _varlen_params(fn)
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = scale
    if causal:
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)  # a tuple: torch compares window_size == (-1, 0)
        else:
            kwargs["is_causal"] = True
    out = fn(q2, k2, v2, cu_q, cu_k, int(max_q), int(max_k), **kwargs)
    return out.reshape(b, tq, h, dh)


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
    the longest sequence (needed by the varlen kernels; computed when omitted). See ``check_cu_seqlens``
    for what is checked.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: expected 4-D (B, T, H, Dh) tensors, got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"q, k, v: expected matching batch, heads and head dims, got {q.shape}, {k.shape}, {v.shape}"
        )
    head_dim = q.shape[-1]
    custom_scale = scale
    scale = head_dim**-0.5 if scale is None else scale
    packed = cu_seqlens is not None
    if packed:
        if q.shape[0] != 1 or q.shape[1] != k.shape[1]:
            raise ValueError(
                f"q: a packed batch (cu_seqlens given) needs B == 1 and Tq == Tk, got {tuple(q.shape)}"
            )
        max_seqlen = check_cu_seqlens(cu_seqlens, q.shape[1], max_seqlen)
    impl = resolve_impl(impl, q.device, q.dtype, packed, head_dim=head_dim, causal=causal, scale=custom_scale)

    if impl == "varlen":
        problem = varlen_problem(q.device, q.dtype, head_dim, causal=causal, scale=custom_scale)
        if problem:
            raise ValueError(f"attn_impl: 'varlen' {problem}")
        if packed and max_seqlen is None:  # only while torch.compile traces
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return _varlen_attention(q, k, v, causal, cu_seqlens, max_seqlen, scale)

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
            cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
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
