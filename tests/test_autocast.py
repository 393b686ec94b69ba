"""The losses under ``torch.autocast`` (open_clip's default ``--precision amp_bf16``), as users train.

Forward and backward inside and outside the autocast block, bf16 and fp16, mixed feature dtypes,
every implementation; the error against float64 is never worse than open_clip's own loss under the
same autocast. Two-process cases run in ``tests/test_open_clip_step.py``; CUDA autocast cases are
marked ``gpu``.
"""

import pytest
import torch
import torch.nn.functional as F
from utils import assert_within_budget, features, load_open_clip_loss

from fastclip import ClipLoss, SigLipLoss, clip_loss, distill_clip_loss, siglip_loss
from fastclip.ops.dispatch import triton_available

open_clip_loss = load_open_clip_loss()
needs_open_clip = pytest.mark.skipif(open_clip_loss is None, reason="open_clip_torch is not installed")
LOSSES = {"clip": clip_loss, "siglip": siglip_loss}
AMP_DTYPES = [torch.bfloat16, torch.float16]


def _tower_outputs(n, d, seed=0, device="cpu"):
    """A tower's last layer: inputs and the weight of a linear map (its output, under autocast, is in
    the autocast dtype)."""
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(n, 2 * d, generator=g).to(device)
    w = torch.nn.Parameter(torch.randn(d, 2 * d, generator=g).to(device) / (2 * d) ** 0.5)
    return inp, w


def _impls(device="cpu"):
    out = ["torch", "reference"]
    if triton_available(torch.device(device)):
        out.append("triton")
    return out


# How the features are normalized after the tower, as open_clip's models do (``F.normalize(x, dim=-1)``
# inside the autocast block). "autocast": as the device's autocast runs it; on CUDA ``norm`` is on
# autocast's float32 list, so the features reach the loss in float32 (computed from the 16-bit tower
# output) and the loss computes in float32; on CPU they stay in the autocast dtype. "fp32": what CUDA's
# autocast does, on any device (so the CPU tests run the inputs CUDA users give the loss).
NORMALIZE = {
    "autocast": lambda h: F.normalize(h, dim=-1),
    "fp32": lambda h: F.normalize(h.float(), dim=-1),
}
# Error against float64 of the loss and of the weight, scale and bias gradients of the whole step
# (tower, normalize, loss), relative to max(1, max |truth|), allowed to the materialized "reference"
# loss under autocast: the 16-bit tower output and its 16-bit gradient dominate. Measured on CPU at
# (n, d) = (24, 16) and (300, 64), both normalizations (2026-12-04): <= 2.7e-3 bf16, <= 7.0e-4 fp16.
STEP_REL_BUDGET = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _run(loss_name, impl, amp_dtype, *, backward_inside, normalize="autocast", device="cpu", n=24, d=16):
    """One step as a user runs it: towers' linear layers and ``F.normalize`` under autocast, the loss,
    ``backward()`` inside or after the block. Returns the loss, the tower outputs and the features
    (with their gradients retained) and the gradients of the weights, scale and bias."""
    inp_a, wa = _tower_outputs(n, d, seed=1, device=device)
    inp_b, wb = _tower_outputs(n, d, seed=2, device=device)
    s = torch.nn.Parameter(torch.tensor(10.0, device=device))
    b = torch.nn.Parameter(torch.tensor(-5.0, device=device))
    with torch.autocast(device_type=device, dtype=amp_dtype):
        ha, hb = inp_a @ wa.T, inp_b @ wb.T
        x, y = NORMALIZE[normalize](ha), NORMALIZE[normalize](hb)
        for t in (ha, hb, x, y):
            t.retain_grad()
        loss = LOSSES[loss_name](x, y, s, b, impl=impl)
        if backward_inside:
            loss.backward()
    if not backward_inside:
        loss.backward()
    return loss, (ha, hb), (x, y), (wa.grad, wb.grad, s.grad, b.grad)


def _step_truth(loss_name, *, device="cpu", n=24, d=16):
    """The same step in float64 from the same inputs and weights: loss and weight, scale, bias gradients."""
    inp_a, wa = _tower_outputs(n, d, seed=1, device=device)
    inp_b, wb = _tower_outputs(n, d, seed=2, device=device)
    wa, wb = (w.detach().double().requires_grad_() for w in (wa, wb))
    s = torch.tensor(10.0, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.tensor(-5.0, dtype=torch.float64, device=device, requires_grad=True)
    x = F.normalize(inp_a.double() @ wa.T, dim=-1)
    y = F.normalize(inp_b.double() @ wb.T, dim=-1)
    loss = LOSSES[loss_name](x, y, s, b, impl="torch")
    loss.backward()
    return loss.detach(), (wa.grad, wb.grad, s.grad, b.grad)


def _check_step(loss_name, impl, amp_dtype, *, backward_inside, normalize, device, n, d):
    loss, towers, feats, grads = _run(
        loss_name, impl, amp_dtype, backward_inside=backward_inside, normalize=normalize, device=device,
        n=n, d=d,
    )  # fmt: skip
    assert all(h.dtype == amp_dtype for h in towers), "the towers' outputs come out of autocast in its dtype"
    if normalize == "fp32":
        assert all(f.dtype == torch.float32 for f in feats)
    else:  # as this device's autocast leaves them: float32 on CUDA, the autocast dtype on CPU
        assert feats[0].dtype == feats[1].dtype in (amp_dtype, torch.float32)
    # Gradients in each tensor's own dtype: features, tower outputs, then the fp32 parameters.
    assert all(t.grad is not None and t.grad.dtype == t.dtype for t in towers + feats)
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    if impl != "reference":
        assert loss.dtype == torch.float32  # fused: accumulated and returned in float32
    truth, truth_g = _step_truth(loss_name, device=device, n=n, d=d)
    names = ("loss", "image tower weight", "text tower weight", "scale", "bias")
    if impl == "reference":  # the materialized loss: absolute per-dtype budgets
        for name, got, want in zip(names, (loss, *grads), (truth, *truth_g)):
            err, ref = float((got.detach().double() - want).abs().max()), max(1.0, float(want.abs().max()))
            assert err <= STEP_REL_BUDGET[amp_dtype] * ref, (name, err, ref)
        return
    # Fused: never worse than the materialized loss in the same step (2x its error + the dtype's floor).
    ref_loss, _, _, ref_grads = _run(
        loss_name, "reference", amp_dtype, backward_inside=True, normalize=normalize, device=device, n=n, d=d
    )
    for name, got, ref, want in zip(names, (loss, *grads), (ref_loss, *ref_grads), (truth, *truth_g)):
        assert_within_budget(name, got, ref, want, amp_dtype)


@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
@pytest.mark.parametrize("backward_inside", [True, False])
@pytest.mark.parametrize("normalize", NORMALIZE)
@pytest.mark.parametrize("impl", _impls())
def test_forward_and_backward_under_cpu_autocast(loss_name, amp_dtype, backward_inside, normalize, impl):
    n = 9 if impl == "triton" else 24
    _check_step(
        loss_name,
        impl,
        amp_dtype,
        backward_inside=backward_inside,
        normalize=normalize,
        device="cpu",
        n=n,
        d=16,
    )


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


@pytest.mark.parametrize("loss_name", ["clip", "siglip", "info_nce"])
@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
def test_fp32_features_under_autocast_compute_in_the_autocast_dtype(loss_name, amp_dtype):
    """fp32 features under autocast (what a CUDA bf16 step hands the loss: models normalize in fp32
    there) are computed in autocast's dtype, as the materialized loss's matmul runs: the same numbers
    as the loss of the features cast to that dtype outside autocast, gradients in fp32. Computing them
    in fp32 would put a CUDA run on the CUDA-core path, several times slower than open_clip's loss."""
    from fastclip import info_nce_loss

    fns = {**LOSSES, "info_nce": lambda q, p, s, b, impl: info_nce_loss(q, p, scale=s, impl=impl)}
    fn = fns[loss_name]
    x = features(12, 8, torch.float32, seed=3).requires_grad_()
    y = features(12, 8, torch.float32, seed=4).requires_grad_()
    s, b = torch.tensor(8.0), torch.tensor(-3.0)
    with torch.autocast("cpu", dtype=amp_dtype):
        got = fn(x, y, s, b, impl="torch")
        got.backward()
    assert x.grad.dtype == torch.float32 and y.grad.dtype == torch.float32
    want = fn(x.detach().to(amp_dtype), y.detach().to(amp_dtype), s, b, impl="torch")
    in_fp32 = fn(x.detach(), y.detach(), s, b, impl="torch")
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
    assert float(got) != float(in_fp32)  # the 16-bit rounding of the features shows at this size


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


@pytest.fixture(scope="module")
def _gpu_compiles_started():
    """The first CUDA test of a ``pytest -m gpu`` run starts the kernel compile processes of
    tests/test_gpu_kernels.py (tests/_gpu_warm.py), so they overlap the tests before that module."""
    import _gpu_warm

    _gpu_warm.start()


@pytest.mark.gpu
@pytest.mark.usefixtures("_gpu_compiles_started")
@pytest.mark.parametrize("loss_name", LOSSES)
@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
def test_forward_and_backward_under_cuda_autocast(loss_name, amp_dtype, impl):
    """As users train on CUDA: the features come out of ``F.normalize`` in float32 (autocast's float32
    list), the loss takes them so, gradients flow back into the 16-bit tower outputs."""
    _check_step(
        loss_name, impl, amp_dtype, backward_inside=True, normalize="autocast", device="cuda", n=300, d=64
    )
