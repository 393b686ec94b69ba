"""The fused distillation loss (open_clip ``DistillClipLoss``) and ``CoCaLoss``: parity with float64 and
with open_clip, per-dtype budgets, autocast, bad input, memory, the Triton kernels under the
interpreter, and 2-process gloo parity with open_clip's modules."""

from __future__ import annotations

import json
import os
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from utils import LargestOutput, assert_within_budget, features, load_open_clip_loss, max_err, scalar

from fastclip.functional import distill_clip_loss
from fastclip.losses import ClipLoss
from fastclip.losses_distill import CoCaLoss, DistillClipLoss
from fastclip.ops.dispatch import triton_available
from fastclip.ops.distill import distill_block_loss, distill_grad, distill_stats
from fastclip.reference import distill_clip_loss_reference

open_clip_loss = load_open_clip_loss()
needs_open_clip = pytest.mark.skipif(open_clip_loss is None, reason="open_clip_torch is not installed")
needs_triton = pytest.mark.skipif(
    not triton_available(torch.device("cpu")), reason="needs triton with TRITON_INTERPRET=1"
)
WEIGHTS = (0.3, 1.7)


def _inputs(n, d, dt, dtype=torch.float32, seed=0, scale=10.0, t_scale=25.0, teacher_grad=True):
    x, y = features(n, d, dtype, seed=seed), features(n, d, dtype, seed=seed + 1)
    xt = features(n, dt, dtype, seed=seed + 2, requires_grad=teacher_grad)
    yt = features(n, dt, dtype, seed=seed + 3, requires_grad=teacher_grad)
    return x, y, scalar(scale), xt, yt, scalar(t_scale, requires_grad=teacher_grad)


def _run(fn, inputs, **kw):
    """Both losses and the gradients of every input that requires grad (None for the others)."""
    c, d = fn(*inputs, **kw)
    need = [t for t in inputs if t.requires_grad]
    grads = iter(torch.autograd.grad(WEIGHTS[0] * c + WEIGHTS[1] * d, need))
    return [c, d], [next(grads) if t.requires_grad else None for t in inputs]


def _as64(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]


NAMES = ("image", "text", "scale", "dist_image", "dist_text", "dist_scale")


def _assert_close64(got, want, tol=1e-10):
    (gl, gg), (wl, wg) = got, want
    for name, a, b in zip(("contrastive", "distill"), gl, wl):
        err, _ = max_err(a, b)
        assert err <= tol, f"{name} loss: |diff| {err:.3e}"
    for name, a, b in zip(NAMES, gg, wg):
        if b is None:
            assert a is None, name
            continue
        err, where = max_err(a, b)
        assert err <= tol * max(1.0, float(b.abs().max())), f"d_{name}: max |diff| {err:.3e} at {where}"


# ----------------------------------------------------------------------------------------------------
# float64 parity of the chunked torch implementation


@pytest.mark.parametrize("n,d,dt", [(1, 3, 2), (7, 5, 9), (37, 11, 6)])
@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("teacher_grad", [True, False])
def test_torch_impl_matches_float64_reference(n, d, dt, chunk_size, teacher_grad):
    inputs = _as64(_inputs(n, d, dt, seed=n, teacher_grad=teacher_grad))
    got = _run(distill_clip_loss, inputs, impl="torch", chunk_size=chunk_size)
    want = _run(distill_clip_loss_reference, inputs)
    _assert_close64(got, want)
    assert got[0][0].dtype == torch.float64


@pytest.mark.parametrize("offset", [0, 5, 9])
def test_row_block_with_offset_matches_float64(offset):
    """The local-loss block: n rows against N columns, row direction only, positives at i + offset."""
    n, N = 4, 13
    x, xt = features(n, 5, torch.float64), features(n, 3, torch.float64, seed=2)
    y, yt = features(N, 5, torch.float64, seed=1), features(N, 3, torch.float64, seed=3)
    s, t = scalar(12.0, torch.float64), scalar(30.0, torch.float64)
    inputs = [x, y, s, xt, yt, t]

    def ref(x, y, s, xt, yt, t):
        ls, lt = s * x @ y.T, t * xt @ yt.T
        c = F.cross_entropy(ls, torch.arange(n) + offset)
        return c, -(lt.softmax(1) * ls.log_softmax(1)).sum(1).mean()

    got = _run(
        lambda *a: distill_block_loss(*a, offset=offset, both=False, impl="torch", chunk_size=3), inputs
    )
    _assert_close64(got, _run(ref, inputs))


@pytest.mark.parametrize("both", [True, False])
def test_gradcheck(both):
    """Finite differences of both losses (weighted) against the analytic gradients of every input."""
    n, N = (5, 5) if both else (3, 7)
    inputs = [
        features(n, 4, torch.float64), features(N, 4, torch.float64, seed=1), scalar(8.0, torch.float64),
        features(n, 3, torch.float64, seed=2), features(N, 3, torch.float64, seed=3), scalar(15.0, torch.float64),
    ]  # fmt: skip

    def fn(*a):
        c, d = distill_block_loss(*a, offset=0 if both else 2, both=both, impl="torch", chunk_size=2)
        return WEIGHTS[0] * c + WEIGHTS[1] * d

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_teacher_without_grad_gets_none_and_student_grads_unchanged():
    a = _as64(_inputs(9, 4, 6, teacher_grad=True))
    b = _as64(_inputs(9, 4, 6, teacher_grad=False))
    (_, ga), (_, gb) = _run(distill_clip_loss, a, impl="torch"), _run(distill_clip_loss, b, impl="torch")
    assert all(g is None for g in gb[3:])
    for u, v in zip(ga[:3], gb[:3]):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------------
# per-dtype budgets and autocast


@pytest.mark.parametrize(
    "impl", ["torch", pytest.param("triton", marks=[pytest.mark.interpreter, needs_triton])]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 60.0])
def test_dtypes_within_error_budget(impl, dtype, scale):
    """err(fused, dtype) <= 2 * err(open_clip's formula in dtype) + floor, both against float64."""
    inputs = _inputs(45, 24, 17, dtype, seed=4, scale=scale, t_scale=2 * scale)
    got = _run(distill_clip_loss, inputs, impl=impl, chunk_size=16)
    low = _run(distill_clip_loss_reference, inputs)
    truth = _run(distill_clip_loss_reference, _as64(inputs))
    assert got[0][0].dtype == torch.float32
    for name, g, lo, tr in zip(("contrastive", "distill"), got[0], low[0], truth[0]):
        assert_within_budget(name, g, lo, tr, dtype)
    for name, g, lo, tr, inp in zip(NAMES, got[1], low[1], truth[1], inputs):
        assert g.dtype == inp.dtype, name
        assert_within_budget(f"d_{name}", g, lo, tr, dtype)


@pytest.mark.parametrize(
    "impl", ["torch", pytest.param("triton", marks=[pytest.mark.interpreter, needs_triton])]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mixed", [False, True])
def test_autocast_forward_and_backward_inside_the_block(impl, dtype, mixed):
    """Under CPU autocast (fp32 model outputs, or one tower already in 16 bits), forward and backward
    inside the block: no crash, gradients in each input's dtype, error vs float64 within the budget
    of open_clip's loss under the same autocast."""
    inputs = list(_inputs(40, 16, 24, torch.float32, seed=7, scale=30.0, t_scale=50.0))
    if mixed:
        inputs[0] = inputs[0].detach().to(dtype).requires_grad_()
        inputs[4] = inputs[4].detach().to(dtype).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        got = _run(distill_clip_loss, inputs, impl=impl, chunk_size=8)
        oc = _run(distill_clip_loss_reference, inputs)
    truth = _run(distill_clip_loss_reference, _as64(inputs))
    for name, g, lo, tr in zip(("contrastive", "distill"), got[0], oc[0], truth[0]):
        assert g.dtype == torch.float32
        assert_within_budget(name, g, lo, tr, dtype)
    for name, g, lo, tr, inp in zip(NAMES, got[1], oc[1], truth[1], inputs):
        assert g.dtype == inp.dtype, f"d_{name}: {g.dtype} != {inp.dtype}"
        assert_within_budget(f"d_{name}", g, lo, tr, dtype)


# ----------------------------------------------------------------------------------------------------
# bad input, non-finite values


def test_bad_inputs_name_the_argument():
    x, y, s, xt, yt, t = _inputs(6, 4, 5)
    cases = [
        ((x[0], y, s, xt, yt, t), {}, ValueError, "image_features"),
        ((x, y, s, xt, "yt", t), {}, TypeError, "dist_text_features"),
        ((x, y, s, xt[:5], yt[:5], t), {}, ValueError, "dist_image_features"),
        ((x, y, s, xt, yt[:, :3], t), {}, ValueError, "dist_text_features"),
        ((x, y.double(), s, xt, yt, t), {}, TypeError, "text_features"),
        ((x, y, s, xt, yt, torch.ones(2)), {}, ValueError, "dist_logit_scale"),
        ((x, y, s, xt, yt, t), {"impl": "fast"}, ValueError, "impl"),
        ((x, y, s, xt, yt, t), {"chunk_size": 0}, ValueError, "chunk_size"),
        ((x, y, s, xt, yt, t), {"check_finite": 1}, TypeError, "check_finite"),
    ]
    for args, kw, exc, name in cases:
        with pytest.raises(exc, match=name):
            distill_clip_loss(*args, **kw)
    with pytest.raises(ValueError, match="dist_impl"):
        DistillClipLoss(dist_impl="ring")
    with pytest.raises(TypeError, match="caption_loss_weight"):
        CoCaLoss("1", 1.0)
    logits, labels = torch.randn(6, 3, 10), torch.randint(0, 10, (6, 3))
    with pytest.raises(ValueError, match="labels"):
        CoCaLoss(1.0, 1.0)(x, y, logits, labels[:, :2], s)
    with pytest.raises(TypeError, match="labels"):
        CoCaLoss(1.0, 1.0)(x, y, logits, labels.float(), s)


def test_non_finite_inputs_give_nan_or_raise_with_check_finite():
    x, y, s, xt, yt, t = _inputs(6, 4, 5)
    bad = xt.detach().clone()
    bad[2, 1] = float("nan")
    c, d = distill_clip_loss(x, y, s, bad, yt, t, impl="torch")
    assert torch.isfinite(c) and torch.isnan(d)  # the teacher only enters the distillation term
    c, d = distill_clip_loss(x, y, torch.tensor(float("inf")), xt, yt, t, impl="torch")
    assert torch.isnan(c) and torch.isnan(d)
    with pytest.raises(ValueError, match="dist_image_features"):
        distill_clip_loss(x, y, s, bad, yt, t, check_finite=True)


# ----------------------------------------------------------------------------------------------------
# memory: nothing of B×B elements, forward and backward


def test_no_tensor_of_b_by_b_elements():
    b, chunk = 512, 32
    inputs = _inputs(b, 16, 8)
    with LargestOutput() as mode:
        _run(distill_clip_loss, inputs, impl="torch", chunk_size=chunk)
    assert mode.largest <= chunk * b, f"largest tensor {mode.largest} elements > one chunk ({chunk * b})"
    with LargestOutput() as ref_mode:
        _run(distill_clip_loss, inputs, impl="reference")
    assert ref_mode.largest >= b * b  # the instrument sees the materialized matrices


# ----------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("n,d,dt", [(1, 3, 2), (7, 5, 9), (70, 13, 130)])
@pytest.mark.parametrize("teacher_grad", [True, False])
def test_triton_impl_matches_float64(n, d, dt, teacher_grad):
    inputs = _inputs(n, d, dt, seed=n, teacher_grad=teacher_grad)
    got = _run(distill_clip_loss, inputs, impl="triton")
    want = _run(distill_clip_loss_reference, _as64(inputs))
    _assert_close64(got, want, tol=5e-6)


@pytest.mark.parametrize(
    "impl", ["torch", pytest.param("triton", marks=[pytest.mark.interpreter, needs_triton])]
)
def test_teacher_in_another_dtype_than_the_student(impl):
    """A bf16 teacher with an fp32 student (each pair one dtype): within the bf16 budget of float64."""
    inputs = list(_inputs(20, 6, 10, seed=9))
    inputs[3] = inputs[3].detach().bfloat16().requires_grad_()
    inputs[4] = inputs[4].detach().bfloat16().requires_grad_()
    got = _run(distill_clip_loss, inputs, impl=impl)
    low = _run(distill_clip_loss_reference, [v.detach().bfloat16().requires_grad_() for v in inputs])
    truth = _run(distill_clip_loss_reference, _as64(inputs))
    for name, g, lo, tr, inp in zip(NAMES, got[1], low[1], truth[1], inputs):
        assert g.dtype == inp.dtype
        assert_within_budget(f"d_{name}", g, lo, tr, torch.bfloat16)
    for name, g, lo, tr in zip(("contrastive", "distill"), got[0], low[0], truth[0]):
        assert_within_budget(name, g, lo, tr, torch.bfloat16)


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("both,offset", [(True, 0), (False, 70), (False, -3)])
def test_triton_chunk_and_split_paths_match_torch(both, offset):
    """Row chunks, column splits and the merges of their partials, against the torch implementation."""
    from fastclip.kernels import distill as kd

    n, N = (130, 130) if both else (67, 140)
    x, xt = features(n, 9), features(n, 20, seed=2)
    y, yt = features(N, 9, seed=1), features(N, 20, seed=3)
    s, t = scalar(20.0), scalar(40.0)
    ref = distill_stats(x, y, s, xt, yt, t, both=both, impl="torch", chunk_size=17)
    for rows, splits in ((None, None), (65, 2), (64, 3)):
        got = kd.distill_stats(x, y, s, xt, yt, t, both, rows_per_chunk=rows, splits=splits)
        for a, b in zip(got, ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)
    coefs = torch.tensor([0.3, 0.2 if both else 0.0, 0.5, 0.4 if both else 0.0, 0.7]) / n
    want = distill_grad(x, y, s, xt, yt, t, ref, coefs, offset, True, True, impl="torch", chunk_size=17)
    for rows in (None, 64):
        got = kd.distill_grad(x, y, s, xt, yt, t, ref, coefs, offset, True, True, rows_per_chunk=rows)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.interpreter
@needs_triton
def test_triton_grad_grouped_grid_with_a_ragged_last_group(monkeypatch):
    """Small tiles and GROUP_M = 2: 5 row blocks make groups of 2, 2 and 1 over 3 column blocks, so
    every program's (row block, column block) comes from the grouped 1-D grid, the last group short."""
    import dataclasses

    from fastclip.kernels import config
    from fastclip.kernels import distill as kd

    small = lambda *a: dataclasses.replace(config.tile_config(*a[:4]), block_m=16, block_n=16, block_k=16)
    monkeypatch.setattr(kd, "_tile_config", small)
    monkeypatch.setattr(config, "GROUP_M", 2)
    n, N = 70, 40
    x, xt = features(n, 9), features(n, 20, seed=2)
    y, yt = features(N, 9, seed=1), features(N, 20, seed=3)
    s, t = scalar(20.0), scalar(40.0)
    ref = distill_stats(x, y, s, xt, yt, t, both=False, impl="torch", chunk_size=17)
    coefs = torch.tensor([0.3, 0.0, 0.5, 0.0, 0.7]) / n
    want = distill_grad(x, y, s, xt, yt, t, ref, coefs, 0, True, True, impl="torch", chunk_size=17)
    got = kd.distill_grad(x, y, s, xt, yt, t, ref, coefs, 0, True, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# the modules against open_clip's


@needs_open_clip
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_distill_module_equals_open_clip(impl):
    inputs = _inputs(33, 17, 12, seed=5, scale=30.0, t_scale=60.0)
    ours, theirs = DistillClipLoss(impl=impl), open_clip_loss.DistillClipLoss()
    got, want = _run(ours, inputs), _run(theirs, inputs)
    truth = _run(distill_clip_loss_reference, _as64(inputs))
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Gradients: both are fp32 roundings of the float64 truth; ours within the budget of open_clip's.
    for name, a, b, tr in zip(NAMES, got[1], want[1], truth[1]):
        assert_within_budget(f"d_{name}", a, b, tr, torch.float32)
    out = ours(*inputs, output_dict=True)
    assert list(out) == list(theirs(*inputs, output_dict=True)) == ["contrastive_loss", "distill_loss"]
    torch.testing.assert_close(out["distill_loss"], want[0][1], rtol=1e-5, atol=1e-6)
    assert isinstance(ours, ClipLoss)  # as open_clip: DistillClipLoss is a ClipLoss


@needs_open_clip
@pytest.mark.parametrize("clip_weight", [1.5, 0])
@pytest.mark.parametrize("pad_id", [0, 3])
def test_coca_module_equals_open_clip(clip_weight, pad_id):
    x, y, s = features(12, 8), features(12, 8, seed=1), scalar(20.0)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, 11, generator=g).requires_grad_()
    labels = torch.randint(0, 11, (12, 5), generator=g)
    ours, theirs = (
        CoCaLoss(2.0, clip_weight, pad_id=pad_id),
        open_clip_loss.CoCaLoss(2.0, clip_weight, pad_id),
    )
    got, want = ours(x, y, logits, labels, s), theirs(x, y, logits, labels, s)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    need = [t for t in (x, y, s, logits)]
    g1 = torch.autograd.grad(got[0] + got[1], need, allow_unused=True)
    g2 = torch.autograd.grad(want[0] + want[1], need, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    d = ours(x, y, logits, labels, s, output_dict=True)
    assert (
        list(d)
        == list(theirs(x, y, logits, labels, s, output_dict=True))
        == ["contrastive_loss", "caption_loss"]
    )


# ----------------------------------------------------------------------------------------------------
# two processes (gloo): rank-for-rank parity with open_clip's modules

COMBOS = [(ll, gg) for ll in (False, True) for gg in (False, True)]


def _rank_inputs(rank, world, n, dtype):
    g = torch.Generator().manual_seed(11)
    full = [
        F.normalize(torch.randn(world * n, d, generator=g, dtype=torch.float64), dim=-1) for d in (5, 5, 7, 7)
    ]
    sl = slice(rank * n, (rank + 1) * n)
    x, y, xt, yt = (t[sl].to(dtype).clone().requires_grad_() for t in full)
    s = torch.tensor(9.0, dtype=dtype, requires_grad=True)
    t = torch.tensor(21.0, dtype=dtype, requires_grad=True)
    return [x, y, s, xt, yt, t]


def _dist_cases(rank, world, failures, counter):
    oc = load_open_clip_loss()
    for dtype, impl, tol in ((torch.float64, "torch", 1e-10), (torch.float32, "triton", 2e-5)):
        if impl == "triton" and not triton_available(torch.device("cpu")):
            continue
        inputs = _rank_inputs(rank, world, 3, dtype)
        for ll, gg in COMBOS:
            for weight in (1.0, 1.0 + rank):  # per-rank incoming gradients differ in the second pass
                flags = dict(local_loss=ll, gather_with_grad=gg, rank=rank, world_size=world)
                results = []
                for mod in (DistillClipLoss(**flags, impl=impl, chunk_size=2), oc.DistillClipLoss(**flags)):
                    leaf = [v.detach().clone().requires_grad_() for v in inputs]
                    c, d = mod(*leaf)
                    (weight * (WEIGHTS[0] * c + WEIGHTS[1] * d)).backward()
                    results.append([c.detach(), d.detach(), *(v.grad for v in leaf)])
                for label, a, b in zip(("contrastive", "distill", *NAMES), *results):
                    counter[0] += 1
                    if (a is None) != (b is None):
                        failures.append(f"{impl} ll={ll} gg={gg} {label}: grad presence differs")
                        continue
                    if a is None:
                        continue
                    err = float((a.double() - b.double()).abs().max())
                    if not err <= tol * max(1.0, float(b.abs().max())):
                        failures.append(
                            f"{impl} {dtype} ll={ll} gg={gg} w={weight} {label}: |diff| {err:.3e}"
                        )
        if impl == "torch":
            _dist_autocast_cases(rank, world, oc, failures, counter)
            _dist_compiled_case(rank, world, oc, inputs, failures, counter)
        # CoCa: contrastive part through fastclip's distributed ClipLoss, caption CE as open_clip's.
        if impl == "torch":
            g = torch.Generator().manual_seed(rank)
            logits, labels = (
                torch.randn(3, 4, 9, generator=g, dtype=dtype),
                torch.randint(0, 9, (3, 4), generator=g),
            )
            for ll, gg in COMBOS:
                flags = dict(local_loss=ll, gather_with_grad=gg, rank=rank, world_size=world)
                a = CoCaLoss(2.0, 1.0, **flags, impl="torch")(*inputs[:2], logits, labels, inputs[2])
                b = oc.CoCaLoss(2.0, 1.0, **flags)(*inputs[:2], logits, labels, inputs[2])
                for u, v in zip(a, b):
                    counter[0] += 1
                    if not float((u - v).abs()) <= tol:
                        failures.append(f"coca ll={ll} gg={gg}: {float(u)} vs {float(v)}")


def _dist_compiled_case(rank, world, oc, inputs, failures, counter):
    """The module under torch.compile on two ranks (graph breaks at the collectives are allowed)."""
    flags = dict(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    results = []
    for mod in (
        torch.compile(DistillClipLoss(**flags, impl="torch", chunk_size=2)),
        oc.DistillClipLoss(**flags),
    ):
        leaf = [v.detach().clone().requires_grad_() for v in inputs]
        c, d = mod(*leaf)
        (WEIGHTS[0] * c + WEIGHTS[1] * d).backward()
        results.append([c.detach(), d.detach(), *(v.grad for v in leaf)])
    for label, a, b in zip(("contrastive", "distill", *NAMES), *results):
        counter[0] += 1
        if not float((a - b).abs().max()) <= 1e-10 * max(1.0, float(b.abs().max())):
            failures.append(f"compiled {label}: |diff| {float((a - b).abs().max()):.3e}")


def _dist_autocast_cases(rank, world, oc, failures, counter):
    """fp32 features under bf16 autocast, forward and backward inside the block: each rank's losses and
    gradients within 2x open_clip's error under the same autocast (+ the bf16 floor) of float64 open_clip."""
    inputs = _rank_inputs(rank, world, 3, torch.float32)
    for ll, gg in COMBOS:
        flags = dict(local_loss=ll, gather_with_grad=gg, rank=rank, world_size=world)
        results = []
        for mod, inp, amp in (
            (DistillClipLoss(**flags, impl="torch"), inputs, True),
            (oc.DistillClipLoss(**flags), inputs, True),
            (oc.DistillClipLoss(**flags), [v.detach().double() for v in inputs], False),
        ):
            leaf = [v.detach().clone().requires_grad_() for v in inp]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                c, d = mod(*leaf)
                (WEIGHTS[0] * c + WEIGHTS[1] * d).backward()
            results.append([c.detach(), d.detach(), *(v.grad for v in leaf)])
        ours, theirs, truth = results
        for label, a, b, tr in zip(("contrastive", "distill", *NAMES), ours, theirs, truth):
            counter[0] += 1
            err = float((a.double() - tr).abs().max())
            budget = 2 * float((b.double() - tr).abs().max()) + 2e-2 * max(1.0, float(tr.abs().max()))
            if not err <= budget or (label not in ("contrastive", "distill") and a.dtype != torch.float32):
                failures.append(
                    f"autocast ll={ll} gg={gg} {label}: err {err:.3e} > {budget:.3e} or {a.dtype}"
                )


def _worker(rank, world, tmpdir):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    result = {"failures": [], "checks": 0}
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world
        )
        counter = [0]
        _dist_cases(rank, world, result["failures"], counter)
        result["checks"] = counter[0]
        dist.barrier()
    except Exception:  # noqa: BLE001
        result["failures"].append(f"rank {rank} crashed:\n{traceback.format_exc()}")
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.distributed
@needs_open_clip
def test_two_processes_match_open_clip(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, join=True, start_method="spawn")
    for r in range(world):
        with open(tmp_path / f"rank{r}.json") as f:
            res = json.load(f)
        assert not res["failures"], "\n".join(res["failures"][:15])
        assert res["checks"] >= 4 * 2 * 8 * 2 + 4 * 8 + 8, f"rank {r} ran only {res['checks']} checks"


@needs_open_clip
def test_benchmark_runner_writes_a_valid_document(tmp_path):
    from fastclip.bench import report
    from fastclip.bench.distill import ratio_lines, run_distill_bench

    doc = run_distill_bench(["fastclip-torch", "open_clip"], 64, 8, "float32", torch.device("cpu"), repeats=1,
                            log=lambda *_: None)  # fmt: skip
    assert [r["provider"] for r in doc["records"]] == ["fastclip-torch", "open_clip"]
    assert all(
        r["status"] == "ok" and r["peak_mem_bytes"] > 0 and r["fwd_bwd_ms"] > 0 for r in doc["records"]
    )
    report.write_json(doc, str(tmp_path / "d.json"))  # validates the schema
    (line,) = ratio_lines(doc["records"])
    assert line.startswith("fastclip-torch / open_clip: time ")


# ----------------------------------------------------------------------------------------------------
# torch.compile: the two passes run as opaque custom ops


@pytest.mark.parametrize("both", [True, False])
def test_custom_ops_pass_opcheck(both):
    from fastclip.ops.library import distill_grad_op, distill_stats_op

    n, N = (6, 6) if both else (4, 9)
    x, y = features(n, 5, requires_grad=False), features(N, 5, seed=1, requires_grad=False)
    xt, yt = features(n, 3, seed=2, requires_grad=False), features(N, 3, seed=3, requires_grad=False)
    s, t = scalar(10.0, requires_grad=False), scalar(20.0, requires_grad=False)
    torch.library.opcheck(distill_stats_op, (x, y, s, xt, yt, t, both, "torch", 2))
    stats = distill_stats_op(x, y, s, xt, yt, t, both, "torch", 2)
    stats = stats if both else (*stats[:3], None, None, None)
    coefs = torch.tensor([0.1, 0.1 if both else 0.0, 0.2, 0.2 if both else 0.0, 0.3])
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(distill_grad_op, (x, y, s, xt, yt, t, *stats, coefs, 2, *need, "torch", 3))


def test_torch_compile_runs_the_custom_ops(monkeypatch):
    import fastclip.ops.library as lib

    # Only the custom ops' bodies call library._own (the eager path runs the bodies directly).
    calls = []
    real = lib._own
    monkeypatch.setattr(
        lib, "_own", lambda inputs, outputs: calls.append(len(outputs)) or real(inputs, outputs)
    )
    inputs = _inputs(10, 4, 6, seed=3)

    def step(*a):
        c, d = distill_clip_loss(*a, impl="torch", chunk_size=3)
        return WEIGHTS[0] * c + WEIGHTS[1] * d

    want = step(*inputs)
    want_g = torch.autograd.grad(want, inputs)
    assert not calls  # eager mode runs the bodies directly
    got = torch.compile(step, backend="aot_eager")(*inputs)
    got_g = torch.autograd.grad(got, inputs)
    assert calls  # compiled: through torch.ops.fastclip.distill_stats
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
