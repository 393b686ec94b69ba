"""Code shared by the CLIP and SigLIP kernels: the similarity tile, the grouped grid order, the
launchers' input checks and compile-time flags, and the TF32 rounding of fp32 operands.

TF32: for fp32 operands with ``input_precision="tf32"`` Triton feeds the fp32 bits to the tensor cores
unchanged (sm_90: ``wgmma.mma_async ... .f32.tf32.tf32`` reading the operand tiles from shared memory;
sm_80: ``mma.sync ... .tf32.tf32``; no ``cvt.rna.tf32.f32`` anywhere in the PTX), and the tensor cores
ignore the low 13 mantissa bits: every operand is truncated toward zero, every product biased low by
about 2**-11 relative per operand, and at logit scales of 10-100 that bias shows in the log-sum-exp and
the SigLIP sums (on an H200: 2.2-20x the error of cuBLAS's TF32 on the same inputs, which rounds
operands to nearest). So with TF32 on, the launchers hand the kernels operands already rounded to the
nearest TF32 value (``dot_operands``: one elementwise pass over X and Y, a temporary fp32 copy of
each); the tensor cores' truncation of those is exact. Rounding in registers inside the K loop instead
was compiled and rejected: it takes the operands out of the shared-memory path of ``wgmma`` (A through
``ldmatrix`` into registers, B loaded, rounded and stored back to shared memory) and serializes the MMA
(``wgmma.wait_group 0`` every K step instead of 1).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from fastclip.kernels import config, gemm

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _first_tensor(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


def on_tensor_device(fn):
    """Run a launcher with its first tensor argument's CUDA device current. Triton launches on the
    current device, so a call on cuda:1 tensors while cuda:0 is current would run on cuda:0 with
    pointers into cuda:1 (cuBLAS and torch ops follow the tensors; the kernels do not)."""

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        t = _first_tensor(args)
        if t is not None and t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return launcher


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
def round_tf32(v):
    """fp32 ``v`` rounded to the nearest TF32 value (10 mantissa bits; ties away from zero, as PTX's
    ``cvt.rna.tf32.f32``), in fp32 storage with the low 13 bits zero. Overflow rounds to inf, inf stays
    inf, NaN stays NaN (its quiet bit set, so it is still a NaN once the hardware drops the low bits).
    Integer operations on the bits: the same numbers compiled and under the interpreter."""
    bits = v.to(tl.uint32, bitcast=True)
    # Half a TF32 ulp added to the magnitude bits carries into the kept bits exactly when the dropped
    # part is at least half an ulp (sign-magnitude: ties go away from zero); a carry into the exponent
    # is the correct next binade, and from the largest finite binade it gives inf.
    rounded = (bits + 0x1000) & 0xFFFFE000
    return tl.where(v != v, bits | 0x400000, rounded).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["numel"])
def _round_tf32_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    tl.store(dst_ptr + offs, round_tf32(tl.load(src_ptr + offs, mask=mask, other=0.0)), mask=mask)


def round_tf32_tensor(t: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 tensor: ``t`` (fp32) rounded elementwise to the nearest TF32 value."""
    if t.dtype != torch.float32:
        raise TypeError(f"t: expected float32, got {t.dtype}")
    t = t.contiguous()
    out = torch.empty_like(t)
    numel = t.numel()
    if numel:
        # The interpreter pays per program, not per element: few, large blocks there.
        block = 2**16 if config.interpreting() else 2048
        _round_tf32_kernel[(triton.cdiv(numel, block),)](t, out, numel, BLOCK=block, num_warps=4)
    return out


def dot_operands(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The operands the kernels' ``tl.dot`` should read for the features ``x``, ``y`` (contiguous): the
    tensors themselves, or, for fp32 with TF32 on, copies rounded to the nearest TF32 value (see the
    module docstring), so the fused loss multiplies what cuBLAS's TF32 multiplies. Under the
    interpreter too, where the rounding then reproduces the GPU's operands. The cuBLAS GEMMs of the
    gradients keep reading ``x`` and ``y`` (cuBLAS rounds its own operands)."""
    if x.dtype != torch.float32 or not gemm.tf32_enabled():
        return x, y
    return round_tf32_tensor(x), round_tf32_tensor(y)


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
