"""The real Triton kernels (``fastclip.kernels``) against float64, through the interpreter on CPU.

``TRITON_INTERPRET=1`` (set by conftest.py without CUDA) runs the ``@triton.jit`` code on CPU tensors.
Every block primitive is checked for values and all gradients, on shapes that are not multiples of any
tile (B = 1, D = 1, D = 200 across a masked K tail), rectangular blocks with positives at offsets of
both signs, out of range, or none, and fp32 / bf16 / fp16 inputs; then the ops-level ``impl="triton"``
path through ``fastclip.clip_loss`` / ``siglip_loss``. Budgets: ``err <= 2 * err(same-dtype math) +
floor`` against float64, where the same-dtype math does its matmuls in the input dtype (what a
materialized loss in that dtype does).

Helpers here (``_cases``, ``_check_*``) are reused by tests/test_gpu_kernels.py on CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from utils import assert_within_budget, features, loss_and_grads, scalar

import fastclip
from fastclip.reference import clip_loss_reference, siglip_loss_reference

kernels_clip = pytest.importorskip("fastclip.kernels.clip")
kernels_siglip = pytest.importorskip("fastclip.kernels.siglip")
kernels_common = pytest.importorskip("fastclip.kernels.common")
triton = pytest.importorskip("triton")
tl = triton.language

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (n, N, D, offset): square blocks with the diagonal, rectangular blocks with positives at positive
# and negative offsets, partly or fully out of range, or none.
BLOCKS = [
    (1, 1, 1, 0),
    (7, 7, 3, 0),
    (130, 130, 48, 0),
    (257, 257, 200, 0),
    (70, 130, 33, 5),
    (130, 70, 33, -3),
    (9, 200, 40, 150),
    (40, 9, 20, 60),
    (64, 65, 17, None),
]


def _ids(case):
    n, N, D, off = case
    return f"{n}x{N}xD{D}-off{off}"


def _inputs(n, N, D, dtype, device="cpu", seed=0):
    x = features(n, D, dtype, seed=seed, requires_grad=False, device=device)
    y = features(N, D, dtype, seed=seed + 1, requires_grad=False, device=device)
    return x, y


def _sim(x, y, exact: bool) -> torch.Tensor:
    """Similarities in float64: exact from the (rounded) inputs, or from a matmul in the input dtype."""
    if exact:
        return x.double() @ y.double().T
    return (x @ y.T).double()


def _mm(a64: torch.Tensor, b: torch.Tensor, exact: bool) -> torch.Tensor:
    if exact:
        return a64 @ b.double()
    return (a64.to(b.dtype) @ b).double()


def _positives(n, N, offset, device):
    p = torch.zeros(n, N, dtype=torch.float64, device=device)
    if offset is not None:
        for i in range(max(0, -offset), min(n, N - offset)):
            p[i, i + offset] = 1.0
    return p


def _clip_block_math(x, y, s, offset, coefs, exact):
    """lse_row, lse_col, dx, dy, ds of a CLIP block; float64 (exact) or with input-dtype matmuls."""
    cr, cc, pc = coefs
    S = _sim(x, y, exact)
    L = s * S
    lr, lc = L.logsumexp(1), L.logsumexp(0)
    G = (
        cr * torch.exp(L - lr[:, None])
        + cc * torch.exp(L - lc[None, :])
        - pc * _positives(*L.shape, offset, x.device)
    )
    return lr, lc, s * _mm(G, y, exact), s * _mm(G.T, x, exact), (G * S).sum()


def _siglip_block_math(x, y, s, b, offset, exact):
    S = _sim(x, y, exact)
    L = s * S + (b if b is not None else 0.0)
    P = _positives(*L.shape, offset, x.device)
    loss = (torch.nn.functional.softplus(L) - P * L).sum()
    G = torch.sigmoid(L) - P
    return loss, s * _mm(G, y, exact), s * _mm(G.T, x, exact), (G * S).sum(), G.sum()


def _check_clip_block(
    n, N, D, offset, dtype, device="cpu", scale=20.0, coefs=(0.3, 0.2, 0.5), grad_kw=None, **kw
):
    x, y = _inputs(n, N, D, dtype, device, seed=n + N + D)
    s = torch.tensor(scale, device=device)
    truth = _clip_block_math(x, y, scale, offset, coefs, exact=True)
    low = _clip_block_math(x, y, scale, offset, coefs, exact=False)
    lse_row, lse_col = kernels_clip.clip_lse(x, y, s, **kw)
    assert lse_row.dtype == lse_col.dtype == torch.float32
    assert lse_row.shape == (n,) and lse_col.shape == (N,)
    assert_within_budget("lse_row", lse_row, low[0], truth[0], dtype)
    assert_within_budget("lse_col", lse_col, low[1], truth[1], dtype)
    # The gradient is checked with the exact statistics so that its own error is measured.
    dx, dy, ds = kernels_clip.clip_grad(
        x, y, s, truth[0].float(), truth[1].float(), *coefs[:2], offset, coefs[2], **(grad_kw or {})
    )
    assert dx.dtype == dy.dtype == ds.dtype == torch.float32
    assert dx.shape == (n, D) and dy.shape == (N, D) and ds.shape == ()
    for name, got, lo, tr in zip(("dx", "dy", "ds"), (dx, dy, ds), low[2:], truth[2:]):
        assert_within_budget(name, got, lo, tr, dtype)


def _check_siglip_block(n, N, D, offset, dtype, device="cpu", scale=10.0, bias=-10.0, need_grad=True, **kw):
    x, y = _inputs(n, N, D, dtype, device, seed=n + N + D + 1)
    s = torch.tensor(scale, device=device)
    b = None if bias is None else torch.tensor(bias, device=device)
    truth = _siglip_block_math(x, y, scale, bias, offset, exact=True)
    low = _siglip_block_math(x, y, scale, bias, offset, exact=False)
    loss, dx, dy, ds, db = kernels_siglip.siglip_block(x, y, s, b, offset, need_grad, **kw)
    assert loss.shape == () and loss.dtype == torch.float32
    assert_within_budget("loss", loss, low[0], truth[0], dtype)
    if not need_grad:
        assert dx is None and dy is None
        return
    assert dx.shape == (n, D) and dy.shape == (N, D) and dx.dtype == dy.dtype == torch.float32
    for name, got, lo, tr in zip(("dx", "dy", "ds", "db"), (dx, dy, ds, db), low[1:], truth[1:]):
        assert_within_budget(name, got, lo, tr, dtype)


# ---------------------------------------------------------------------------------------------------
# block primitives


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BLOCKS, ids=_ids)
def test_clip_block(case, dtype):
    _check_clip_block(*case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BLOCKS, ids=_ids)
def test_siglip_block(case, dtype):
    _check_siglip_block(*case, dtype)


@pytest.mark.parametrize("case", [(130, 70, 33, -3), (9, 200, 40, 150)], ids=_ids)
def test_siglip_block_without_grad_and_without_bias(case):
    _check_siglip_block(*case, torch.float32, need_grad=False)
    _check_siglip_block(*case, torch.float32, bias=None)


@pytest.mark.parametrize("coefs", [(0.25, 0.0, 0.5), (0.0, 0.25, 0.5), (0.25, 0.25, 0.0), (0.0, 0.0, 1.0)])
def test_clip_grad_terms(coefs):
    """Each term of G alone or dropped (the distributed strategies use row-only and column-only blocks)."""
    _check_clip_block(70, 130, 33, 5, torch.float32, coefs=coefs)


def test_clip_grad_absent_statistics_and_no_terms():
    x, y = _inputs(20, 30, 9, torch.float32)
    s = torch.tensor(5.0)
    lr, lc = kernels_clip.clip_lse(x, y, s)
    truth = _clip_block_math(x, y, 5.0, 2, (0.5, 0.0, 1.0), exact=True)
    dx, dy, ds = kernels_clip.clip_grad(x, y, s, lr, None, 0.5, 0.7, 2, 1.0)  # coef_col ignored: no lse_col
    torch.testing.assert_close(dx.double(), truth[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dy.double(), truth[3], rtol=1e-5, atol=1e-6)
    dx, dy, ds = kernels_clip.clip_grad(x, y, s, None, None, 0.5, 0.5, None, 1.0)
    assert not dx.any() and not dy.any() and ds == 0


def test_chunked_and_split_paths_match_single_pass():
    """Row chunks, column splits and several G chunks give the same numbers as one pass (forced small)."""
    _check_clip_block(
        257, 130, 200, 0, torch.float32, rows_per_chunk=64, splits=2, grad_kw={"rows_per_chunk": 100}
    )
    _check_siglip_block(257, 130, 40, -3, torch.float32, rows_per_chunk=70)
    _check_siglip_block(257, 130, 40, -3, torch.float32, need_grad=False, rows_per_chunk=64)


def test_workspace_budget_drives_chunking(monkeypatch):
    """Shrinking the workspace budgets chunks the rows (and, for gradients, the columns) automatically;
    results do not change."""
    from fastclip.kernels import config, gemm

    x, y = _inputs(150, 140, 24, torch.float32)
    s = torch.tensor(30.0)
    want_lse = kernels_clip.clip_lse(x, y, s)
    want_grad = kernels_clip.clip_grad(x, y, s, *want_lse, 0.1, 0.2, 0, 0.3)
    monkeypatch.setattr(config, "LSE_WORKSPACE_ELEMENTS", 140)  # one row block of partials per chunk
    monkeypatch.setattr(config, "GRAD_WORKSPACE_ELEMENTS", 64 * 140)
    monkeypatch.setattr(config, "MIN_GRAD_ROWS", 64)
    calls = []
    real = gemm.accumulate
    monkeypatch.setattr(gemm, "accumulate", lambda acc, a, b: calls.append(a.shape) or real(acc, a, b))
    got_lse = kernels_clip.clip_lse(x, y, s)
    got_grad = kernels_clip.clip_grad(x, y, s, *want_lse, 0.1, 0.2, 0, 0.3)
    assert [c[0] for c in calls if c[1] == 140] == [64, 64, 22]  # dX of three G chunks of <= 64 rows
    for g, w in zip(got_lse + got_grad, want_lse + want_grad):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    # Fewer rows than MIN_GRAD_ROWS fit in the budget at full width: 128-row chunks by 64-column panels.
    monkeypatch.setattr(config, "MIN_GRAD_ROWS", 128)
    calls.clear()
    got_grad = kernels_clip.clip_grad(x, y, s, *want_lse, 0.1, 0.2, 0, 0.3)
    assert config.grad_tiles(150, 140, 64 * 140, 64, 64) == (128, 128)
    assert [tuple(c) for c in calls[::2]] == [(128, 128), (128, 12), (22, 128), (22, 12)]
    for g, w in zip(got_grad, want_grad):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)


def test_forward_chunks_are_sized_by_their_partial_buffer(monkeypatch):
    """The forward's buffer holds (rows / BM) x N column partials, so a budget of P partials allows
    P * BM / N rows per chunk (not P / N), by the one rule ``config.chunk_rows`` both kernels use."""
    from fastclip.kernels import config

    assert config.chunk_rows(32768, 32768, 2**25, 128, rows_per_elem=128) == 32768  # one chunk
    x, y = _inputs(300, 200, 8, torch.float32)
    s = torch.tensor(10.0)
    want = kernels_clip.clip_lse(x, y, s)
    monkeypatch.setattr(config, "LSE_WORKSPACE_ELEMENTS", 3 * 200)  # three row blocks of partials
    grids, used = [], []
    real_rule = config.chunk_rows
    monkeypatch.setattr(config, "chunk_rows", lambda *a, **k: used.append(a[:2]) or real_rule(*a, **k))
    monkeypatch.setattr(kernels_clip, "_clip_lse_kernel", _GridSpy(kernels_clip._clip_lse_kernel, grids))
    got = kernels_clip.clip_lse(x, y, s)
    assert [g[0] for g in grids] == [3, 2]  # chunks of 192 and 108 rows in 64-row blocks
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    kernels_siglip.siglip_block(x, y, s, None, 0, False)
    kernels_siglip.siglip_block(x, y, s, None, 0, True)
    assert used == [(300, 200)] * 3  # clip_lse and both SigLIP modes size their chunks by the same rule


def test_gradient_chunks_keep_many_rows_at_large_n():
    """N > 2**18: chunks keep >= MIN_GRAD_ROWS rows and cut the columns into panels instead, so dY
    (N x D fp32) is read and written (n / c) times with c >= 2048, not once per 128 rows."""
    from fastclip.kernels import config

    n = N = 2**20
    c, nc = config.grad_tiles(n, N, config.GRAD_WORKSPACE_ELEMENTS, 128, 128)
    assert c >= 2048 and c % 128 == 0 and nc % 128 == 0 and c * nc <= config.GRAD_WORKSPACE_ELEMENTS
    dy_traffic = (n // c) * N * 768 * 8  # bytes: one read and one write of the fp32 dY per row chunk
    assert dy_traffic <= 4e12, dy_traffic  # ~3.3 TB: under 1 s at H200 bandwidth, vs ~10 s of matmul
    assert config.grad_tiles(32768, 32768, config.GRAD_WORKSPACE_ELEMENTS, 128, 128) == (2048, 32768)
    assert config.grad_tiles(100, 70, 10**6, 64, 64) == (100, 70)  # small blocks: one chunk


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_column_panels_match_single_pass(loss_name, monkeypatch):
    """Row chunks x column panels, with the positives of a negative offset crossing panel edges; one
    1-D (grouped) grid per chunk and panel."""
    grids = []
    if loss_name == "clip":
        spy = _GridSpy(kernels_clip._clip_grad_kernel, grids)
        monkeypatch.setattr(kernels_clip, "_clip_grad_kernel", spy)
        _check_clip_block(
            257, 230, 40, -3, torch.float32, grad_kw={"rows_per_chunk": 100, "cols_per_panel": 64}
        )
        _check_clip_block(130, 200, 24, 60, torch.bfloat16, grad_kw={"cols_per_panel": 128})
    else:
        monkeypatch.setattr(
            kernels_siglip, "_siglip_tile_kernel", _GridSpy(kernels_siglip._siglip_tile_kernel, grids)
        )
        _check_siglip_block(257, 230, 40, -3, torch.float32, rows_per_chunk=100, cols_per_panel=64)
        _check_siglip_block(130, 200, 24, 60, torch.bfloat16, cols_per_panel=128)
    # 64 x 64 tiles: 3 row chunks (100, 100, 57 rows) x 4 panels (64, 64, 64, 38 columns); then 1 x 2 (128, 72).
    assert grids == [(2,)] * 8 + [(1,)] * 4 + [(6,), (6,)]


class _GridSpy:
    """Stands in for a kernel: records each launch grid, then launches the real kernel."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.fixture
def fp32_precision_restored():
    """Puts torch's fp32 matmul precision settings back after a test that changes them."""
    matmul = torch.backends.cuda.matmul
    has_new = hasattr(matmul, "fp32_precision")
    saved = (matmul.fp32_precision, torch.backends.fp32_precision) if has_new else matmul.allow_tf32
    yield has_new
    if has_new:
        matmul.fp32_precision, torch.backends.fp32_precision = saved
    else:
        matmul.allow_tf32 = saved


def test_tf32_setting_is_read_with_either_precision_api(monkeypatch, fp32_precision_restored):
    """After ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (torch >= 2.9) reading the legacy
    ``allow_tf32`` raises in torch 2.13; the kernels' flags must follow both APIs without raising."""
    from fastclip.kernels import common, config, gemm

    monkeypatch.setattr(config, "interpreting", lambda: False)  # the flags a GPU launch computes
    matmul = torch.backends.cuda.matmul
    if fp32_precision_restored:
        matmul.fp32_precision = "tf32"
        assert common.meta_flags(torch.float32)["IEEE"] is False
        assert common.dot_path(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert common.meta_flags(torch.float32)["IEEE"] is True
        matmul.fp32_precision = "none"  # inherit from the global setting
        torch.backends.fp32_precision = "tf32"
        assert gemm.tf32_enabled() is True
        torch.backends.fp32_precision = "none"
    # Neither new setting made (or torch < 2.9): the legacy flag decides.
    monkeypatch.setattr(gemm, "_has_fp32_precision_api", lambda: False)
    for flag in (True, False):
        matmul.allow_tf32 = flag
        assert gemm.tf32_enabled() is flag
        assert common.dot_path(torch.float32) == ("tf32" if flag else "fp32-fma")
    assert common.dot_path(torch.bfloat16) == "tensor-core-bf16"
    assert common.dot_path(torch.float16) == "tensor-core-fp16"


def test_fp32_output_gemm_is_chosen_by_schema_and_survives_an_oom(monkeypatch):
    """The ``out_dtype`` capability comes from the operator schema, once; an out-of-memory error in a
    real call propagates and does not switch later calls to bf16-rounded products."""
    from fastclip.kernels import gemm

    assert gemm.mm_out_dtype_schema() == ("dtype" in torch.ops.aten.mm.overloads())
    assert gemm.fp32_out_mm(torch.device("cpu")) is False  # torch has no CPU kernel for mm.dtype
    calls = []

    def fake_mm(a, b, *, out_dtype=None):
        calls.append(out_dtype)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 MiB")
        return a.float() @ b.float()

    monkeypatch.setattr(gemm, "fp32_out_mm", lambda device: True)  # as on a CUDA device
    monkeypatch.setattr(torch, "mm", fake_mm)
    a, b = torch.randn(4, 3).bfloat16(), torch.randn(3, 5).bfloat16()
    with pytest.raises(torch.OutOfMemoryError):
        gemm.mm_f32(a, b)
    out = gemm.mm_f32(a, b)
    assert calls == [torch.float32, torch.float32] and out.dtype == torch.float32


def test_dy_pieces_start_on_128_row_boundaries(monkeypatch):
    """Without an in-place fp32-output addmm, dY is accumulated in pieces of G's columns; every piece
    starts on a 128-row (256-byte) boundary, whatever D makes DY_PIECE_ELEMENTS // D."""
    from fastclip.kernels import config, gemm

    monkeypatch.setattr(gemm, "addmm_f32_accumulates", lambda device: False)
    x, y = _inputs(40, 300, 4, torch.bfloat16)
    s = torch.tensor(5.0)
    lse = kernels_clip.clip_lse(x, y, s)
    want = kernels_clip.clip_grad(x, y, s, *lse, 0.1, 0.2, 0, 0.3)
    monkeypatch.setattr(config, "DY_PIECE_ELEMENTS", 50 * 4)  # 50 rows of D = 4: rounded to 128
    starts = []
    real = gemm.mm_f32
    monkeypatch.setattr(
        gemm, "mm_f32", lambda a, b: starts.append((a.storage_offset(), a.shape)) or real(a, b)
    )
    got = kernels_clip.clip_grad(x, y, s, *lse, 0.1, 0.2, 0, 0.3)
    dy_pieces = [(off, shape[0]) for off, shape in starts if shape[1] == 40]  # G^T pieces: (rows of dY, c)
    assert dy_pieces == [(0, 128), (128, 128), (256, 44)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@triton.jit
def _order_kernel(out_ptr, n, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_m, pid_n = kernels_common.grouped_tile(pid, n, N, BM, BN, GROUP_M)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


def test_grouped_grid_order_reads_each_column_tile_once_per_group():
    """The tile kernels' program order: a bijection onto (row block, column tile) in which GROUP_M row
    blocks sweep the columns together, so a column tile of Y is fetched once per group (an LRU cache
    of GROUP_M + 1 tiles in the model below) instead of once per row block."""
    num_m, num_n, group = 10, 7, 4
    out = torch.full((num_m * num_n, 2), -1, dtype=torch.int32)
    _order_kernel[(num_m * num_n,)](out, num_m * 16, num_n * 16, BM=16, BN=16, GROUP_M=group)
    tiles = [tuple(t) for t in out.tolist()]
    assert sorted(tiles) == [(m, j) for m in range(num_m) for j in range(num_n)]
    loads, cache = 0, []
    for _m, j in tiles:  # Y traffic of this order with a small LRU cache of column tiles
        if j in cache:
            cache.remove(j)
        else:
            loads += 1
        cache = ([j] + cache)[: group + 1]
    assert loads == -(-num_m // group) * num_n  # 21, against num_m * num_n = 70 column-fastest


def test_large_scale_low_cosines_do_not_underflow():
    """s = 100 with strongly negative cosines: a fixed shift by s would underflow exp; partials must not."""
    x, y = _inputs(70, 90, 16, torch.float32, seed=7)
    y = -x[:1].repeat(90, 1) + 0.05 * y  # every logit near -100
    s = torch.tensor(100.0)
    truth = _clip_block_math(x, y, 100.0, None, (1.0, 1.0, 0.0), exact=True)
    lse_row, lse_col = kernels_clip.clip_lse(x, y, s)
    assert torch.isfinite(lse_col).all() and torch.isfinite(lse_row).all()
    torch.testing.assert_close(lse_row.double(), truth[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(lse_col.double(), truth[1], rtol=1e-5, atol=1e-4)


def test_non_contiguous_inputs():
    x, y = _inputs(40, 50, 12, torch.float32)
    xt, yt = x.T.contiguous().T, y[:, :].T.contiguous().T  # column-major views
    assert not xt.is_contiguous()
    s = torch.tensor(8.0)
    for got, want in zip(kernels_clip.clip_lse(xt, yt, s), kernels_clip.clip_lse(x, y, s)):
        torch.testing.assert_close(got, want)
    got = kernels_siglip.siglip_block(xt, yt, s, None, 1, True)
    want = kernels_siglip.siglip_block(x, y, s, None, 1, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_repeat_is_bitwise_identical():
    x, y = _inputs(130, 70, 33, torch.bfloat16)
    s = torch.tensor(30.0)
    a = kernels_clip.clip_lse(x, y, s) + kernels_clip.clip_grad(
        x, y, s, *kernels_clip.clip_lse(x, y, s), 0.1, 0.1, 0, 0.2
    )
    b = kernels_clip.clip_lse(x, y, s) + kernels_clip.clip_grad(
        x, y, s, *kernels_clip.clip_lse(x, y, s), 0.1, 0.1, 0, 0.2
    )
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_launchers_reject_bad_input():
    x, y = _inputs(5, 6, 4, torch.float32)
    s = torch.tensor(2.0)
    with pytest.raises(TypeError, match=r"x: expected float32, bfloat16 or float16.*got torch.float64"):
        kernels_clip.clip_lse(x.double(), y.double(), s)
    with pytest.raises(ValueError, match=r"y: expected feature dim 4 \(as x\), got 3"):
        kernels_clip.clip_lse(x, y[:, :3], s)
    with pytest.raises(TypeError, match=r"y: expected dtype torch.float32 \(as x\), got torch.float16"):
        kernels_siglip.siglip_block(x, y.half(), s, None, 0, True)
    with pytest.raises(ValueError, match=r"x: expected a non-empty 2-D"):
        kernels_clip.clip_lse(x[:0], y, s)
    with pytest.raises(ValueError, match=r"scale: expected a 1-element floating tensor, got \(2,\)"):
        kernels_clip.clip_lse(x, y, torch.ones(2))
    with pytest.raises(ValueError, match=r"lse_col: expected a float32 tensor of shape \(6,\)"):
        kernels_clip.clip_grad(x, y, s, torch.zeros(5), torch.zeros(5), 1.0, 1.0, 0, 1.0)
    with pytest.raises(TypeError, match=r"offset: expected an int or None, got bool"):
        kernels_clip.clip_grad(x, y, s, None, None, 1.0, 1.0, True, 1.0)
    with pytest.raises(ValueError, match=r"pos_coef: expected a finite float, got nan"):
        kernels_clip.clip_grad(x, y, s, None, None, 1.0, 1.0, 0, float("nan"))
    with pytest.raises(TypeError, match=r"need_grad: expected a bool, got int"):
        kernels_siglip.siglip_block(x, y, s, None, 0, 1)
    with pytest.raises(ValueError, match=r"bias: expected a 1-element floating tensor or None, got \(3,\)"):
        kernels_siglip.siglip_block(x, y, s, torch.ones(3), 0, True)


# ---------------------------------------------------------------------------------------------------
# the ops level: fastclip.clip_loss / siglip_loss with impl="triton"

LOSSES = {
    "clip": (fastclip.clip_loss, clip_loss_reference),
    "siglip": (fastclip.siglip_loss, siglip_loss_reference),
}


def _check_loss(loss_name, n, d, dtype, device="cpu", scale=20.0, bias=-5.0):
    fn, ref = LOSSES[loss_name]
    x = features(n, d, dtype, seed=n + d, device=device)
    y = features(n, d, dtype, seed=n + d + 1, device=device)
    s, b = scalar(scale, device=device), scalar(bias, device=device)
    got, got_g = loss_and_grads(fn, x, y, s, b, impl="triton")
    low, low_g = loss_and_grads(ref, x, y, s, b)
    x64, y64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, y, s, b))
    truth, truth_g = loss_and_grads(ref, x64, y64, s64, b64)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got_g[0].dtype == dtype and got_g[1].dtype == dtype
    assert_within_budget("loss", got, low, truth, dtype)
    for name, g, lg, tg in zip(("image", "text", "scale", "bias"), got_g, low_g, truth_g):
        assert_within_budget(name, g, lg, tg, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 1), (7, 3), (130, 48), (257, 200)])
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_impl_triton(loss_name, n, d, dtype):
    _check_loss(loss_name, n, d, dtype)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_impl_triton_matches_torch_impl_and_module(loss_name):
    fn, _ = LOSSES[loss_name]
    x, y, s, b = features(33, 17), features(33, 17, seed=1), scalar(30.0), scalar(-8.0)
    got, got_g = loss_and_grads(fn, x, y, s, b, impl="triton")
    want, want_g = loss_and_grads(fn, x, y, s, b, impl="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    module = fastclip.ClipLoss(impl="triton") if loss_name == "clip" else fastclip.SigLipLoss(impl="triton")
    torch.testing.assert_close(module(x, y, s, b) if loss_name == "siglip" else module(x, y, s), want)


@pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning"
)  # numpy, inside the interpreter
@pytest.mark.parametrize("loss_name", LOSSES)
def test_loss_impl_triton_non_finite_features_give_nan(loss_name):
    fn, _ = LOSSES[loss_name]
    x, y = features(10, 4, requires_grad=False), features(10, 4, seed=1, requires_grad=False)
    x[3, 1] = float("nan")
    assert torch.isnan(fn(x, y, scalar(10.0), scalar(-2.0), impl="triton"))
    y[0, 0] = float("inf")
    assert torch.isnan(fn(x.nan_to_num(), y, scalar(10.0), scalar(-2.0), impl="triton"))


def test_impl_triton_rejects_float64_and_auto_uses_torch():
    x, y = features(6, 3, torch.float64), features(6, 3, torch.float64, seed=1)
    with pytest.raises(
        TypeError, match=r"impl='triton': expected features of dtype float32.*got torch.float64"
    ):
        fastclip.clip_loss(x, y, scalar(5.0), impl="triton")
    from fastclip.ops.dispatch import resolve_impl

    assert resolve_impl("auto", torch.device("cpu"), dtype=torch.float64) == "torch"


# ---------------------------------------------------------------------------------------------------
# TF32: fp32 operands rounded to nearest TF32 before the tensor cores (kernels/common.py)

_TF32_MAX = (2.0 - 2.0**-10) * 2.0**127


def _tf32_nearest(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest TF32 (ties away from zero) of fp32 ``a``, emulated in float64 from the
    definition: 11 significant bits, spacing 2**(e - 11) in the binade [2**(e-1), 2**e), fp32's
    subnormal range on the spacing of its lowest normal binade, overflow past the largest TF32 to inf."""
    a64 = a.astype(np.float64)
    out = a64.copy()
    fin = np.isfinite(a64) & (a64 != 0)
    mag = np.abs(a64[fin])
    _, e = np.frexp(mag)  # mag = m * 2**e, 0.5 <= m < 1
    spacing = np.ldexp(1.0, np.maximum(e, -125) - 11)
    r = np.floor(mag / spacing + 0.5) * spacing  # exact in float64: a power-of-two scaling
    r[r > _TF32_MAX] = np.inf
    out[fin] = np.copysign(r, a64[fin])
    return out.astype(np.float32)


def _fp32_from_bits(bits) -> torch.Tensor:
    return torch.from_numpy(np.asarray(bits, dtype=np.uint32).view(np.float32).copy())


def test_round_tf32_is_bitwise_round_to_nearest_with_inf_and_nan_kept():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(20000, generator=g) * torch.exp2(
        torch.randint(-150, 128, (20000,), generator=g).float()
    )
    mant = torch.randint(0, 2**23, (4000,), generator=g, dtype=torch.int64)
    expo = torch.randint(0, 255, (4000,), generator=g, dtype=torch.int64)
    sign = torch.randint(0, 2, (4000,), generator=g, dtype=torch.int64)
    # Exact ties (dropped bits 0x1000), one below and one above, with every exponent incl. subnormals.
    tie_bits = (sign << 31) | (expo << 23) | (mant & ~0x1FFF)
    ties = np.concatenate([tie_bits + 0x1000, tie_bits + 0x0FFF, tie_bits + 0x1001]) & 0xFFFFFFFF
    # fmt: off
    edges = [
        0x00000000, 0x80000000, 0x00000001, 0x00001000, 0x00000FFF, 0x007FFFFF, 0x00800000,
        0x7F7FE000, 0x7F7FEFFF, 0x7F7FF000, 0x7F7FFFFF, 0xFF7FF000,  # around the largest TF32
        0x3F800FFF, 0x3F801000, 0x3F801FFF, 0x3FFFF000,  # 1 + ties, carry into the exponent
        0x7F800000, 0xFF800000,  # +-inf
    ]
    # fmt: on
    x = torch.cat([wide, _fp32_from_bits(ties), _fp32_from_bits(edges)])
    got = kernels_common.round_tf32_tensor(x)
    want = torch.from_numpy(_tf32_nearest(x.numpy()))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert (got.view(torch.int32) & 0x1FFF == 0).all()  # exactly representable in TF32
    assert torch.isinf(got[-2:]).all() and got[-1] < 0
    assert torch.isinf(kernels_common.round_tf32_tensor(_fp32_from_bits([0x7F7FFFFF, 0xFF7FF000]))).all()
    # NaN stays NaN, also when its payload is only in the bits the tensor cores drop.
    nans = _fp32_from_bits([0x7FC00000, 0xFFFFFFFF, 0x7F800001, 0xFF801000, 0x7FFFF000])
    out = kernels_common.round_tf32_tensor(nans)
    assert torch.isnan(out).all()
    assert torch.isnan((out.view(torch.int32) & ~0x1FFF).view(torch.float32)).all()


def _set_tf32(enabled: bool) -> None:
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if enabled else "ieee"
    else:
        matmul.allow_tf32 = enabled
    from fastclip.kernels import gemm

    assert gemm.tf32_enabled() is enabled


@pytest.fixture
def tf32_on(fp32_precision_restored):
    _set_tf32(True)
    yield


def _tf32(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(_tf32_nearest(t.detach().numpy()))


def test_tf32_launchers_multiply_operands_rounded_to_nearest(tf32_on):
    """Under the interpreter the launchers round fp32 operands as on a GPU with TF32 on: the tiles
    equal float64 math on TF32-rounded X and Y (and are far from the unrounded math, so the check can
    fail); the gradients' GEMMs read the unrounded X and Y; bf16 operands are not touched."""
    n, N, D, off = 70, 130, 33, 5
    x, y = _inputs(n, N, D, torch.float32, seed=11)
    xr, yr = _tf32(x), _tf32(y)
    assert not torch.equal(xr, x)
    s, coefs = 100.0, (0.3, 0.2, 0.5)
    lr, lc = kernels_clip.clip_lse(x, y, torch.tensor(s))
    want = _clip_block_math(xr, yr, s, off, coefs, exact=True)
    unrounded = _clip_block_math(x, y, s, off, coefs, exact=True)
    for got, w, u in ((lr, want[0], unrounded[0]), (lc, want[1], unrounded[1])):
        err, far = float((got.double() - w).abs().max()), float((u - w).abs().max())
        assert err <= 2e-5 and far >= 50 * err, (err, far)
    dx, dy, ds = kernels_clip.clip_grad(
        x, y, torch.tensor(s), want[0].float(), want[1].float(), *coefs[:2], off, coefs[2]
    )
    # G from the rounded similarities, then s * G @ y with the unrounded y (cuBLAS's own operands).
    S = xr.double() @ yr.double().T
    L = s * S
    G = (
        coefs[0] * torch.exp(L - want[0][:, None])
        + coefs[1] * torch.exp(L - want[1][None, :])
        - coefs[2] * _positives(n, N, off, "cpu")
    )
    for got, w, w_rounded in (
        (dx, s * G @ y.double(), s * G @ yr.double()),
        (dy, s * G.T @ x.double(), s * G.T @ xr.double()),
    ):
        err, far = float((got.double() - w).abs().max()), float((w_rounded - w).abs().max())
        assert err <= 2e-5 * float(w.abs().max()) and far >= 20 * err, (err, far)
    torch.testing.assert_close(ds.double(), (G * S).sum(), rtol=1e-5, atol=0)
    loss, sdx, _, _, _ = kernels_siglip.siglip_block(x, y, torch.tensor(10.0), torch.tensor(-10.0), off, True)
    sw = _siglip_block_math(xr, yr, 10.0, -10.0, off, exact=True)
    su = _siglip_block_math(x, y, 10.0, -10.0, off, exact=True)
    err, far = abs(float(loss) - float(sw[0])), abs(float(su[0]) - float(sw[0]))
    assert err <= 1e-4 and far >= 10 * err, (err, far)
    Gs = torch.sigmoid(10.0 * (xr.double() @ yr.double().T) - 10.0) - _positives(n, N, off, "cpu")
    torch.testing.assert_close(sdx.double(), 10.0 * Gs @ y.double(), rtol=1e-5, atol=1e-5)
    # 16-bit operands are exact in TF32: no rounding pass, the same numbers as with TF32 off.
    xb, yb = x.bfloat16(), y.bfloat16()
    on = kernels_clip.clip_lse(xb, yb, torch.tensor(s))
    _set_tf32(False)
    off_ = kernels_clip.clip_lse(xb, yb, torch.tensor(s))
    assert all(torch.equal(a, b) for a, b in zip(on, off_))
    # fp32 with TF32 off: the unrounded operands.
    lr_ieee, _ = kernels_clip.clip_lse(x, y, torch.tensor(s))
    assert float((lr_ieee.double() - unrounded[0]).abs().max()) <= 2e-5


def test_tf32_rounding_runs_only_for_fp32_with_tf32_on(tf32_on, monkeypatch):
    calls = []
    real = kernels_common.round_tf32_tensor
    monkeypatch.setattr(kernels_common, "round_tf32_tensor", lambda t: calls.append(t.shape) or real(t))
    x, y = _inputs(9, 12, 5, torch.float32)
    kernels_common.dot_operands(x, y)
    assert calls == [(9, 5), (12, 5)]
    for dtype in (torch.bfloat16, torch.float16):
        xo, yo = kernels_common.dot_operands(x.to(dtype), y.to(dtype))
        assert xo.dtype == dtype and len(calls) == 2
    _set_tf32(False)
    xo, yo = kernels_common.dot_operands(x, y)
    assert xo is x and yo is y and len(calls) == 2


def test_tf32_distillation_kernels_round_both_pairs(tf32_on):
    """The distillation kernels (two tiles per program, student and teacher) round both fp32 pairs."""
    from fastclip.kernels import distill as kd

    x, y = _inputs(40, 50, 24, torch.float32, seed=3)
    xt, yt = _inputs(40, 50, 20, torch.float32, seed=5)
    s, t = torch.tensor(60.0), torch.tensor(80.0)
    lse_s, lse_t, *_ = kd.distill_stats(x, y, s, xt, yt, t, False)
    for got, a, b, scale in ((lse_s, x, y, 60.0), (lse_t, xt, yt, 80.0)):
        want = (scale * _tf32(a).double() @ _tf32(b).double().T).logsumexp(1)
        unrounded = (scale * a.double() @ b.double().T).logsumexp(1)
        err, far = float((got.double() - want).abs().max()), float((unrounded - want).abs().max())
        assert err <= 2e-5 and far >= 50 * err, (err, far)


def test_launchers_make_the_tensors_cuda_device_current(monkeypatch):
    """Triton launches on the current CUDA device: a launcher called with cuda:1 tensors while cuda:0
    is current must switch to cuda:1 for the call (and only then)."""
    from fastclip.kernels import clip, common, distill, family, siglip

    for fn in (
        clip.clip_lse,
        clip.clip_grad,
        siglip.siglip_block,
        distill.distill_stats,
        distill.distill_grad,
        family.family_triton,
    ):
        assert getattr(fn, "__wrapped__", None) is not None, fn.__name__  # every launcher is guarded

    class OnCuda1(torch.Tensor):
        is_cuda = True
        device = torch.device("cuda", 1)

    entered = []

    class Ctx:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Ctx)
    seen = []
    guarded = common.on_tensor_device(lambda *a, **k: seen.append(len(entered)) or "ran")
    t = torch.Tensor._make_subclass(OnCuda1, torch.zeros(2))
    assert guarded("spec", [t], scale=1.0) == "ran" and entered == [torch.device("cuda", 1)] and seen == [1]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert guarded(t) == "ran" and len(entered) == 1  # already current: no switch
    assert guarded(torch.zeros(2)) == "ran" and len(entered) == 1  # CPU tensors: no switch


def test_family_and_distillation_own_their_tile_configurations(monkeypatch):
    """kernels/config.py: the family's and the distillation passes' tiles are their own entries, with the
    values they ran with when they derived from CLIP's (AOT-checked), and a tuned CLIP entry does not move
    them (a 64-row, 4-warp tile spills 28-46 stores in the family's forward on sm_90)."""
    from fastclip.kernels import config

    cuda = torch.device("cuda")
    for arch, want in {
        "hopper": {
            "family-lse": "64x64x64w8s3",
            "family-grad": "128x64x64w8s3",
            "distill-lse": "64x128x64w8s3",
        },
        "ampere": {
            "family-lse": "64x64x32w8s3",
            "family-grad": "128x64x32w8s3",
            "distill-tile": "64x128x32w8s3",
        },
    }.items():
        monkeypatch.setattr(config, "arch", lambda device, _a=arch: _a)
        for kernel, name in want.items():
            assert config.tile_config(kernel, cuda, torch.bfloat16, 768).name() == name, (arch, kernel)
        # fp32 operands take twice the shared memory: the K step is capped at 32 for them too
        assert config.tile_config("family-lse", cuda, torch.float32, 768).block_k == 32
        tuned = config.TileConfig(64, 128, 64, num_warps=4, num_stages=4, epilogue="exp2", tma=True)
        monkeypatch.setitem(config.TUNED, (arch, "lse", "bfloat16", 768), tuned)
        monkeypatch.setitem(config.TUNED, (arch, "tile", "bfloat16", 768), tuned)
        assert config.tile_config("lse", cuda, torch.bfloat16, 768) == tuned
        for kernel, name in want.items():
            assert config.tile_config(kernel, cuda, torch.bfloat16, 768).name() == name, (
                arch,
                kernel,
                "tuned",
            )
    with pytest.raises(ValueError, match="kernel: expected one of"):
        config.tile_config("family", torch.device("cpu"))
