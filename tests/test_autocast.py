"""The losses under ``torch.autocast`` (open_clip's default ``--precision amp_bf16``), as users train.

Forward and backward inside and outside the autocast block, bf16 and fp16, mixed feature dtypes,
every implementation; the error against float64 is never worse than open_clip's own loss under the
same autocast. Two-process cases run in ``tests/test_open_clip_step.py``; CUDA autocast cases are
marked ``gpu``.
"""

import pytest
import torch
from utils import features, load_open_clip_loss

from fastclip import ClipLoss, SigLipLoss, clip_loss, distill_clip_loss, siglip_loss
from fastclip.ops.dispatch import triton_available

open_clip_loss = load_open_clip_loss()
needs_open_clip = pytest.mark.skipif(open_clip_loss is None, reason="open_clip_torch is not installed")
LOSSES = {"clip": clip_loss, "siglip": siglip_loss}
AMP_DTYPES = [torch.bfloat16, torch.float16]


def _tower_outputs(n, d, seed=0, device="cpu"):
    """Features as a model produces them under autocast: a linear layer's output (autocast dtype)."""
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(n, 2 * d, generator=g).to(device)
    w = torch.nn.Parameter(torch.randn(d, 2 * d, generator=g).to(device) / (2 * d) ** 0.5)
    return inp, w


def _impls(device="cpu"):
    out = ["torch", "reference"]
    if triton_available(torch.device(device)):
        out.append("triton")
    return out


def _run(loss_name, impl, amp_dtype, *, backward_inside, device="cpu", n=24, d=16, mixed=False):
    torch.manual_seed(0)
    inp_a, wa = _tower_outputs(n, d, seed=1, device=device)
    inp_b, wb = _tower_outputs(n, d, seed=2, device=device)
    s = torch.nn.Parameter(torch.tensor(10.0, device=device))
    b = torch.nn.Parameter(torch.tensor(-5.0, device=device))
    with torch.autocast(device_type=device, dtype=amp_dtype):
        x = torch.nn.functional.normalize(inp_a @ wa.T, dim=-1)
        y = torch.nn.functional.normalize(inp_b @ wb.T, dim=-1)
        if mixed:
            y = y.float()  # e.g. a text tower kept in fp32
        loss = LOSSES[loss_name](x, y, s, b, impl=impl)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return loss, x, y, (wa.grad, wb.grad, s.grad, b.grad)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
@pytest.mark.parametrize("backward_inside", [True, False])
@pytest.mark.parametrize("impl", _impls())
def test_forward_and_backward_under_cpu_autocast(loss_name, amp_dtype, backward_inside, impl):
    loss, x, y, grads = _run(
        loss_name, impl, amp_dtype, backward_inside=backward_inside, n=9 if impl == "triton" else 24
    )
    assert x.dtype == amp_dtype, "the test's features must come out of autocast in its dtype"
    # fused: float32 (accumulation dtype); reference: open_clip's math in the features' dtype
    assert loss.dtype == (amp_dtype if impl == "reference" else torch.float32)
    assert torch.isfinite(loss)
    for g in grads:
        assert g is not None and torch.isfinite(g).all()
    assert grads[0].dtype == torch.float32  # parameters keep their dtype


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_mixed_feature_dtypes_under_autocast_cast_as_the_matmul_would(loss_name, impl):
    """bf16 image features with fp32 text features: open_clip's matmul under autocast runs in bf16."""
    fn = LOSSES[loss_name]
    x = features(10, 6, torch.bfloat16, seed=1)
    y = features(10, 6, torch.float32, seed=2)
    s, b = torch.tensor(8.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(x, y, s, b, impl=impl)
        got.backward()
    assert x.grad.dtype == torch.bfloat16 and y.grad.dtype == torch.float32  # each input's own dtype
    want = fn(x.detach(), y.detach().bfloat16(), s.detach(), b.detach(), impl=impl)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"text_features: expected dtype torch.bfloat16 .*got torch.float32"):
        fn(x, y, s, b, impl=impl)  # outside autocast the materialized loss would fail: say so


@needs_open_clip
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
def test_error_vs_float64_never_worse_than_open_clip_under_the_same_autocast(loss_name, amp_dtype):
    """Same features (as a model makes them under autocast), three losses: open_clip under autocast,
    fastclip under autocast, and the float64 truth on those very feature values."""
    n, d = 64, 32
    inp_a, wa = _tower_outputs(n, d, seed=3)
    inp_b, wb = _tower_outputs(n, d, seed=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype):
        x0 = torch.nn.functional.normalize(inp_a @ wa.T, dim=-1)
        y0 = torch.nn.functional.normalize(inp_b @ wb.T, dim=-1)
    s0, b0 = torch.tensor(10.0), torch.tensor(-10.0)
    if loss_name == "clip":
        ours_mod, theirs_mod, args = ClipLoss(impl="torch"), open_clip_loss.ClipLoss(), ()
    else:
        ours_mod, theirs_mod, args = SigLipLoss(impl="torch"), open_clip_loss.SigLipLoss(), (b0,)

    def run(module, dtype=None, autocast=True):
        x, y = (t.detach().clone() for t in (x0, y0))
        if dtype is not None:
            x, y = x.to(dtype), y.to(dtype)
        x.requires_grad_(), y.requires_grad_()
        s = s0.clone().to(dtype or torch.float32).requires_grad_()
        extra = tuple(a.to(dtype or torch.float32) for a in args)
        with torch.autocast("cpu", dtype=amp_dtype, enabled=autocast):
            loss = module(x, y, s, *extra)
            loss.backward()
        return loss.double(), [t.grad.double() for t in (x, y, s)]

    truth, truth_g = run(theirs_mod, torch.float64, autocast=False)
    oc, oc_g = run(theirs_mod)
    ours, ours_g = run(ours_mod)
    err = lambda a, b: float((a.detach() - b.detach()).abs().max())
    # Gradients come back in the input dtype, so allow the rounding of that last cast (half an ulp).
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[amp_dtype]
    assert err(ours, truth) <= err(oc, truth) + 1e-7, (err(ours, truth), err(oc, truth))
    for name, g, go, gt in zip(("image", "text", "scale"), ours_g, oc_g, truth_g):
        floor = ulp * float(gt.abs().max())
        assert err(g, gt) <= err(go, gt) + floor, (name, err(g, gt), err(go, gt), floor)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_autocast_in_the_modules_and_output_dict(loss_name):
    module = ClipLoss(impl="torch") if loss_name == "clip" else SigLipLoss(impl="torch")
    x, y = features(12, 8, torch.bfloat16, seed=5), features(12, 8, torch.bfloat16, seed=6)
    s, b = torch.tensor(5.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, y, s, b, output_dict=True)
        out["contrastive_loss"].backward()
    want = module(x.detach(), y.detach(), s.detach(), b.detach())
    assert out["contrastive_loss"].dtype == torch.float32
    torch.testing.assert_close(out["contrastive_loss"], want, rtol=0, atol=0)  # autocast changes nothing
    assert x.grad.dtype == torch.bfloat16 and s.grad.dtype == torch.float32


def test_double_backward_is_refused_with_a_clear_error():
    x, y = features(6, 4), features(6, 4, seed=1)
    s = torch.tensor(3.0, requires_grad=True)
    distill = lambda a, b, sc, impl: sum(
        distill_clip_loss(a, b, sc, b.detach(), a.detach(), sc.detach(), impl=impl)
    )
    for fn in (clip_loss, siglip_loss, distill):
        loss = fn(x, y, s, impl="torch")
        with pytest.raises(RuntimeError, match="first derivatives only.*create_graph=True"):
            torch.autograd.grad(loss, x, create_graph=True)


def test_meta_tensors_are_refused():
    x, y = torch.empty(4, 3, device="meta"), torch.empty(4, 3, device="meta")
    with pytest.raises(ValueError, match=r"image_features: expected a tensor holding data .*meta"):
        clip_loss(x, y, torch.tensor(1.0, device="meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
def test_forward_and_backward_under_cuda_autocast(loss_name, amp_dtype, impl):
    loss, x, _, grads = _run(loss_name, impl, amp_dtype, backward_inside=True, device="cuda", n=300, d=64)
    assert x.dtype == amp_dtype and torch.isfinite(loss)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
