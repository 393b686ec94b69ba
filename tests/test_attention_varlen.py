"""Packed attention dispatch: ``auto`` picks torch's ``varlen_attn`` for packed fp16/bf16 batches on CUDA
and keeps the block-diagonal-mask SDPA path elsewhere (CPU, fp32, old torch, head dims varlen does not
take); bad ``cu_seqlens`` are clear errors. The CPU tests stand a fake ``varlen_attn`` in for torch's
(same signature) so that the glue (layout, offsets, scale, causal keyword) runs here; the ``gpu`` test
runs torch's kernel against the mask path and float64, forward and backward."""

import inspect

import pytest
import torch
from utils import assert_within_budget

import fastclip.models.attention as A
from fastclip.models import VisionConfig, VisionTransformer, create_model
from fastclip.models.attention import (
    attention,
    available_impls,
    check_cu_seqlens,
    resolve_impl,
    varlen_problem,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LENS = [5, 1, 7, 3]  # odd lengths, one of 1


def _cu(lens, device="cpu", dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=dtype, device=device)


def _packed_qkv(lens, h=2, d=8, dtype=torch.bfloat16, seed=0, device="cpu"):
    """q, k, v: (1, T, H, Dh) views of one fused (1, T, 3, H, Dh) tensor, as SelfAttention makes them."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, sum(lens), 3, h, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return qkv, list(qkv.unbind(2))


def _reference_varlen(calls):
    """A stand-in with torch 2.13's ``varlen_attn`` signature: per-sequence float64 softmax attention,
    differentiable; every call's arguments are appended to ``calls``."""

    def varlen_attn(
        query,
        key,
        value,
        cu_seq_q,
        cu_seq_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
    ):
        calls.append(
            dict(
                shape=tuple(query.shape),
                cu_dtype=cu_seq_q.dtype,
                max_q=max_q,
                max_k=max_k,
                scale=scale,
                window_size=window_size,
            )
        )
        causal = window_size == (-1, 0)
        outs = []
        cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
        for i in range(len(cq) - 1):
            q, k, v = (
                t.double()
                for t in (query[cq[i] : cq[i + 1]], key[ck[i] : ck[i + 1]], value[ck[i] : ck[i + 1]])
            )
            assert q.shape[0] <= max_q and k.shape[0] <= max_k
            s = torch.einsum("qhd,khd->hqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
            if causal:
                s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
            outs.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v))
        return torch.cat(outs).to(query.dtype)

    return varlen_attn


@pytest.fixture
def cuda_like(monkeypatch):
    """torch's varlen path made available (a CPU stand-in), no flash-attn / xformers: returns the calls list."""
    calls = []
    monkeypatch.setattr(A, "_varlen", lambda: _reference_varlen(calls))
    monkeypatch.setattr(A, "_varlen_device_problem", lambda device: None)  # the CPU counts as a capable GPU
    monkeypatch.setattr(A, "_flash", lambda: None)
    monkeypatch.setattr(A, "_xformers", lambda: None)
    return calls


# ------------------------------------------------------------------------------------------ dispatch


def test_cpu_keeps_the_mask_path():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_impl("auto", CPU, dtype, packed=True, head_dim=64) == "sdpa"
    if not torch.cuda.is_available():
        assert "varlen" not in available_impls()
    if A._varlen() is not None:  # torch >= 2.10 (this venv: 2.13): the CPU is what rules it out
        assert varlen_problem(CPU, torch.bfloat16, 64) == "runs on CUDA only, got a cpu tensor"
    q, k, v = _packed_qkv(LENS)[1]
    with pytest.raises(
        ValueError, match="attn_impl: 'varlen' (runs on CUDA only|needs torch.nn.attention.varlen)"
    ):
        attention(q, k, v, impl="varlen", cu_seqlens=_cu(LENS))
    # the name is a config value like the others
    assert create_model("tiny", attn_impl="varlen").config.attn_impl == "varlen"


def test_cuda_auto_picks_varlen_for_packed_half(monkeypatch):
    monkeypatch.setattr(A, "_varlen", lambda: _reference_varlen([]))
    monkeypatch.setattr(A, "_varlen_device_problem", lambda d: None if d.type == "cuda" else "CUDA only")
    monkeypatch.setattr(A, "_flash", lambda: None)
    monkeypatch.setattr(A, "_xformers", lambda: None)
    r = lambda dtype=torch.bfloat16, packed=True, **kw: resolve_impl("auto", CUDA, dtype, packed, **kw)  # noqa: E731
    assert r(head_dim=64) == r(torch.float16, head_dim=64) == r(head_dim=72) == r(head_dim=256) == "varlen"
    assert r(head_dim=64, causal=True) == "varlen"
    assert r() == "varlen"  # head dim not given: not a reason to fall back
    # the fallback: fp32, head dims the kernel does not take, dense batches (SDPA's flash kernel), CPU
    assert r(torch.float32, head_dim=64) == "sdpa"
    assert r(head_dim=12) == r(head_dim=264) == "sdpa"
    assert r(packed=False, head_dim=64) == "sdpa"
    assert resolve_impl("auto", CPU, torch.bfloat16, True, head_dim=64) == "sdpa"
    # flash-attn, when installed, stays first; varlen before xformers for packed batches
    monkeypatch.setattr(A, "_xformers", lambda: object())
    assert r(head_dim=64) == "varlen" and r(torch.float32, head_dim=64) == "xformers"
    monkeypatch.setattr(A, "_flash", lambda: (None, None, 2))
    assert r(head_dim=64) == "flash_attn"
    monkeypatch.setattr(A, "_flash", lambda: None)
    monkeypatch.setattr(A, "_xformers", lambda: None)
    # a GPU the kernel does not run on, or a torch without varlen_attn
    monkeypatch.setattr(A, "_varlen_device_problem", lambda d: "runs on sm8x/sm90/sm10x/sm120 GPUs, got sm75")
    assert r(head_dim=64) == "sdpa"
    assert "sm75" in varlen_problem(CUDA, torch.bfloat16, 64)
    monkeypatch.setattr(A, "_varlen_device_problem", lambda d: None)
    monkeypatch.setattr(A, "_varlen", lambda: None)
    assert r(head_dim=64) == "sdpa"
    assert "torch >= 2.10" in varlen_problem(CUDA, torch.bfloat16, 64)


def test_available_impls_lists_varlen_where_it_runs(monkeypatch):
    monkeypatch.setattr(A, "_varlen", lambda: _reference_varlen([]))
    monkeypatch.setattr(A, "_varlen_device_problem", lambda d: None)
    monkeypatch.setattr(A, "_flash", lambda: None)
    monkeypatch.setattr(A, "_xformers", lambda: None)
    monkeypatch.setattr(A.torch.cuda, "is_available", lambda: True)
    assert available_impls() == ["varlen", "sdpa", "math"]
    monkeypatch.setattr(A, "_varlen_device_problem", lambda d: "runs on sm8x/sm90/sm10x/sm120 GPUs, got sm75")
    assert available_impls() == ["sdpa", "math"]


def test_varlen_device_rule(monkeypatch):
    """The architectures torch's FlashAttention 2 accepts; a build without its kernels."""
    rule = A._varlen_device_rule  # uncached
    monkeypatch.setattr(A.torch.backends.cuda, "is_flash_attention_available", lambda: True)
    for cap, ok in (
        ((8, 0), True),
        ((8, 9), True),
        ((9, 0), True),
        ((10, 0), True),
        ((12, 0), True),
        ((7, 5), False),
        ((9, 1), False),
        ((11, 0), False),
    ):
        monkeypatch.setattr(A.torch.cuda, "get_device_capability", lambda d, cap=cap: cap)
        problem = rule(CUDA)
        assert (problem is None) == ok, (cap, problem)
        if not ok:
            assert f"got sm{cap[0]}{cap[1]}" in problem
    monkeypatch.setattr(A.torch.backends.cuda, "is_flash_attention_available", lambda: False)
    assert rule(CUDA) == "needs a torch build with FlashAttention kernels (this one has none)"
    assert rule(CPU) == "runs on CUDA only, got a cpu tensor"


def test_older_varlen_signatures(monkeypatch):
    """The first torch signature took ``is_causal`` and no ``scale``: causal maps to it, a custom scale
    keeps the mask path (auto) or is an error (explicit)."""
    seen = []

    def old_varlen_attn(
        query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None
    ):
        seen.append(is_causal)
        ws = (-1, 0) if is_causal else (-1, -1)
        return _reference_varlen([])(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=ws)

    monkeypatch.setattr(A, "_varlen", lambda: old_varlen_attn)
    monkeypatch.setattr(A, "_varlen_device_problem", lambda d: None)
    monkeypatch.setattr(A, "_flash", lambda: None)
    monkeypatch.setattr(A, "_xformers", lambda: None)
    q, k, v = _packed_qkv(LENS)[1]
    cu = _cu(LENS)
    for causal in (False, True):
        got = attention(q, k, v, causal=causal, cu_seqlens=cu)
        torch.testing.assert_close(
            got, attention(q, k, v, causal=causal, impl="math", cu_seqlens=cu), atol=1e-2, rtol=1e-2
        )
    assert seen == [False, True]
    assert resolve_impl("auto", CUDA, torch.bfloat16, True, head_dim=8, scale=0.5) == "sdpa"
    with pytest.raises(ValueError, match="takes no softmax scale"):
        attention(q, k, v, impl="varlen", cu_seqlens=cu, scale=0.5)


# ------------------------------------------------------------------------------------------ the varlen glue


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_glue_matches_mask_path(cuda_like, causal):
    """(1, T, H, Dh) views -> (T, H, Dh), int32 offsets, max length, scale, causal as window_size=(-1, 0);
    output and gradients equal the mask path's."""
    lens = LENS
    _, (q, k, v) = _packed_qkv(lens, h=3, d=16)
    cu = _cu(lens, dtype=torch.int64)
    assert resolve_impl("auto", q.device, q.dtype, True, head_dim=16, causal=causal) == "varlen"
    outs, grads = {}, {}
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    for impl in ("auto", "sdpa"):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = attention(*leaves, causal=causal, impl=impl, cu_seqlens=cu)
        (out.float() * w).sum().backward()
        outs[impl], grads[impl] = out, [t.grad for t in leaves]
    assert len(cuda_like) == 1
    call = cuda_like[0]
    assert call["shape"] == (sum(lens), 3, 16) and call["cu_dtype"] == torch.int32
    assert call["max_q"] == call["max_k"] == max(lens)
    assert call["scale"] == pytest.approx(16**-0.5)
    assert call["window_size"] == ((-1, 0) if causal else (-1, -1))
    assert outs["auto"].shape == q.shape and outs["auto"].dtype == torch.bfloat16
    torch.testing.assert_close(outs["auto"], outs["sdpa"], atol=2e-2, rtol=2e-2)
    for a, b in zip(grads["auto"], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_varlen_explicit_dense_batch(cuda_like):
    """impl="varlen" without cu_seqlens: B sequences of length T (and Tq != Tk for a pooling probe)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 6, 2, 8, generator=g).bfloat16() for _ in range(3))
    for causal in (False, True):
        torch.testing.assert_close(
            attention(q, k, v, impl="varlen", causal=causal),
            attention(q, k, v, impl="math", causal=causal),
            atol=2e-2,
            rtol=2e-2,
        )
    probe = q[:, :1]
    torch.testing.assert_close(
        attention(probe, k, v, impl="varlen"), attention(probe, k, v, impl="math"), atol=2e-2, rtol=2e-2
    )
    with pytest.raises(ValueError, match="causal=True needs Tq == Tk"):
        attention(probe, k, v, impl="varlen", causal=True)


def test_vision_packed_uses_varlen_by_default(cuda_like):
    """VisionTransformer.forward_packed with the default attn_impl="auto" runs varlen (once per block)
    where it is available, and equals the mask path."""
    cfg = VisionConfig(image_size=16, patch_size=4, width=32, depth=2, heads=4, dynamic_size=True)
    torch.manual_seed(0)
    tower = VisionTransformer(cfg, embed_dim=24).eval().bfloat16()
    assert tower.attn_impl == "auto"
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=g).bfloat16() for h, w in ((16, 16), (8, 12), (4, 4))]
    with torch.no_grad():
        got = tower.forward_packed(images)
        assert len(cuda_like) == cfg.depth
        assert [c["max_q"] for c in cuda_like] == [17] * cfg.depth  # 4x4 patches + class token
        tower.attn_impl = "sdpa"
        ref = tower.forward_packed(images)
    assert len(cuda_like) == cfg.depth  # the mask path does not call varlen
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


# ------------------------------------------------------------------------------------------ bad cu_seqlens


@pytest.mark.parametrize(
    "cu,max_seqlen,match",
    [
        ([1, 5, 16], None, r"start at 0 and end .* got 1 \.\.\. 16"),
        ([0, 5, 12], None, r"end at the packed length T=16, got 0 \.\.\. 12"),
        ([0, 9, 5, 16], None, "non-decreasing"),
        ([0, 9, 16], 7, "max_seqlen: 7 is shorter than the longest packed sequence \\(9\\)"),
        ([0, 9, 16], 0, "max_seqlen: expected a positive length"),
    ],
)
def test_bad_cu_seqlens_values(cu, max_seqlen, match):
    q, k, v = (torch.zeros(1, 16, 2, 8) for _ in range(3))
    cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, cu_seqlens=cu, max_seqlen=max_seqlen)


def test_bad_cu_seqlens_shape_and_dtype():
    q, k, v = (torch.zeros(1, 6, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match="integer \\(int32\\) tensor, got torch.float32"):
        attention(q, k, v, cu_seqlens=torch.tensor([0.0, 6.0]))
    with pytest.raises(ValueError, match="1-D tensor"):
        attention(q, k, v, cu_seqlens=torch.tensor([[0, 6]], dtype=torch.int32))
    with pytest.raises(ValueError, match="1-D tensor"):
        attention(q, k, v, cu_seqlens=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="got list"):
        attention(q, k, v, cu_seqlens=[0, 6])
    with pytest.raises(ValueError, match="B == 1 and Tq == Tk"):
        attention(
            q.expand(2, -1, -1, -1),
            k.expand(2, -1, -1, -1),
            v.expand(2, -1, -1, -1),
            cu_seqlens=torch.tensor([0, 6], dtype=torch.int32),
        )
    # good offsets: the longest sequence comes back (given max_seqlen wins when it is not short)
    assert check_cu_seqlens(torch.tensor([0, 2, 2, 6]), 6) == 4
    assert check_cu_seqlens(torch.tensor([0, 2, 2, 6]), 6, max_seqlen=5) == 5


def test_fake_has_torch_signature():
    """The stand-in keeps the leading parameters of the installed torch's varlen_attn (when it has one)."""
    fn = A._varlen()
    if fn is None:
        pytest.skip("this torch has no varlen_attn")
    head = list(inspect.signature(fn).parameters)[:7]
    assert head == list(inspect.signature(_reference_varlen([])).parameters)[:7]


# ------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_varlen_on_cuda_matches_mask_and_float64():
    """torch's varlen_attn against the block-diagonal-mask SDPA path and float64, bf16, forward and
    backward, odd lengths, q/k/v as views of a fused qkv tensor (as the model makes them)."""
    problem = varlen_problem(CUDA, torch.bfloat16, 64)
    if problem:
        pytest.skip(f"varlen: {problem}")
    lens = [197, 1, 63, 129, 255, 7]
    cu = _cu(lens, device="cuda")
    if A._flash() is None:
        assert resolve_impl("auto", CUDA, torch.bfloat16, True, head_dim=64) == "varlen"
    assert "varlen" in available_impls()
    g = torch.Generator(device="cuda").manual_seed(2)
    for causal in (False, True):
        _, base = _packed_qkv(lens, h=12, d=64, dtype=torch.float64, seed=int(causal), device="cuda")
        w = torch.randn(base[0].shape, generator=g, device="cuda", dtype=torch.float64)
        res = {}
        for name, impl, dtype in (
            ("truth", "math", torch.float64),
            ("ref", "math", torch.bfloat16),
            ("varlen", "varlen", torch.bfloat16),
            ("mask", "sdpa", torch.bfloat16),
        ):
            qkv = torch.stack(base, 2).to(dtype).requires_grad_()
            q, k, v = qkv.unbind(2)  # strided views, last dim contiguous
            out = attention(q, k, v, causal=causal, impl=impl, cu_seqlens=cu, max_seqlen=max(lens))
            (out.double() * w).sum().backward()
            res[name] = (out.detach(), qkv.grad)
        truth, ref = res["truth"], res["ref"]
        for name in ("varlen", "mask"):
            out, grad = res[name]
            assert out.dtype == torch.bfloat16 and bool(torch.isfinite(grad).all())
            assert_within_budget(f"{name} out causal={causal}", out, ref[0], truth[0], torch.bfloat16)
            assert_within_budget(f"{name} grad causal={causal}", grad, ref[1], truth[1], torch.bfloat16)
    # the dense form (B sequences of length T) and a model's packed forward under autocast
    q, k, v = (t.bfloat16() for t in _packed_qkv([37] * 3, h=4, d=32, device="cuda")[1])
    q, k, v = (t.reshape(3, 37, 4, 32) for t in (q, k, v))
    torch.testing.assert_close(
        attention(q, k, v, impl="varlen"), attention(q, k, v, impl="math"), atol=2e-2, rtol=2e-2
    )
    cfg = VisionConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, dynamic_size=True)
    tower = VisionTransformer(cfg, embed_dim=32).cuda().eval()
    images = [torch.randn(3, h, w, device="cuda") for h, w in ((32, 32), (8, 24), (16, 8))]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        got = tower.forward_packed(images)
        tower.attn_impl = "sdpa"
        ref = tower.forward_packed(images)
    torch.testing.assert_close(got.float(), ref.float(), atol=3e-2, rtol=3e-2)
