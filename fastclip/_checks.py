"""Input checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object / dtype) or ``ValueError`` (wrong shape, size or
value) with a message that names the argument, what was expected and what was received.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
IMPLS = ("auto", "triton", "torch", "reference")


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def check_tensor(name: str, value, *, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating tensor (float32, bfloat16, float16 or float64), got {value.dtype}"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(value.shape)}")
    return value


def check_features(
    image_features,
    text_features,
    *,
    same_batch: bool = True,
    same_dtype: bool = True,
    name_a="image_features",
    name_b="text_features",
) -> None:
    """Both 2-D, same feature dim and device, non-empty, holding data (not ``meta``); same batch when
    ``same_batch``; same dtype when ``same_dtype``."""
    check_tensor(name_a, image_features, ndim=2)
    check_tensor(name_b, text_features, ndim=2)
    (n, d), (m, e) = image_features.shape, text_features.shape
    if n == 0 or d == 0:
        raise ValueError(f"{name_a}: expected a non-empty (batch, dim) tensor, got shape {(n, d)}")
    if m == 0 or e == 0:
        raise ValueError(f"{name_b}: expected a non-empty (batch, dim) tensor, got shape {(m, e)}")
    if d != e:
        raise ValueError(f"{name_b}: expected feature dim {d} (as {name_a}), got {e}")
    if same_batch and n != m:
        raise ValueError(f"{name_b}: expected batch size {n} (as {name_a}), got {m}")
    if same_dtype and image_features.dtype != text_features.dtype:
        raise TypeError(
            f"{name_b}: expected dtype {image_features.dtype} (as {name_a}), got {text_features.dtype}"
        )
    if image_features.device != text_features.device:
        raise ValueError(
            f"{name_b}: expected device {image_features.device} (as {name_a}), got {text_features.device}"
        )
    if image_features.device.type == "meta":
        raise ValueError(
            f"{name_a}: expected a tensor holding data (e.g. on cpu or cuda), got one on the meta device "
            "(meta tensors have shapes but no values, so no loss can be computed from them)"
        )


def check_scalar(name: str, value, *, device: torch.device | None = None) -> torch.Tensor:
    """A 0-dim or 1-element floating tensor on ``device``; python numbers are wrapped.

    The value is not read (no host sync on the hot path): a NaN/Inf scale or bias gives a NaN loss,
    as in open_clip; ``check_all_finite`` is the opt-in check that raises instead.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a scalar tensor or float, got bool")
    if isinstance(value, (int, float)):
        value = torch.tensor(float(value), device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name}: expected a 0-dim or 1-element tensor (or float), got {type(value).__name__}"
        )
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got {value.dtype}")
    if value.numel() != 1:
        raise ValueError(f"{name}: expected a 0-dim or 1-element tensor, got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected device {device} (as the features), got {value.device}")
    return value


def check_impl(impl) -> str:
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return impl


def check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size}")
    return chunk_size


def check_all_finite(name: str, value: torch.Tensor) -> None:
    """The opt-in NaN/Inf check (``check_finite=True``): one reduction and one host sync."""
    if not bool(torch.isfinite(value.detach()).all()):
        if value.numel() == 1:
            raise ValueError(f"{name}: expected a finite value, got {value.detach().reshape(()).item()}")
        bad = (~torch.isfinite(value.detach())).nonzero()[0].tolist()
        raise ValueError(f"{name}: expected finite values, got NaN or Inf (first at index {tuple(bad)})")


def check_int(name: str, value, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def check_real(name: str, value, *, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    """A finite float (an int is taken as one; a bool is refused) in the interval given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value}")
    bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
    bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        raise ValueError(f"{name}: expected a value in {left}{lo}, {hi}{right}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value
