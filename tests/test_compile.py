"""``torch.compile`` of a training step that calls the fused losses.

The block primitives are ``torch.library`` custom ops with fake implementations while compiling
(``fastclip/ops/library.py``), so Dynamo traces ``clip_loss``/``siglip_loss`` in one graph
(``fullgraph=True``: a graph break inside fastclip fails the test) and AOTAutograd compiles the
backward through the autograd Functions. CPU: ``impl="torch"`` (one compile, kept small: it is the
slowest kind of test on a 2-core machine), and ``impl="triton"`` through the interpreter (the custom
ops' aliasing rules hold inside a compiled graph). GPU: ``impl="triton"`` compiled.
"""

import pytest
import torch
import torch.nn.functional as F

import fastclip


def _step_fn(impl, chunk_size=None):
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 8)
    s = torch.nn.Parameter(torch.tensor(10.0))
    b = torch.nn.Parameter(torch.tensor(-5.0))

    def step(a, t):
        za, zt = F.normalize(proj(a), dim=-1), F.normalize(proj(t), dim=-1)
        kw = {"impl": impl} if chunk_size is None else {"impl": impl, "chunk_size": chunk_size}
        return fastclip.clip_loss(za, zt, s, **kw) + fastclip.siglip_loss(za, zt, s, b, **kw)

    return step, [proj.weight, proj.bias, s, b]


def _compare_compiled_with_eager(impl, device="cpu", chunk_size=None):
    torch._dynamo.reset()
    step, params = _step_fn(impl, chunk_size)
    for p in params:
        p.data = p.data.to(device)
    a, t = torch.randn(20, 16, device=device), torch.randn(20, 16, device=device)
    want = step(a, t)
    want.backward()
    want_g = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    compiled = torch.compile(step, fullgraph=True)
    for _ in range(2):  # the second call reuses the compiled graph
        got = compiled(a, t)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for p, w in zip(params, want_g):
            torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)
            p.grad = None


def test_compiled_training_step_torch_impl():
    _compare_compiled_with_eager("torch", chunk_size=8)  # several chunks inside the custom op


def test_fake_implementations_match_real_outputs():
    """Shapes and dtypes of the fake (meta) implementations equal those of the real ops."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, y = torch.randn(5, 3), torch.randn(7, 3)
    s, b = torch.tensor(2.0), torch.tensor(-1.0)
    calls = [
        (torch.ops.fastclip.clip_lse, (x, y, s, "torch", None)),
        (
            torch.ops.fastclip.clip_grad,
            (x, y, s, torch.zeros(5), torch.zeros(7), 0.1, 0.1, 1, 0.2, "torch", None),
        ),
        (torch.ops.fastclip.siglip_block, (x, y, s, b, -2, True, "torch", None)),
        (torch.ops.fastclip.siglip_block, (x, y, s, None, None, False, "torch", None)),
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in fake], op


@pytest.mark.interpreter
def test_compiled_training_step_triton_impl_interpreted():
    """The Triton kernels inside a compiled graph, on CPU through the interpreter (no GPU needed)."""
    from fastclip.ops.dispatch import triton_available

    if not triton_available(torch.device("cpu")):
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py on machines without CUDA)")
    _compare_compiled_with_eager("triton")


@pytest.mark.gpu
def test_compiled_training_step_triton_impl():
    _compare_compiled_with_eager("triton", device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_custom_ops_pass_opcheck(dtype):
    """``torch.library.opcheck``: schema, fake (meta) implementation, autograd registration and
    aliasing of each block primitive's custom op agree with its real implementation."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=g, dtype=dtype), torch.randn(9, 5, generator=g, dtype=dtype)
    s, b = torch.tensor(2.0, dtype=dtype), torch.tensor(-1.0, dtype=dtype)
    lse_row, lse_col = torch.ops.fastclip.clip_lse(x, y, s, "torch", 4)
    calls = [
        (torch.ops.fastclip.clip_lse, (x, y, s, "torch", 4)),
        (torch.ops.fastclip.clip_grad, (x, y, s, lse_row, lse_col, 0.1, 0.1, 1, 0.2, "torch", 4)),
        (torch.ops.fastclip.clip_grad, (x, y, s, lse_row, None, 0.1, 0.0, None, 0.0, "torch", None)),
        (torch.ops.fastclip.siglip_block, (x, y, s, b, -2, True, "torch", 4)),
        (torch.ops.fastclip.siglip_block, (x, y, s, None, None, False, "torch", None)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args)


def test_kernel_availability_is_not_looked_up_per_call(monkeypatch):
    """torch 2.11's Dynamo refuses to trace importlib.util.find_spec: a per-call lookup in
    ``triton_available`` broke every fullgraph compile of a step calling a loss there."""
    import importlib.util

    from fastclip.ops.dispatch import resolve_impl, triton_available

    def refuse(*args, **kwargs):
        raise AssertionError("find_spec called per call")

    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    triton_available(torch.device("cpu"))
    assert resolve_impl("auto", torch.device("cpu")) == "torch"


def test_differentiable_all_gather_stays_out_of_compiled_graphs():
    """torch 2.11 compiled ``all_gather_with_grad``'s backward into zero gradients (seen with
    DistillClipLoss(gather_with_grad=True) on 2 ranks): it must run eagerly, a graph break, so a
    fullgraph compile refuses it at trace time (before any collective runs)."""
    from fastclip.comm import all_gather_with_grad

    torch._dynamo.reset()
    fn = torch.compile(lambda t: all_gather_with_grad(t) * 2, fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="(?i)disable"):
        fn(torch.ones(2, 3))
