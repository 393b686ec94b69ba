"""Host work of one fused contrastive-family call (the Triton path), counted on CPU.

The launcher (kernels/family.py) is driven with ``meta`` tensors of a training step's shapes (B = 16384,
D = 768, the sm_90 configuration): every torch op it issues is counted by a dispatch mode, every kernel
launch by a stand-in for the kernel, and nothing is computed. The counts are the host's work per call:
the forward's must not grow with the number of hard-negative groups K (the groups' columns are one
operand, the segments a loop inside the kernel), the gradient's at most linearly in K + 1 (its
chunks, and one add per column operand). Before the column model a call made 755 ATen ops at K = 0
and 2,387 at K = 1 (issue 29).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastclip.ops.family_variants import InfoNCEOptions, Layout, info_nce_spec

kf = pytest.importorskip("fastclip.kernels.family")

B, DIM = 16384, 768


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class _Kernel:
    """A stand-in for a Triton kernel: ``kernel[grid](...)`` counts a launch and computes nothing."""

    def __init__(self, counter):
        self.counter = counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter["launches"] += 1

        return launch


def _count(monkeypatch, k: int, grads: bool, **options) -> dict:
    counter = {"launches": 0}
    for name in ("_family_lse_kernel", "_family_grad_kernel", "_guide_threshold_kernel"):
        monkeypatch.setattr(kf, name, _Kernel(counter))
    monkeypatch.setattr(kf.config, "arch", lambda device: "hopper")
    monkeypatch.setattr(kf.config, "interpreting", lambda: False)
    # As on CUDA with a torch that has the fp32-output addmm (gemm.accumulate's first path).
    monkeypatch.setattr(kf.gemm, "addmm_f32_accumulates", lambda device: True)
    n_ops = 2 + k
    lay = Layout(q=0, p=1, Q=0, P=1, N=tuple(range(2, 2 + k)))
    spec = info_nce_spec(InfoNCEOptions(**options), lay, B)
    ts = [torch.empty(B, DIM, dtype=torch.bfloat16, device="meta") for _ in range(n_ops)]
    scale = torch.empty((), device="meta")
    args = (spec, ts, [None] * n_ops, [None] * n_ops, None, scale, [grads] * n_ops, grads)
    kf.family_triton(*args)  # the segment tables are cached per spec and shape: a loop's later calls
    counter["launches"] = 0
    mode = _Count()
    with mode:
        kf.family_triton(*args)
    return {"ops": mode.ops, **counter}


def test_forward_host_work_does_not_grow_with_k(monkeypatch):
    counts = {k: _count(monkeypatch, k, grads=False) for k in (0, 1, 3, 7)}
    # K = 0 has one column operand (no concatenation); from K = 1 on, every K costs the same.
    assert counts[1] == counts[3] == counts[7], counts
    assert counts[0]["ops"] <= counts[1]["ops"] and counts[0]["launches"] == counts[1]["launches"] == 1, (
        counts
    )
    # Pinned (torch 2.13): the forward is ~40 torch ops and one launch, whatever K.
    assert counts[7]["ops"] <= 60, counts


def test_gradient_host_work_is_linear_in_k_plus_1(monkeypatch):
    fwd = {k: _count(monkeypatch, k, grads=False) for k in (1, 3, 7)}
    full = {k: _count(monkeypatch, k, grads=True) for k in (1, 3, 7)}
    grad = {k: full[k]["ops"] - fwd[k]["ops"] for k in full}
    launches = {k: full[k]["launches"] - 1 for k in full}
    # Gradient pieces (chunk x panel of 2**26 bf16 elements): 8, 16 and 32 for K = 1, 3, 7 at B = 16384
    # (columns 2B, 4B, 8B): one launch each, and the same number of torch ops per piece.
    assert launches == {1: 8, 3: 16, 7: 32}, launches
    per_piece = (grad[3] - grad[1]) / 8
    assert grad[7] - grad[3] == pytest.approx(16 * per_piece, abs=4), grad
    assert per_piece <= 20, grad


def test_directions_and_hardness_do_not_add_launches(monkeypatch):
    """All four directions with a hardness shift: two row groups (queries; documents), so two forward
    launches, not one per block."""
    opts = dict(
        directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        hardness="in_batch_negatives",
        hardness_strength=1.0,
    )
    counts = {k: _count(monkeypatch, k, grads=False, **opts) for k in (1, 3)}
    assert counts[1] == counts[3] and counts[1]["launches"] == 2, counts
