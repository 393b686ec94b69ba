"""The cuBLAS side of the chunk-materialized gradients: fp32-output GEMMs and the matmul precision.

``clip_grad`` and ``siglip_block`` write a gradient tile ``G`` (input dtype) and form ``dX += G @ Y``
and ``dY += G^T @ X`` with cuBLAS. For 16-bit inputs the products must keep fp32 *output*, not only
fp32 accumulation, or every chunk's contribution is rounded to 16 bits before it is summed. Three
paths, chosen once per process from what the installed torch offers (never from the exception of a
real call, which could be an out-of-memory error):

1. ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)``: one GEMM that accumulates into the
   fp32 ``acc`` in place (cuBLAS ``beta = 1``). Needs ``aten::addmm.dtype_out`` *and* a CUDA kernel
   that accepts an fp32 ``self`` with 16-bit factors; older releases with the schema refuse that (or
   mis-handle it), so a tiny explicit probe on the device checks the values once.
2. ``torch.mm(a, b, out_dtype=torch.float32)`` (schema ``aten::mm.dtype``) into a temporary, added
   to ``acc`` in column pieces of at most ``config.DY_PIECE_ELEMENTS``. Piece boundaries are
   multiples of 128 rows (256 bytes of a 16-bit row), so no piece starts misaligned for cuBLAS.
3. Neither: ``(a @ b).float()`` (products rounded to the input dtype; torch < 2.8).

The fp32 precision setting (TF32 or IEEE for fp32 ``tl.dot``) is read with ``tf32_enabled``, which
works with the legacy ``allow_tf32`` flag and the ``fp32_precision`` API of torch >= 2.9 (after the new
API is set, reading the legacy flag raises in torch 2.13).
"""

from __future__ import annotations

import contextlib
import functools
import time

import torch
from fastclip.kernels import config

# Piece boundaries of path 2 are multiples of this many rows (256 bytes of a bf16/fp16 row).
PIECE_ALIGN_ROWS = 128


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use TF32, from whichever precision API the user set.

    torch >= 2.9: ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee" or "none" = inherit
    from ``torch.backends.fp32_precision``). When neither is set, the legacy flag is readable and
    authoritative (it is what ``allow_tf32 = True`` sets). torch < 2.9: the legacy flag only.
    """
    matmul = torch.backends.cuda.matmul
    if _has_fp32_precision_api():
        value = matmul.fp32_precision
        if value == "none":
            value = getattr(torch.backends, "fp32_precision", "none")
        if value != "none":
            return value == "tf32"
    return bool(matmul.allow_tf32)


@functools.lru_cache(maxsize=1)
def _has_fp32_precision_api() -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision")


@functools.lru_cache(maxsize=1)
def mm_out_dtype_schema() -> bool:
    """True when ``aten::mm`` has its ``out_dtype`` overload (read from the operator schema, no call)."""
    try:
        return "dtype" in torch.ops.aten.mm.overloads()
    except (AttributeError, RuntimeError):
        return False


@functools.lru_cache(maxsize=1)
def addmm_out_dtype_schema() -> bool:
    """True when ``aten::addmm`` has its ``out_dtype`` overloads (schema only, no call)."""
    try:
        return {"dtype", "dtype_out"} <= set(torch.ops.aten.addmm.overloads())
    except (AttributeError, RuntimeError):
        return False


_ADDMM_PROBED: dict = {}


def addmm_f32_accumulates(device: torch.device) -> bool:
    """Path 1 works on ``device``: decided once per device by an explicit 16 x 16 probe whose values
    are checked (bf16 ones: every product is exactly 16). Only the refusal of the dtype combination is
    taken as "unsupported"; any other error (e.g. out of memory) propagates and nothing is cached."""
    if device.type != "cuda" or not addmm_out_dtype_schema():
        return False
    key = torch.device(device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _ADDMM_PROBED:
        acc = torch.ones(16, 16, dtype=torch.float32, device=key)
        a = torch.ones(16, 16, dtype=torch.bfloat16, device=key)
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            ok = bool((acc == 17.0).all())
        except RuntimeError as exc:
            if "dtype" not in str(exc):
                raise
            ok = False
        _ADDMM_PROBED[key] = ok
    return _ADDMM_PROBED[key]


def fp32_out_mm(device: torch.device) -> bool:
    """Path 2 is available on ``device`` (CUDA only: torch has no CPU kernel for ``mm.dtype``)."""
    return device.type == "cuda" and mm_out_dtype_schema()


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with fp32 accumulation and fp32 output (16-bit products are not rounded)."""
    if a.dtype == torch.float32:
        return a @ b
    if fp32_out_mm(a.device):
        return torch.mm(a, b, out_dtype=torch.float32)
    if a.device.type == "cuda":
        return (a @ b).float()
    return a.float() @ b.float()


def gemm_path(device: torch.device, dtype: torch.dtype) -> str:
    """Which accumulation path ``accumulate`` takes: "addmm-fp32-out", "mm-fp32-out-pieces",
    "fp32" (fp32 inputs) or "rounded" (16-bit products rounded before the fp32 add)."""
    if dtype == torch.float32:
        return "fp32"
    if addmm_f32_accumulates(device):
        return "addmm-fp32-out"
    if fp32_out_mm(device):
        return "mm-fp32-out-pieces"
    return "fp32-on-cpu" if device.type == "cpu" else "rounded"


def accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b``; ``acc`` fp32 (rows, cols), ``a`` (rows, k), ``b`` (k, cols), same dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if addmm_f32_accumulates(acc.device):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    rows, cols = acc.shape
    piece = max(1, config.DY_PIECE_ELEMENTS // max(1, cols))
    piece = max(PIECE_ALIGN_ROWS, piece // PIECE_ALIGN_ROWS * PIECE_ALIGN_ROWS)
    for r0 in range(0, rows, piece):
        acc[r0 : r0 + piece].add_(mm_f32(a[r0 : r0 + piece], b))


class PhaseTimer:
    """Time of named phases of a launcher, summed over its chunks: CUDA events on GPU (read, with one
    synchronization, by :meth:`totals_ms`), ``time.perf_counter`` on CPU. ``PhaseTimer.disabled()``
    costs nothing and is what the launchers use when no timer is given."""

    def __init__(self, device: torch.device | str | None = None, *, enabled: bool = True):
        self.enabled = enabled
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._events: dict[str, list] = {}
        self._cpu: dict[str, float] = {}

    @classmethod
    def disabled(cls) -> PhaseTimer:
        return cls(enabled=False)

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu[name] = self._cpu.get(name, 0.0) + (time.perf_counter() - t0) * 1e3

    def totals_ms(self) -> dict[str, float]:
        """Milliseconds per phase since the timer was made."""
        out = dict(self._cpu)
        if self._events:
            torch.cuda.synchronize(self.device)
            for name, pairs in self._events.items():
                out[name] = out.get(name, 0.0) + sum(a.elapsed_time(b) for a, b in pairs)
        return out
