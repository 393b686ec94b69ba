"""The Triton kernels compiled on a CUDA GPU (``pytest -m gpu``; skipped without CUDA).

The interpreter cases of tests/test_kernels.py run here compiled (tensor cores, real bf16, TF32 on and
off), then sizes the interpreter cannot reach: B up to 65536 and D in {512, 768, 1024, 1152}, checked
against the chunked float64 path; a repeat test for determinism (bitwise) and races; the memory
contract with ``torch.cuda.max_memory_allocated``.

Tolerances at large B (no materialized same-dtype reference fits there) are relative to the largest
true value and were set from the dtype's rounding, not yet measured on a GPU.

Time (``pytest -m gpu`` must fit in 90 s on an H200): compiling is most of it, ~1.4 s per kernel
variant, ~100 variants here (sizes and strides specialize by == 1 and divisibility by 16). So the
cases that share variants are loops inside one test per precision, and tests/_gpu_warm.py compiles
every variant in one process per precision in parallel (started by the session's first CUDA test),
into Triton's on-disk cache, which the device check's correctness part (the same block cases) fills
too. With TF32 allowed, the fused loss's error is at most 2x that of torch's materialized loss on the
same inputs (``test_tf32_error_within_twice_torchs_tf32``).
"""

from __future__ import annotations

import contextlib

import _gpu_warm
import pytest
import torch
from test_kernels import BLOCKS, DTYPES, LOSSES, _check_clip_block, _check_loss, _check_siglip_block
from utils import features, loss_and_grads, scalar

import fastclip

pytestmark = pytest.mark.gpu

CUDA = "cuda"


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 for fp32 matmuls on or off, through the fp32_precision API where torch has it (reading
    the legacy flag after the new API was used raises in recent torch)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        old = matmul.fp32_precision
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        old = matmul.allow_tf32
        matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = old
        else:
            matmul.allow_tf32 = old


# (dtype, tf32) pairs: fp32 with and without TF32, and the 16-bit types.
PRECISIONS = [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False), (torch.float16, False)]


def _pid(p):
    return f"{str(p[0]).split('.')[-1]}{'-tf32' if p[1] else ''}"


@pytest.fixture(scope="module", autouse=True)
def _compiled_in_parallel():
    """Before this module's tests: one process per precision has compiled its kernel variants
    (tests/_gpu_warm.py, started by the first CUDA test of the session) into Triton's on-disk cache,
    which the tests then read: ~25 variants per precision in parallel instead of ~100 one after
    another. After the device check's correctness part (the same block cases) most are cached."""
    for err in _gpu_warm.wait():
        print(f"tests/_gpu_warm.py {err}")  # not fatal: the tests compile what is missing
    yield


def _all_of(cases, check) -> None:
    """Run ``check(case)`` for every case; fail once, listing every case that failed and why (one
    test per precision instead of one per case: the cases share compiled kernel variants)."""
    failures = []
    for case in cases:
        try:
            check(case)
        except AssertionError as exc:
            failures.append(f"{case}: {str(exc).splitlines()[0]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("prec", PRECISIONS, ids=_pid)
def test_blocks_compiled(prec):
    """Every block case of tests/test_kernels.py (BLOCKS), compiled: the calls of the device check's
    correctness part, so a run after it finds these variants in Triton's cache."""

    def check(case):
        _check_clip_block(*case, prec[0], device=CUDA)
        _check_siglip_block(*case, prec[0], device=CUDA)
        _check_siglip_block(*case, prec[0], device=CUDA, need_grad=False, bias=None)

    with _tf32(prec[1]):
        _all_of(BLOCKS, check)


LOSS_SHAPES = [(1, 1), (7, 3), (130, 48), (257, 200), (1000, 2048)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_losses_compiled(dtype):
    """``impl="triton"`` through the public losses, every shape and both losses (the kernel variants
    of the block cases: same size classes, same flags)."""
    _all_of(
        [(loss_name, n, d) for loss_name in LOSSES for n, d in LOSS_SHAPES],
        lambda c: _check_loss(*c, dtype, device=CUDA),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("force_pieces", [False, True], ids=["auto-path", "pieces"])
def test_fp32_output_accumulation(dtype, force_pieces, monkeypatch):
    """``gemm.accumulate`` keeps fp32 products of 16-bit inputs on whichever path this torch offers
    (in-place fp32-output addmm, or 128-row-aligned pieces of fp32-output mm)."""
    from fastclip.kernels import config, gemm

    if force_pieces:
        monkeypatch.setattr(gemm, "addmm_f32_accumulates", lambda device: False)
        monkeypatch.setattr(config, "DY_PIECE_ELEMENTS", 1000 * 64)
    g = torch.Generator(device=CUDA).manual_seed(0)
    a = torch.randn(3000, 512, device=CUDA, generator=g).to(dtype)
    b = torch.randn(512, 64, device=CUDA, generator=g).to(dtype)
    acc = torch.randn(3000, 64, device=CUDA, generator=g)
    want = acc.double() + a.double() @ b.double()
    gemm.accumulate(acc, a, b)
    err = (acc.double() - want).abs().max().item()
    assert err < 1e-3, (gemm.gemm_path(torch.device(CUDA), dtype), err)  # rounded products: ~1e-1


def test_phase_timer_on_cuda():
    from fastclip.kernels import clip, gemm

    x, y = (
        features(4096, 768, torch.bfloat16, device=CUDA),
        features(4096, 768, torch.bfloat16, seed=1, device=CUDA),
    )
    s = scalar(30.0, device=CUDA)
    lse = clip.clip_lse(x, y, s)
    timer = gemm.PhaseTimer(torch.device(CUDA))
    clip.clip_grad(x, y, s, *lse, 1e-4, 1e-4, 0, 2e-4, timer=timer)
    phases = timer.totals_ms()
    assert set(phases) == {"tile kernel", "dX GEMM", "dY GEMM"} and all(v > 0 for v in phases.values())


def test_benchmark_records_the_kernel_path():
    from fastclip.bench.loss import kernel_path

    dev = torch.device(CUDA)
    assert kernel_path("fastclip-triton", torch.bfloat16, dev).startswith("tensor-core-bf16; gemm ")
    with _tf32(False):
        assert kernel_path("fastclip-triton", torch.float32, dev).startswith("fp32-fma")
    with _tf32(True):
        assert kernel_path("fastclip-triton", torch.float32, dev).startswith("tf32")
    assert kernel_path("reference", torch.bfloat16, dev) is None


def test_auto_picks_triton_on_cuda():
    from fastclip.ops.dispatch import resolve_impl

    assert resolve_impl("auto", torch.device(CUDA), dtype=torch.bfloat16) == "triton"
    assert resolve_impl("auto", torch.device(CUDA), dtype=torch.float64) == "torch"


# Relative tolerance (max |error| / max |truth|) against the float64 chunked path at large B.
LARGE_TOL = {(torch.float32, False): 1e-4, (torch.float32, True): 1e-2, (torch.bfloat16, False): 3e-2}
LARGE_TOL[(torch.float16, False)] = 1e-2


def _large_check(loss_name, b, d, prec, scale=30.0, bias=-10.0):
    dtype, tf32 = prec
    fn, _ = LOSSES[loss_name]
    x, y = features(b, d, dtype, seed=1, device=CUDA), features(b, d, dtype, seed=2, device=CUDA)
    s, bb = scalar(scale, device=CUDA), scalar(bias, device=CUDA)
    with _tf32(tf32):
        got, got_g = loss_and_grads(fn, x, y, s, bb, impl="triton")
    x64, y64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, y, s, bb))
    truth, truth_g = loss_and_grads(fn, x64, y64, s64, b64, impl="torch")
    tol = LARGE_TOL[prec]
    assert abs(float(got) - float(truth)) <= tol * max(1.0, abs(float(truth))), (float(got), float(truth))
    for name, g, t in zip(("image", "text", "scale", "bias"), got_g, truth_g):
        err = float((g.double() - t).abs().max())
        # Scalars (scale, bias) are sums of B^2 signed terms and can be small: floor them at 1e-2.
        ref = max(float(t.abs().max()), 1e-2 if t.dim() == 0 else 1e-12)
        assert err <= tol * ref, f"{name}: max |diff| {err:.3e} > {tol} * {ref:.3e}"


@pytest.mark.slow
@pytest.mark.parametrize("prec", PRECISIONS, ids=_pid)
def test_large_feature_dims(prec):
    """B = 8192, every feature dim of the towers in this field, both losses: one compiled variant per
    loss and precision (every D here is a multiple of 16 and falls in the same configuration)."""
    _all_of(
        [(loss_name, d) for loss_name in LOSSES for d in (512, 768, 1024, 1152)],
        lambda c: _large_check(c[0], 8192, c[1], prec),
    )


@pytest.mark.slow
@pytest.mark.parametrize("b", [16385, 65536])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_large_batches_bf16(loss_name, b):
    _large_check(loss_name, b, 768, (torch.bfloat16, False))


@pytest.mark.parametrize("loss_name", LOSSES)
def test_repeat_is_bitwise_identical(loss_name):
    """Same inputs, same GPU: bitwise the same loss and gradients (no atomics, fixed reduction order)."""
    fn, _ = LOSSES[loss_name]
    x, y = (
        features(16384 + 3, 768, torch.bfloat16, device=CUDA),
        features(16387, 768, torch.bfloat16, seed=1, device=CUDA),
    )
    s, b = scalar(50.0, device=CUDA), scalar(-10.0, device=CUDA)
    first = None
    for _ in range(5):
        loss, grads = loss_and_grads(fn, x, y, s, b, impl="triton")
        out = [loss] + [g for g in grads if g is not None]
        if first is None:
            first = out
        else:
            for a, c in zip(first, out):
                assert torch.equal(a, c)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_memory_contract(loss_name):
    """Extra memory of forward + backward is O((n + N) D) plus the bounded workspaces, never B x B."""
    from fastclip.kernels import config

    fn, _ = LOSSES[loss_name]
    b, d, dtype = 32768, 768, torch.bfloat16
    x, y = features(b, d, dtype, device=CUDA), features(b, d, dtype, seed=1, device=CUDA)
    s, bb = scalar(30.0, device=CUDA), scalar(-10.0, device=CUDA)
    loss_and_grads(fn, x, y, s, bb, impl="triton")  # warm-up: compile, cuBLAS workspaces
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, grads = loss_and_grads(fn, x, y, s, bb, impl="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # fp32 dx, dy (4 bytes), their casts (2 bytes), the G workspace, dY pieces (only without an
    # in-place fp32-output addmm), the LSE partials.
    linear = 2 * b * d * (4 + 2)
    workspace = (
        config.GRAD_WORKSPACE_ELEMENTS * 2 + config.DY_PIECE_ELEMENTS * 4 + config.LSE_WORKSPACE_ELEMENTS * 4
    )
    assert extra <= linear + workspace + 64 * 2**20, f"extra {extra / 2**20:.0f} MiB"
    assert extra <= 0.1 * b * b * 4, f"extra {extra / 2**20:.0f} MiB is not far below one B x B fp32 matrix"


@pytest.mark.slow
def test_one_million_rows_complete():
    """B = 2**20 completes (forward + backward, bf16) and gives a finite loss and gradients: every chunk,
    column panel and launch of that size (the workspace sizing does not depend on D). D = 64 keeps it
    to seconds; the device check's ``million`` part runs B = 2**20 at D = 768 (time and memory)."""
    b, d = 2**20, 64
    x, y = features(b, d, torch.bfloat16, device=CUDA), features(b, d, torch.bfloat16, seed=1, device=CUDA)
    loss = fastclip.clip_loss(x, y, scalar(30.0, device=CUDA), impl="triton")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def _tf32_bits(t: torch.Tensor, rounding: bool) -> torch.Tensor:
    """fp32 ``t`` (finite) with its low 13 mantissa bits dropped: truncated (what the tensor cores do
    with raw fp32 bits) or rounded to nearest first (ties away; what cuBLAS feeds them). Integer ops
    on the bits in torch, independent of the Triton helper under test."""
    bits = t.detach().contiguous().view(torch.int32)
    if rounding:
        bits = bits + 0x1000
    return (bits & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_tf32_error_within_twice_torchs_tf32(loss_name):
    """The contract with TF32 allowed: the fused loss's error against float64 (loss and every gradient)
    is within 2x that of the materialized loss (torch matmuls on cuBLAS TF32) on the same inputs, at
    CLIP's largest logit scale. And the tiles multiply operands rounded to nearest: the kernel's
    log-sum-exp matches float64 math on rounded operands far better than on truncated ones (before
    the fix it was the other way round, 2-20x torch's TF32 error)."""
    from fastclip.kernels import clip as kernels_clip

    fn, ref = LOSSES[loss_name]
    b, d = 4096, 768
    x, y = (
        features(b, d, torch.float32, seed=1, device=CUDA),
        features(b, d, torch.float32, seed=2, device=CUDA),
    )
    scale = 100.0 if loss_name == "clip" else 10.0
    s, bb = scalar(scale, device=CUDA), scalar(-10.0, device=CUDA)
    with _tf32(True):
        got, got_g = loss_and_grads(fn, x, y, s, bb, impl="triton")
        low, low_g = loss_and_grads(ref, x, y, s, bb)
        lse_row, _ = kernels_clip.clip_lse(x[:1024], y[:1024], s)
    x64, y64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, y, s, bb))
    truth, truth_g = loss_and_grads(fn, x64, y64, s64, b64, impl="torch")
    for name, g, lo, t in zip(
        ("loss", "image", "text", "scale", "bias"), (got, *got_g), (low, *low_g), (truth, *truth_g)
    ):
        err, ref_err = float((g.double() - t).abs().max()), float((lo.double() - t).abs().max())
        # Gradients of the features: the largest error over 4096 x 768 elements, a stable statistic.
        # The scalars (loss, scale, bias) are one draw each of a sum of rounding errors, partly shared
        # with torch's (the same rounded y): 2x could be missed by chance, so they also get 1e-4 of
        # their value (truncation itself is caught by the feature gradients and the check below).
        floor = (1e-4 if t.dim() == 0 else 1e-7) * max(1.0, float(t.abs().max()))
        assert err <= 2 * ref_err + floor, (
            f"{name}: max |diff| {err:.3e} > 2 x torch's TF32 error {ref_err:.3e}"
        )
    errs = {}
    for mode in ("nearest", "truncated"):
        xr, yr = (_tf32_bits(t[:1024], mode == "nearest").double() for t in (x, y))
        want = (scale * xr @ yr.T).logsumexp(1)
        errs[mode] = float((lse_row.double() - want).abs().max())
    assert errs["nearest"] <= 1e-3 and errs["truncated"] >= 10 * errs["nearest"], errs


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"
)
def test_losses_on_a_device_that_is_not_current():
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on cuda:1 and give cuda:0's numbers."""
    from fastclip import clip_loss, siglip_loss

    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(300, 64, generator=g), dim=-1)
    for fn in (clip_loss, siglip_loss):
        want = fn(
            x.cuda(0).bfloat16(), y.cuda(0).bfloat16(), torch.tensor(10.0, device="cuda:0"), impl="triton"
        )
        with torch.cuda.device(0):
            got = fn(
                x.cuda(1).bfloat16(), y.cuda(1).bfloat16(), torch.tensor(10.0, device="cuda:1"), impl="triton"
            )
        assert got.device == torch.device("cuda", 1)
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)
