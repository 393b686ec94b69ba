"""The public loss API on one process: parity with float64 and with open_clip, flags, forms, bad input."""

import pytest
import torch
from utils import assert_within_budget, features, load_open_clip_loss, loss_and_grads, scalar

import fastclip
from fastclip import ClipLoss, SigLipLoss, clip_loss, siglip_loss
from fastclip.reference import clip_loss_reference, siglip_loss_reference

SHAPES = [(1, 1), (7, 3), (130, 48), (257, 200)]
LOSSES = {
    "clip": (clip_loss, clip_loss_reference),
    "siglip": (siglip_loss, siglip_loss_reference),
}


def _inputs(n, d, dtype, seed=0, scale=10.0, bias=-4.0):
    x = features(n, d, dtype, seed=seed)
    y = features(n, d, dtype, seed=seed + 1)
    return x, y, scalar(scale), scalar(bias)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("chunk_size", [1, 3, 64, None])
def test_torch_impl_matches_float64_reference(loss_name, n, d, chunk_size):
    fn, ref = LOSSES[loss_name]
    x, y, s, b = _inputs(n, d, torch.float64, seed=n + d)
    s, b = s.double().detach().requires_grad_(), b.double().detach().requires_grad_()
    got, got_g = loss_and_grads(fn, x, y, s, b, impl="torch", chunk_size=chunk_size)
    want, want_g = loss_and_grads(ref, x, y, s, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for name, g, w in zip(("image", "text", "scale", "bias"), got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_dtypes_within_error_budget(loss_name, dtype, scale):
    """err(fastclip, dtype) <= 2 * err(reference, dtype) + floor, both against float64."""
    fn, ref = LOSSES[loss_name]
    n, d = 97, 40
    x, y, s, b = _inputs(n, d, dtype, seed=3, scale=scale)
    got, got_g = loss_and_grads(fn, x, y, s, b, impl="torch", chunk_size=16)
    low, low_g = loss_and_grads(ref, x, y, s, b)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    s64, b64 = (t.detach().double().requires_grad_() for t in (s, b))
    truth, truth_g = loss_and_grads(ref, x64, y64, s64, b64)
    assert got.dtype == torch.float32
    assert got_g[0].dtype == dtype and got_g[1].dtype == dtype
    assert got_g[2].dtype == s.dtype and got_g[3].dtype == b.dtype
    assert_within_budget("loss", got, low, truth, dtype)
    for name, g, lg, tg in zip(("image", "text", "scale", "bias"), got_g, low_g, truth_g):
        assert_within_budget(name, g, lg, tg, dtype)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_gradcheck(loss_name):
    fn, _ = LOSSES[loss_name]
    x, y, s, b = _inputs(5, 4, torch.float64, seed=11)
    s, b = s.double().detach().requires_grad_(), b.double().detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fn(*a, impl="torch", chunk_size=2), (x, y, s, b))


def test_bias_gradient_is_zero_for_softmax_and_scale_shapes_preserved():
    x, y = features(9, 5), features(9, 5, seed=1)
    s = torch.tensor([3.0], requires_grad=True)  # 1-element, as DeepSpeed-friendly models store it
    b = torch.tensor([-2.0], requires_grad=True)
    clip_loss(x, y, s, b, impl="torch").backward()
    assert s.grad.shape == (1,) and b.grad.shape == (1,)
    assert torch.count_nonzero(b.grad) == 0
    assert torch.count_nonzero(s.grad) == 1


def test_no_grad_inputs_give_a_plain_loss():
    x, y = features(6, 3, requires_grad=False), features(6, 3, seed=1, requires_grad=False)
    for fn in (clip_loss, siglip_loss):
        loss = fn(x, y, torch.tensor(5.0), torch.tensor(-1.0))
        assert loss.dim() == 0 and not loss.requires_grad


# ---------------------------------------------------------------------------------------------------
# open_clip drop-in parity (open_clip's own loss.py, loaded without its package)

open_clip_loss = load_open_clip_loss()
needs_open_clip = pytest.mark.skipif(open_clip_loss is None, reason="open_clip_torch is not installed")


@needs_open_clip
@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize(
    "flags", [{}, {"local_loss": True}, {"gather_with_grad": True}, {"cache_labels": True}]
)
def test_clip_loss_module_equals_open_clip(impl, with_bias, flags):
    x, y, s, b = _inputs(33, 17, torch.float32, seed=5, scale=30.0)
    b = b if with_bias else None
    ours = ClipLoss(**flags, impl=impl)
    theirs = open_clip_loss.ClipLoss(**flags)
    for _ in range(2):  # twice: label caching must not change anything
        got, got_g = loss_and_grads(lambda *a: ours(*a, output_dict=True)["contrastive_loss"], x, y, s, b)
        want, want_g = loss_and_grads(theirs, x, y, s, b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(got_g, want_g):
            if w is None:
                assert g is None
            else:
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


@needs_open_clip
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_siglip_loss_module_equals_open_clip(impl):
    x, y, s, b = _inputs(33, 17, torch.float32, seed=6, scale=10.0, bias=-10.0)
    ours = SigLipLoss(impl=impl)
    theirs = open_clip_loss.SigLipLoss()
    got, got_g = loss_and_grads(ours, x, y, s, b)
    want, want_g = loss_and_grads(theirs, x, y, s, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    out = ours(x, y, s, b, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], want)


@needs_open_clip
@pytest.mark.parametrize("with_bias", [False, True])
def test_get_logits_and_get_ground_truth_equal_open_clips(with_bias):
    """The helpers user code calls for metrics: open_clip's return values (single process here; on
    two ranks in tests/test_open_clip_step.py)."""
    x, y, s, b = _inputs(9, 5, torch.float32, seed=8)
    b = b if with_bias else None
    for ours, theirs in (
        (ClipLoss(cache_labels=True), open_clip_loss.ClipLoss(cache_labels=True)),
        (SigLipLoss(), open_clip_loss.SigLipLoss()),
    ):
        got, want = ours.get_logits(x, y, s, b), theirs.get_logits(x, y, s, b)
        for g, w in zip(
            got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)
        ):
            torch.testing.assert_close(g, w)
    ours, theirs = ClipLoss(cache_labels=True), open_clip_loss.ClipLoss(cache_labels=True)
    for n in (9, 9, 4):  # the second call comes from the label cache, the third not
        torch.testing.assert_close(ours.get_ground_truth(x.device, n), theirs.get_ground_truth(x.device, n))
    for neg in (False, True):
        torch.testing.assert_close(
            SigLipLoss().get_ground_truth(x.device, x.dtype, 9, negative_only=neg),
            open_clip_loss.SigLipLoss().get_ground_truth(x.device, x.dtype, 9, negative_only=neg),
        )


def test_module_and_functional_agree_and_output_dict():
    x, y, s, b = _inputs(20, 8, torch.float32)
    for module, fn in ((ClipLoss(impl="torch"), clip_loss), (SigLipLoss(impl="torch"), siglip_loss)):
        a = module(x, y, s, b)
        d = module(x, y, s, b, output_dict=True)
        f = fn(x, y, s, b, impl="torch")
        assert isinstance(d, dict) and list(d) == ["contrastive_loss"]
        assert torch.equal(a, f) and torch.equal(d["contrastive_loss"], f)


def test_python_float_scale_is_accepted():
    x, y = features(8, 4), features(8, 4, seed=1)
    torch.testing.assert_close(
        clip_loss(x, y, 10.0, impl="torch"), clip_loss_reference(x, y, torch.tensor(10.0))
    )


def test_public_names():
    for name in ("ClipLoss", "SigLipLoss", "clip_loss", "siglip_loss", "__version__"):
        assert hasattr(fastclip, name)
    import importlib

    kernels = importlib.import_module("fastclip.kernels")  # the subpackage, from the kernels/ directory
    assert kernels.__name__ == "fastclip.kernels"


# ---------------------------------------------------------------------------------------------------
# non-finite features


@pytest.mark.parametrize("fn", [clip_loss, siglip_loss])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_non_finite_features_give_nan_or_raise(fn, bad, impl):
    x, y, s, b = _inputs(12, 6, torch.float32)
    x = x.detach().clone()
    x[3, 2] = bad
    assert torch.isnan(fn(x, y, s, b, impl=impl))  # the raw materialized math can give inf here
    with pytest.raises(ValueError, match=r"image_features: expected finite values.*\(3, 2\)"):
        fn(x, y, s, b, impl="torch", check_finite=True)
    module = (ClipLoss if fn is clip_loss else SigLipLoss)(impl="torch", check_finite=True)
    with pytest.raises(ValueError, match="image_features"):
        module(x, y, s, b)


# ---------------------------------------------------------------------------------------------------
# bad input

GOOD = dict(x=features(4, 3), y=features(4, 3, seed=1), s=torch.tensor(2.0), b=torch.tensor(-1.0))


@pytest.mark.parametrize("fn", [clip_loss, siglip_loss])
@pytest.mark.parametrize(
    "change,exc,pattern",
    [
        (dict(x=torch.zeros(4)), ValueError, r"image_features: expected a 2-D tensor, got shape \(4,\)"),
        (dict(y=torch.zeros(2, 4, 3)), ValueError, r"text_features: expected a 2-D tensor"),
        (dict(x=[[0.0]]), TypeError, r"image_features: expected a torch.Tensor, got list"),
        (dict(x=torch.zeros(4, 3, dtype=torch.long)), TypeError, r"image_features: expected a floating"),
        (dict(y=features(5, 3)), ValueError, r"text_features: expected batch size 4 .*got 5"),
        (dict(y=features(4, 5)), ValueError, r"text_features: expected feature dim 3 .*got 5"),
        (dict(y=features(4, 3, torch.float64)), TypeError, r"text_features: expected dtype torch.float32"),
        (dict(x=torch.zeros(0, 3), y=torch.zeros(0, 3)), ValueError, r"image_features: expected a non-empty"),
        (
            dict(s=torch.ones(2)),
            ValueError,
            r"logit_scale: expected a 0-dim or 1-element tensor, got shape \(2,\)",
        ),
        (dict(s="10"), TypeError, r"logit_scale: expected a 0-dim or 1-element tensor \(or float\), got str"),
        (dict(s=torch.tensor(1)), TypeError, r"logit_scale: expected a floating tensor"),
        (dict(b=torch.ones(1, 2)), ValueError, r"logit_bias: expected a 0-dim or 1-element"),
    ],
)
def test_bad_input(fn, change, exc, pattern):
    a = {**GOOD, **change}
    with pytest.raises(exc, match=pattern):
        fn(a["x"], a["y"], a["s"], a["b"], impl="torch")


def test_bad_impl_and_chunk_size():
    x, y, s, b = GOOD["x"], GOOD["y"], GOOD["s"], GOOD["b"]
    with pytest.raises(ValueError, match=r"impl: expected one of .*got 'cuda'"):
        clip_loss(x, y, s, impl="cuda")
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int or None, got 0"):
        clip_loss(x, y, s, impl="torch", chunk_size=0)
    with pytest.raises(TypeError, match=r"chunk_size: expected a positive int or None, got float"):
        siglip_loss(x, y, s, b, impl="torch", chunk_size=2.0)
    with pytest.raises(ValueError, match=r"impl: expected one of"):
        ClipLoss(impl="fast")
    with pytest.raises(ValueError, match=r"impl: expected one of"):
        SigLipLoss(impl=None)


@pytest.mark.parametrize("fn", [clip_loss, siglip_loss])
@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(s=torch.tensor(float("nan"))), r"logit_scale: expected a finite value, got nan"),
        (dict(s=torch.tensor(float("inf"))), r"logit_scale: expected a finite value, got inf"),
        (dict(b=torch.tensor(float("nan"))), r"logit_bias: expected a finite value, got nan"),
        (dict(b=torch.tensor([float("-inf")])), r"logit_bias: expected a finite value, got -inf"),
    ],
)
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_non_finite_scale_or_bias_gives_nan_or_raises(fn, change, pattern, impl):
    """As open_clip: a NaN loss by default (no host sync on the hot path); ``check_finite`` raises."""
    a = {**GOOD, **change}
    loss = fn(a["x"], a["y"], a["s"], a["b"], impl=impl)
    assert torch.isnan(loss), loss
    with pytest.raises(ValueError, match=pattern):
        fn(a["x"], a["y"], a["s"], a["b"], impl=impl, check_finite=True)


def test_non_finite_bias_gives_nan_for_the_softmax_loss_too():
    loss = clip_loss(GOOD["x"], GOOD["y"], GOOD["s"], torch.tensor(float("nan")), impl="torch")
    assert torch.isnan(loss)
    with pytest.raises(ValueError, match=r"logit_bias: expected a finite value, got nan"):
        ClipLoss(impl="torch", check_finite=True)(GOOD["x"], GOOD["y"], GOOD["s"], torch.tensor(float("nan")))


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_siglip_without_bias_is_open_clips_loss_without_bias(impl):
    """open_clip computes ``-logsigmoid(z * s x y^T).sum() / n`` when ``logit_bias`` is None."""
    x, y, s, _ = _inputs(11, 5, torch.float64, seed=4)
    s = s.double().detach().requires_grad_()
    got, got_g = loss_and_grads(lambda *a: SigLipLoss(impl=impl)(*a, logit_bias=None), x, y, s, None)
    want, want_g = loss_and_grads(siglip_loss_reference, x, y, s, None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_g[:3], want_g[:3]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(siglip_loss(x, y, s, impl=impl), want)


def test_device_mismatch_of_scale_is_reported():
    meta = torch.tensor(1.0, device="meta")
    with pytest.raises(ValueError, match=r"logit_scale: expected device cpu .*got meta"):
        clip_loss(GOOD["x"], GOOD["y"], meta, impl="torch")


def test_bad_constructor_arguments():
    with pytest.raises(
        ValueError, match=r"dist_impl: expected one of \('bidir', 'shift', 'reduce', 'gather'\)"
    ):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match=r"dist_impl: expected one of \('gather', 'ring'\)"):
        ClipLoss(dist_impl="bidir")
    with pytest.raises(ValueError, match=r"rank: expected an int in \[0, 2\)"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"world_size: expected an int >= 1, got 0"):
        SigLipLoss(world_size=0)
    with pytest.raises(TypeError, match=r"local_loss: expected a bool, got str"):
        ClipLoss(local_loss="yes")
    with pytest.raises(ValueError, match=r"use_horovod: expected False"):
        ClipLoss(use_horovod=True)


def test_triton_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"impl='triton' is not available here.*device cpu"):
        clip_loss(GOOD["x"], GOOD["y"], GOOD["s"], impl="triton")


# ----------------------------------------------------------------------------------------------------
# the boundary: arguments checked once, a missing process group is a ValueError


def test_world_size_without_a_process_group_is_a_value_error_naming_world_size():
    import torch.distributed as dist

    from fastclip import DistillClipLoss

    assert not (dist.is_available() and dist.is_initialized())
    x, y, s, b = _inputs(3, 4, torch.float32)
    calls = [
        lambda: ClipLoss(world_size=2)(x, y, s),
        lambda: ClipLoss(rank=1, world_size=2, local_loss=True)(x, y, s),
        lambda: SigLipLoss(world_size=2)(x, y, s, b),
        lambda: DistillClipLoss(world_size=2)(x, y, s, x, y, s),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"^world_size: .*world_size=2.*init_process_group") as info:
            call()
        assert isinstance(info.value, RuntimeError)  # what earlier versions raised, still caught
    for fn in (fastclip.clip_loss_distributed, fastclip.siglip_loss_distributed):
        with pytest.raises(ValueError, match=r"^group: .*init_process_group"):
            fn(x, y, s, b)
    with pytest.raises(ValueError, match=r"^group: .*init_process_group"):
        ClipLoss(group=object())


def test_modules_check_impl_and_chunk_size_once_at_construction(monkeypatch):
    from fastclip import DistillClipLoss, _checks

    x, y, s, b = _inputs(5, 4, torch.float32)
    losses = [
        (ClipLoss(impl="torch", chunk_size=2), (x, y, s)),
        (SigLipLoss(impl="torch", chunk_size=2), (x, y, s, b)),
        (DistillClipLoss(impl="torch", chunk_size=2), (x, y, s, x, y, s)),
    ]
    seen = []
    for name in ("check_impl", "check_chunk_size"):
        real = getattr(_checks, name)
        monkeypatch.setattr(_checks, name, lambda v, real=real, name=name: seen.append(name) or real(v))
    for loss, args in losses:
        loss(*args)
    assert seen == []  # forward re-checks nothing the constructor checked
    loss = ClipLoss()
    seen.clear()
    loss.chunk_size = 3  # setting an option checks it, once
    assert seen == ["check_impl", "check_chunk_size"] and loss.options.chunk_size == 3
    with pytest.raises(ValueError, match=r"chunk_size: expected a positive int or None, got 0"):
        loss.chunk_size = 0
    with pytest.raises(ValueError, match=r"impl: expected one of"):
        ClipLoss(impl="fast")
