"""The memory contract of the "torch" implementation: nothing of size B×B, forward or backward.

Two independent instruments, both deterministic (no timing):
* a dispatch mode that records the largest tensor any ATen op returns (what autograd saves and every
  intermediate the implementation makes), which must stay at one chunk;
* the peak resident memory of a fresh process (VmHWM after clear_refs) above its inputs, compared
  with the materialized reference at a size where B×B dominates.
Each test also shows its instrument sees the B×B matrices of the reference, so it can fail.
"""

import os
import subprocess
import sys

import pytest
from utils import LargestOutput, features, scalar

from fastclip import clip_loss, siglip_loss


def _run(fn, b, d, **kw):
    x, y, s, bias = features(b, d), features(b, d, seed=1), scalar(10.0), scalar(-5.0)
    loss = fn(x, y, s, bias, **kw)
    loss.backward()


@pytest.mark.parametrize("fn", [clip_loss, siglip_loss])
def test_no_tensor_of_b_by_b_elements(fn):
    b, d, chunk = 1024, 32, 64
    with LargestOutput() as mode:
        _run(fn, b, d, impl="torch", chunk_size=chunk)
    assert mode.largest <= chunk * b, f"largest tensor {mode.largest} elements > one chunk ({chunk * b})"
    with LargestOutput() as ref_mode:
        _run(fn, b, d, impl="reference")
    assert ref_mode.largest >= b * b  # the instrument sees the materialized matrix


def _peak_bytes(loss, impl, b, d):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    probe = os.path.join(os.path.dirname(__file__), "_hwm_probe.py")
    out = subprocess.run(
        [sys.executable, probe, loss, impl, str(b), str(d)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loss", ["clip", "siglip", "mnrl"])
def test_peak_memory_is_a_small_fraction_of_the_reference(loss):
    """Peak RSS above the inputs (VmHWM after clear_refs, docs/design.md "Platform facts") at B=4096, chunks of 128 rows."""
    b, d = 4096, 16
    ours = _peak_bytes(loss, "torch", b, d)
    ref = _peak_bytes(loss, "reference", b, d)
    assert ref >= 2 * b * b * 4  # at least two fp32 B×B matrices live in the reference
    assert ours <= 0.1 * ref, f"peak {ours} B is more than 10% of the reference's {ref} B"


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_siglip_backward_allocates_only_its_outputs(dtype_name):
    """The single-process SigLIP Function saves its gradients in the features' dtype, so its backward
    allocates the two input gradients and nothing of size (n + N)·D more (it once held fp32 products
    and their casts too: 6x the bytes of one bf16 input gradient instead of 2x)."""
    import torch

    from fastclip.bench.memory import cpu_peak_extra_bytes

    b, d = 1024, 512
    dtype = getattr(torch, dtype_name)
    x, y = features(b, d, dtype).requires_grad_(), features(b, d, dtype, seed=1).requires_grad_()
    s, bias = scalar(10.0).requires_grad_(), scalar(-5.0).requires_grad_()
    loss = siglip_loss(x, y, s, bias, impl="torch", chunk_size=64)
    peak, _ = cpu_peak_extra_bytes(loss.backward)
    unit = b * d * x.element_size()  # one input gradient
    assert peak <= 2 * unit + 65536, f"backward peak {peak / unit:.2f}x one input gradient"
    ref = siglip_loss(x.detach().double(), y.detach().double(), s.detach().double(), bias.detach().double())
    assert abs(float(loss.detach()) - float(ref)) <= 1e-2 * max(1.0, abs(float(ref)))


def test_positive_logits_in_row_chunks(monkeypatch):
    """Eager positive logits go in row chunks (at most CHUNK_ELEMENTS per upcast buffer): same values as
    one float64 expression, for every offset, with chunks that do not divide the rows."""
    import torch

    from fastclip.bench.memory import cpu_peak_extra_bytes
    from fastclip.ops import torch_impl

    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 7 * 64)
    n, d = 250, 64
    x, y = features(n, d, torch.bfloat16, requires_grad=False), features(n + 9, d, torch.bfloat16, 1, False)
    s = scalar(3.0, requires_grad=False)  # a block primitive: detached inputs
    for offset in (0, 5, 9, -4, 300):
        got = torch_impl.positive_logits(x, y, s, offset)
        lo, hi = torch_impl.positive_rows(n, n + 9, offset)
        want = (x[lo:hi].double() * y[lo + offset : hi + offset].double()).sum(-1) * 3.0
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    big = features(4096, d, torch.bfloat16, requires_grad=False)
    peak, _ = cpu_peak_extra_bytes(lambda: torch_impl.positive_logits(big, big, s, 0))
    assert peak <= 4096 * 4 + 3 * 7 * 64 * 4 + 65536, peak  # the (n,) result and one chunk's buffers
