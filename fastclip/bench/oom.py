"""Out-of-memory handling of the benchmarks, in one place: what counts as running out, and cleanup.

A benchmark that runs out of memory records ``status="oom"`` and moves on; it never takes the run
down. CUDA raises ``torch.cuda.OutOfMemoryError``; the CPU allocator raises ``RuntimeError`` ("can't
allocate memory") or Python's ``MemoryError``.
"""

from __future__ import annotations

import gc

import torch


def is_oom(exc: BaseException) -> bool:
    """True when ``exc`` says an allocation failed (CUDA or CPU)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg.lower() or "can't allocate memory" in msg
    )


def cleanup(device: torch.device) -> None:
    """Free what a failed or finished measurement left: Python garbage, then the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
