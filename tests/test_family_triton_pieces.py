"""The fused family kernels' gradient pieces: several row chunks, column panels of whole segment tiles, a
caller's ``chunk_size``, a no-gradient bank inside a group, and gathered-column offsets, each against the
PyTorch implementation of the same spec (kernels/family.py; the interpreter runs the kernels on CPU)."""

from __future__ import annotations

import pytest
import torch

from fastclip.ops.dispatch import triton_available
from fastclip.ops.family_variants import GistOptions, InfoNCEOptions, Layout, gist_spec, info_nce_spec

pytestmark = [
    pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="needs TRITON_INTERPRET=1"),
    pytest.mark.interpreter,
]
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _both(spec, ts, ids, guides, thr, need, chunk_size=None):
    from fastclip.kernels.family import family_triton

    from fastclip.ops.family_impl import family_torch

    scale = torch.tensor(7.0)
    a = family_torch(spec, ts, ids, guides, thr, scale, need, True, None)
    b = family_triton(spec, ts, ids, guides, thr, scale, need, True, chunk_size)
    return a, b


def _close(a, b, tol=2e-5):
    (la, dsa, ga), (lb, dsb, gb) = a, b
    assert abs(float(la) - float(lb)) <= tol * max(1.0, abs(float(la))), (float(la), float(lb))
    assert abs(float(dsa) - float(dsb)) <= tol * max(1.0, abs(float(dsa))), (float(dsa), float(dsb))
    for i, (x, y) in enumerate(zip(ga, gb)):
        assert (x is None) == (y is None), i
        if x is not None:
            err = float((x - y).abs().max())
            assert err <= tol * max(1.0, float(x.abs().max())), f"operand {i}: {err:.2e}"


def _inputs(n, d, n_ops, seed=0, n_bank=0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) for _ in range(n_ops)]
    if n_bank:
        ts.append(torch.nn.functional.normalize(torch.randn(n_bank, d, generator=g), dim=-1))
    return ts, g


# None: one piece. Else chunks of 128 rows (MIN_GRAD_ROWS) by panels of 128 columns (two 64-column tiles),
# config.grad_tiles's rule when a budget of rows x columns cannot hold that many full-width rows.
@pytest.mark.parametrize("budget", [None, 128 * 130])
def test_chunks_panels_and_a_bank(monkeypatch, budget):
    from fastclip.kernels import config

    if budget is not None:
        monkeypatch.setattr(config, "GRAD_WORKSPACE_ELEMENTS", budget)
        monkeypatch.setattr(config, "MIN_GRAD_ROWS", 128)
    n, d = 150, 24
    ts, g = _inputs(n, d, 4, n_bank=70)  # q, p, two negative groups, a bank
    ids = [torch.randint(0, 40, (n,), generator=g) for _ in range(4)] + [None]
    lay = Layout(q=0, p=1, Q=0, P=1, N=(2, 3), bank=4, with_ids=frozenset({0, 1, 2, 3}))
    o = InfoNCEOptions(ALL, "joint", "in_batch_negatives", 1.5, "positive", 0.1)
    spec = info_nce_spec(o, lay, n)
    need = [True, True, True, True, False]  # the bank: no gradient, ordered last in its group
    _close(*_both(spec, ts, ids, [None] * 5, None, need))


def test_callers_chunk_size_and_per_direction():
    n, d = 130, 16
    ts, _ = _inputs(n, d, 3)
    lay = Layout(q=0, p=1, Q=0, P=1, N=(2,))
    o = InfoNCEOptions(("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives", 2.0)
    spec = info_nce_spec(o, lay, n)
    _close(*_both(spec, ts, [None] * 3, [None] * 3, None, [True] * 3, chunk_size=50))


def test_gathered_columns_with_an_offset():
    """Rows 40..79 of a 3-rank gather of 40 rows each: own columns at i + 40 in every segment."""
    n, d = 40, 16
    ts, _ = _inputs(n, d, 2)
    cols, _ = _inputs(3 * n, d, 3, seed=1)
    cols[0][n : 2 * n], cols[1][n : 2 * n] = ts[0], ts[1]  # this rank's rows inside the gathered ones
    ops = [ts[0], ts[1], cols[0], cols[1], cols[2]]
    lay = Layout(q=0, p=1, Q=2, P=3, N=(4,), offset=n)
    spec = info_nce_spec(InfoNCEOptions(ALL), lay, n)
    _close(*_both(spec, ops, [None] * 5, [None] * 5, None, [True] * 5))


def test_gist_with_panels(monkeypatch):
    from fastclip.kernels import config

    monkeypatch.setattr(config, "GRAD_WORKSPACE_ELEMENTS", 128 * 100)
    monkeypatch.setattr(config, "MIN_GRAD_ROWS", 128)
    n, d = 100, 16
    ts, g = _inputs(n, d, 3)
    guides = [torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1) for _ in range(3)]
    guides[1][5] = guides[1][4]  # a duplicate positive: ties with its threshold exactly
    spec = gist_spec(GistOptions(), Layout(q=0, p=1, Q=0, P=1, N=(2,)), n)
    thr = torch.full((n,), 0.05)
    _close(*_both(spec, ts, [None] * 3, guides, thr, [True] * 3))


def test_row_offsets_past_32_bits_are_refused():
    """The kernels find a row's own column in 32-bit arithmetic: a row offset (rank x local batch) that
    would overflow it is a one-line ValueError before any launch, not a silently wrong own column."""
    from fastclip.kernels.family import family_triton

    ts, _ = _inputs(8, 16, 3)
    spec = info_nce_spec(InfoNCEOptions(), Layout(q=0, p=1, Q=0, P=1, N=(2,), offset=2**31 - 4), 8)
    with pytest.raises(
        ValueError, match=r"ts: expected fewer than 2\*\*31 rows per operand plus the row offset"
    ):
        family_triton(spec, ts, [None] * 3, [None] * 3, None, torch.tensor(7.0), [True] * 3, True)
