"""Block sizes and workspace budgets of the fused loss kernels, in one place.

Configurations are *fixed per architecture* rather than picked by ``@triton.autotune`` at run time:
the tile shape decides the order of every floating-point reduction, and a timing-based choice could
differ between processes, which would break the bitwise determinism the losses promise. To tune,
edit the tables below after measuring with ``AUTOTUNE_CANDIDATES`` (the GPU tuning issue does this).

Under the Triton interpreter (CPU, ``TRITON_INTERPRET=1``) a program step costs ~1.5-2 ms whatever
the tile size, so the interpreter uses few, large tiles; only one configuration exists there
(``@triton.autotune`` with several configurations fails under the interpreter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """One kernel launch configuration. ``block_m x block_n`` logits per program, ``block_k`` of D per step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Tile kernels: one BM x BN tile of logits per program, recomputed from X and Y in steps of BK over D.
# "lse" walks a range of column tiles per program (row statistics online, column partials per tile);
# "tile" forms the gradient tile (CLIP backward, SigLIP loss + gradient).
_CONFIGS = {
    # H100 / H200 (sm_90): 128x128 fp32 accumulator over 8 warps, 3-4 stage pipelined K loop.
    "hopper": {
        "lse": TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        "tile": TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    },
    # A100 / sm_8x: less shared memory per SM than Hopper.
    "ampere": {
        "lse": TileConfig(128, 128, 32, num_warps=8, num_stages=3),
        "tile": TileConfig(128, 128, 32, num_warps=8, num_stages=3),
    },
    # Anything older or unknown: small, safe tiles.
    "generic": {
        "lse": TileConfig(64, 64, 32, num_warps=4, num_stages=2),
        "tile": TileConfig(64, 64, 32, num_warps=4, num_stages=2),
    },
    # CPU interpreter: cost is per program step, so few large tiles; BK < 200 so that the tests'
    # D = 200 crosses a masked K tail.
    "interpreter": {
        "lse": TileConfig(64, 64, 128, num_warps=4, num_stages=1),
        "tile": TileConfig(64, 64, 128, num_warps=4, num_stages=1),
    },
}

# Candidates for offline tuning on a GPU (not used at run time; see the module docstring).
AUTOTUNE_CANDIDATES = [
    TileConfig(bm, bn, bk, num_warps=w, num_stages=st)
    for bm, bn in ((128, 128), (128, 64), (64, 128), (128, 256))
    for bk in (32, 64)
    for w in (4, 8)
    for st in (3, 4)
]

# Workspace budgets, in elements. The CLIP backward and the SigLIP gradient materialize the gradient
# tile G for ``c`` rows at a time (c x N, in the input dtype) so that cuBLAS GEMMs form dX and dY; the
# forward keeps per-tile column log-sum-exp partials (c / BM) x N in fp32. Both bound ``c``.
GRAD_WORKSPACE_ELEMENTS = 2**25  # 64 MiB of bf16 G per chunk (c = 1024 rows at N = 32768)
LSE_WORKSPACE_ELEMENTS = 2**25  # 128 MiB of fp32 column partials
# 16-bit inputs: dY += G_c^T X_c is formed in fp32 pieces of at most this many elements (64 MiB).
DY_PIECE_ELEMENTS = 2**24
# Enough programs to fill the GPU: the forward splits the columns of a row block between programs
# until about this many programs per SM are launched.
PROGRAMS_PER_SM = 4


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except Exception:
        return False


def arch(device: torch.device) -> str:
    """Key of ``_CONFIGS`` for ``device``."""
    if device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 9:
        return "hopper"
    if major == 8:
        return "ampere"
    return "generic"


def tile_config(kernel: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> TileConfig:
    """Configuration of ``kernel`` ("lse" or "tile") on ``device`` for inputs of ``dtype``.

    fp32 operands take twice the shared memory per stage of 16-bit ones: their K step is capped at 32
    (a 128x128 tile with BK = 64 and 3 stages would need 192 KiB for fp32).
    """
    cfg = _CONFIGS[arch(device)][kernel]
    if dtype == torch.float32 and device.type == "cuda" and cfg.block_k > 32:
        cfg = TileConfig(cfg.block_m, cfg.block_n, 32, cfg.num_warps, cfg.num_stages)
    return cfg


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
