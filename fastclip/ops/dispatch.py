"""Choosing an implementation (``impl=``) and the chunk size of the "torch" implementation."""

from __future__ import annotations

import importlib.util
import os

import torch

# The "torch" implementation materializes at most CHUNK_ELEMENTS logits (rows x columns) per chunk;
# a few fp32 temporaries of that size exist at once (~4 x 16 MiB at the default). Measured on the
# 2-core CPU machine (benchmarks/results/): 2**22 keeps time within the reference's at B=16384.
CHUNK_ELEMENTS = 2**22
# The distillation passes hold two logit tiles (student and teacher) per chunk and measured fastest at
# twice the budget (B = 16384, D = 256 on the 2-core machine: 512-row chunks beat 256 and 1024).
DISTILL_CHUNK_ELEMENTS = 2 * CHUNK_ELEMENTS
# The contrastive family (fastclip/ops/family_impl.py): the same budget over all blocks' columns of a
# chunk, but at least FAMILY_MIN_CHUNK_ROWS rows whatever the width. Its GEMMs run per chunk, and the
# column gradient dC += G^T R rewrites all of dC once per chunk: on the 2-core CPU (B = 8192, D = 384,
# fp32) 256-row chunks took 1.6x the materialized loss's time, 1024-row chunks 0.92x; at B = 16384
# 768 rows kept the peak near 5 % of the materialized loss's (bounded rows, never n x N).
FAMILY_CHUNK_ELEMENTS = CHUNK_ELEMENTS
FAMILY_MIN_CHUNK_ROWS = 768

# Input dtypes of the Triton kernels (float64 runs on the chunked PyTorch path).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Whether the kernel package and triton are installed, looked up once here (nothing is imported) and
# not per call: torch.compile (torch 2.11) refuses to trace importlib.util.find_spec, which would
# break a fullgraph compile of any step that calls a loss.
KERNELS_INSTALLED = (
    importlib.util.find_spec("fastclip.kernels") is not None
    and importlib.util.find_spec("triton") is not None
)


def triton_available(device: torch.device) -> bool:
    """True when the Triton kernels can run on ``device``: CUDA, or CPU under ``TRITON_INTERPRET=1``."""
    if not KERNELS_INSTALLED:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device, *, dtype: torch.dtype | None = None) -> str:
    """Map ``"auto"`` to a concrete implementation and refuse ``"triton"`` where it cannot run.

    ``"auto"`` picks ``"triton"`` for CUDA tensors of a kernel dtype (float32, bfloat16, float16) and
    ``"torch"`` otherwise (CPU, float64 e.g. for gradcheck). ``dtype=None`` skips the dtype rule.
    """
    if impl == "auto":
        if dtype == torch.float64:
            return "torch"
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if impl == "triton" and not triton_available(device):
        raise ValueError(
            "impl='triton' is not available here: it needs CUDA tensors and an installed triton, or CPU "
            "tensors with TRITON_INTERPRET=1 set before triton is imported; got device "
            f"{device}. Use impl='torch' (chunked PyTorch) or impl='auto'."
        )
    if impl == "triton" and dtype is not None and dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"impl='triton': expected features of dtype float32, bfloat16 or float16, got {dtype}; "
            "use impl='torch' (or impl='auto') for float64"
        )
    return impl


def block_impl(impl: str) -> str:
    """The implementation a block primitive runs for a resolved ``impl``: the kernels for "triton", the
    chunked PyTorch code otherwise ("torch"; "reference" callers reach the blocks only through paths
    that have no materialized form, e.g. the distributed distillation)."""
    return "triton" if impl == "triton" else "torch"


def chunk_rows(n_rows: int, n_cols: int, chunk_size: int | None, budget: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk: the caller's ``chunk_size`` or the default ``budget`` of logits per chunk
    (CHUNK_ELEMENTS; DISTILL_CHUNK_ELEMENTS for the distillation passes)."""
    if chunk_size is not None:
        return max(1, min(n_rows, chunk_size))
    return max(1, min(n_rows, budget // max(1, n_cols)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for 16/32-bit inputs, float64 for float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
