"""Mixed precision at the loss boundary: the losses compute on their own terms under ``torch.autocast``.

Under autocast, PyTorch recasts matmuls to bf16/fp16 and leaves other ops alone, which breaks the
losses' contract (fp32 accumulation, gradients in each input's dtype) and mixes dtypes inside the
chunk loops. Every autograd Function of fastclip therefore runs its forward *and* backward with
autocast disabled on the features' device (``loss.backward()`` is often called inside the autocast
block, and on CPU the backward then runs with autocast on). Feature dtypes are settled once, before
the Function, by :func:`compute_dtype`.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def _autocast_device_types() -> tuple[str, ...]:
    is_available = getattr(torch.amp, "is_autocast_available", None)
    kinds = ("cpu", "cuda", "xpu", "mps", "hpu")
    if is_available is None:  # older torch: cpu and cuda only
        return ("cpu", "cuda")
    return tuple(k for k in kinds if is_available(k))


_AUTOCAST_TYPES = _autocast_device_types()


def autocast_active(device: torch.device) -> bool:
    """True when ``torch.autocast`` is enabled for ``device``'s type in this thread."""
    if device.type not in _AUTOCAST_TYPES:
        return False
    return torch.is_autocast_enabled(device.type)


def no_autocast(device: torch.device):
    """A context in which autocast is off for ``device``'s type (a no-op where autocast does not exist)."""
    if device.type not in _AUTOCAST_TYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def compute_dtype(dtypes, device: torch.device) -> torch.dtype:
    """The one dtype a loss's features are computed in: what the materialized loss's matmul would use.
    Under autocast that is autocast's dtype for 16/32-bit floats, also when every feature is fp32 (as
    open_clip's ``image_features @ text_features.T`` and sentence-transformers' similarity run; models
    normalize in fp32 under CUDA autocast, so fp32 features are what a bf16 training step hands the
    loss, and computing them in fp32 would take the CUDA-core path, several times slower than the
    tensor cores the materialized loss uses). float64 anywhere, or no autocast, promotes."""
    dtypes = tuple(dtypes)
    if autocast_active(device) and torch.float64 not in dtypes:
        return torch.get_autocast_dtype(device.type)
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def common_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """:func:`compute_dtype` of a feature pair."""
    return compute_dtype((a.dtype, b.dtype), a.device)


def autocast_off(fn):
    """Decorator for ``autograd.Function.forward``/``backward``: run the body with autocast disabled on
    the device of the first tensor argument."""

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None:
            return fn(ctx, *args)
        with no_autocast(device):
            return fn(ctx, *args)

    return wrapper


def first_order(fn):
    """Decorator for ``autograd.Function.backward``: refuse ``create_graph=True`` with a clear error.

    The backward passes form gradients from detached inputs (explicit formulas, no autograd graph),
    so a second derivative would silently be missing; a one-line error says so instead.
    """

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(
                "fastclip losses support first derivatives only: backward(create_graph=True) / double "
                "backward (e.g. a gradient penalty through the loss) would differentiate twice, which is "
                "not supported; use impl='reference' for higher-order gradients"
            )
        return fn(ctx, *args)

    return wrapper
