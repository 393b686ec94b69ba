"""Code shared by the CLIP and SigLIP kernels: the similarity tile, the grouped grid order, the
launchers' input checks and compile-time flags.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fastclip.kernels import config, gemm

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def sim_tile(
    # pointers
    x_ptr,
    y_ptr,
    # indices and masks of the tile
    rows,
    cols,
    row_mask,
    col_mask,
    # sizes
    D,
    # strides
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yk,
    # meta
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """``x[rows] @ y[cols].T`` as a (BM, BN) fp32 tile; masked rows, columns and the K tail read zeros."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ks = tl.arange(0, BK)
    # int64: rows * stride passes 2**31 for n * D >= 2**31 (e.g. B = 2**20, D = 2048).
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # (BM, 1)
    y_cols = y_ptr + cols.to(tl.int64)[None, :] * stride_ym  # (1, BN)
    for k0 in range(0, D, BK):
        k = k0 + ks
        k_mask = k < D
        k64 = k.to(tl.int64)
        a = tl.load(x_rows + k64[None, :] * stride_xk, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(y_cols + k64[:, None] * stride_yk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def grouped_tile(pid, n, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` on a 1-D grid: groups of GROUP_M row blocks sweep the
    column tiles together (consecutive programs share a column tile of Y and keep the group's rows of
    X in L2), instead of every row block re-reading all of Y."""
    num_m = tl.cdiv(n, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows
    return pid_m, pid_n


def check_block(x, y, scale, *, name_x="x", name_y="y") -> None:
    """Shapes, dtypes and devices of a kernel block; raises TypeError/ValueError naming the argument."""
    for name, t in ((name_x, x), (name_y, y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(
                f"{name}: expected a non-empty 2-D (rows, dim) tensor, got shape {tuple(t.shape)}"
            )
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{name}: expected float32, bfloat16 or float16 for the Triton kernels, got {t.dtype} "
                "(use impl='torch' for float64)"
            )
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{name_y}: expected feature dim {x.shape[1]} (as {name_x}), got {y.shape[1]}")
    if x.dtype != y.dtype:
        raise TypeError(f"{name_y}: expected dtype {x.dtype} (as {name_x}), got {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{name_y}: expected device {x.device} (as {name_x}), got {y.device}")
    if x.device.type == "cpu":
        if not config.interpreting():
            raise ValueError(
                f"{name_x}: the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported for CPU tensors; got device {x.device}"
            )
    elif x.device.type != "cuda":
        raise ValueError(f"{name_x}: expected a CUDA (or, interpreted, CPU) tensor, got device {x.device}")
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or scale.numel() != 1:
        got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"scale: expected a 1-element floating tensor, got {got}")
    if scale.device != x.device:
        raise ValueError(f"scale: expected device {x.device} (as {name_x}), got {scale.device}")


def check_offset(offset) -> None:
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, int)):
        raise TypeError(f"offset: expected an int or None, got {type(offset).__name__}")


def check_stat(name: str, t, length: int, device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != (length,):
        got = (tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected a float32 tensor of shape ({length},), got {got}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def scalar_f32(t: torch.Tensor) -> torch.Tensor:
    """A 1-element fp32 copy on the same device (no host sync)."""
    return t.detach().reshape(1).to(torch.float32)


def meta_flags(dtype: torch.dtype) -> dict:
    """``UPCAST`` (bf16 under the interpreter only) and ``IEEE`` (fp32 without TF32)."""
    interp = config.interpreting()
    return {
        "UPCAST": interp and dtype == torch.bfloat16,
        "IEEE": dtype == torch.float32 and (interp or not gemm.tf32_enabled()),
    }


def dot_path(dtype: torch.dtype) -> str:
    """What ``tl.dot`` runs on for ``dtype`` inputs now: "tensor-core-bf16"/"-fp16", "tf32" or
    "fp32-fma" (fp32 with TF32 off, PyTorch's default: CUDA cores, several times slower)."""
    if dtype != torch.float32:
        return f"tensor-core-{str(dtype).split('.')[-1].replace('bfloat', 'bf').replace('float', 'fp')}"
    return "fp32-fma" if meta_flags(dtype)["IEEE"] else "tf32"


def positives_in(offset: int | None, i0: int, i1: int, j0: int, j1: int) -> bool:
    """Whether rows [i0, i1) have a positive (column i + offset) inside columns [j0, j1)."""
    return offset is not None and max(i0, j0 - offset) < min(i1, j1 - offset)
