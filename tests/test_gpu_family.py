"""The fused contrastive-family kernels compiled on a CUDA GPU (``pytest -m gpu``; skipped without CUDA).

tests/test_family_triton_pieces.py runs the same comparisons through the interpreter on CPU; here the
kernels run compiled (wgmma / mma, real bf16, cp.async pipelines), against the PyTorch implementation of
the same spec on the same device: every direction with ids, the hardness shift and a bank, with row
chunks and column panels forced small; GIST with a duplicate positive; per-direction partitions with a
caller's chunk size. bf16 only (the fp32 path shares the code, and every variant costs a compile within
the GPU test budget). Tolerance: relative norm error per output, bf16 G tiles round at ~4e-3."""

from __future__ import annotations

import pytest
import torch

from fastclip.ops.family_variants import GistOptions, InfoNCEOptions, Layout, gist_spec, info_nce_spec

pytestmark = pytest.mark.gpu
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _unit(n, d, g):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, device="cuda"), dim=-1)


def _compare(spec, ts, ids, guides, thr, need, chunk_size=None, tol=2e-2):
    from fastclip.kernels.family import family_triton

    from fastclip.ops.family_impl import family_torch

    scale = torch.tensor(20.0, device="cuda")
    want = family_torch(spec, [t.float() for t in ts], ids, guides, thr, scale, need, True, None)
    got = family_triton(spec, ts, ids, guides, thr, scale, need, True, chunk_size)
    for name, a, b in (("loss", got[0], want[0]), ("ds", got[1], want[1])):
        assert float((a - b).abs()) <= tol * max(1.0, float(b.abs())), (name, float(a), float(b))
    for i, (a, b) in enumerate(zip(got[2], want[2])):
        assert (a is None) == (b is None), i
        if a is not None:
            rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
            assert rel <= tol, f"operand {i}: relative error {rel:.2e}"


def test_every_direction_ids_hardness_and_a_bank_in_pieces(monkeypatch):
    from fastclip.kernels import config

    monkeypatch.setattr(config, "GRAD_WORKSPACE_ELEMENTS", 256 * 1000)  # 256-row chunks x panels
    monkeypatch.setattr(config, "MIN_GRAD_ROWS", 256)
    g = torch.Generator(device="cuda").manual_seed(0)
    n, d = 1000, 128
    ts = [_unit(n, d, g).bfloat16() for _ in range(4)] + [_unit(300, d, g).bfloat16()]
    ids = [torch.randint(0, 300, (n,), generator=g, device="cuda") for _ in range(4)] + [None]
    lay = Layout(q=0, p=1, Q=0, P=1, N=(2, 3), bank=4, with_ids=frozenset({0, 1, 2, 3}))
    spec = info_nce_spec(InfoNCEOptions(ALL, "joint", "in_batch_negatives", 1.5, "positive", 0.1), lay, n)
    _compare(spec, ts, ids, [None] * 5, None, [True, True, True, True, False])


def test_gist_with_a_duplicate_positive():
    g = torch.Generator(device="cuda").manual_seed(1)
    n, d = 700, 96
    ts = [_unit(n, d, g).bfloat16() for _ in range(3)]
    guides = [_unit(n, 32, g) for _ in range(3)]
    guides[1][5] = guides[1][4]
    spec = gist_spec(GistOptions(), Layout(q=0, p=1, Q=0, P=1, N=(2,)), n)
    _compare(spec, ts, [None] * 3, guides, torch.full((n,), 0.05, device="cuda"), [True] * 3)


def test_per_direction_with_a_callers_chunk_size():
    g = torch.Generator(device="cuda").manual_seed(2)
    n, d = 900, 64
    ts = [_unit(n, d, g).bfloat16() for _ in range(3)]
    o = InfoNCEOptions(("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives", 2.0)
    spec = info_nce_spec(o, Layout(q=0, p=1, Q=0, P=1, N=(2,)), n)
    _compare(spec, ts, [None] * 3, [None] * 3, None, [True] * 3, chunk_size=300)
