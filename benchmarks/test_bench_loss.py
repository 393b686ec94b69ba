"""pytest-benchmark suite: quick CPU regression timings of the losses (not part of the default test run).

    pytest benchmarks/ --benchmark-only                     # timings
    pytest benchmarks/ --benchmark-autosave                 # save, then compare with --benchmark-compare

Sizes are small enough for a 2-core machine (about a minute in all). Besides time, each case checks
the memory contract of the chunked implementation at a size where B×B dominates: its peak extra
memory stays under a quarter of the materialized reference's.
"""

from __future__ import annotations

import pytest
import torch

from fastclip.bench.loss import make_inputs
from fastclip.bench.memory import cpu_peak_extra_bytes
from fastclip.bench.providers import get_provider

CPU = torch.device("cpu")
CASES = [(loss, impl, b, d) for loss in ("clip", "siglip") for impl in ("fastclip-torch", "reference")
         for (b, d) in ((1024, 256), (4096, 256))]  # fmt: skip


def _step(loss, provider, b, d):
    prov, reason = get_provider(provider, CPU)
    assert prov is not None, reason
    x, y = make_inputs(b, d, torch.float32, CPU)
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0 if loss == "siglip" else 0.0, requires_grad=True)

    def step():
        for t in (x, y, scale, bias):
            t.grad = None
        prov.fn(loss, x, y, scale, bias).backward()

    return step


@pytest.mark.parametrize("loss,provider,batch,dim", CASES, ids=lambda v: str(v))
def test_fwd_bwd(benchmark, loss, provider, batch, dim):
    step = _step(loss, provider, batch, dim)
    benchmark.extra_info.update(loss=loss, provider=provider, batch=batch, dim=dim, dtype="float32")
    benchmark.pedantic(step, rounds=3 if batch <= 1024 else 2, warmup_rounds=1)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_memory_contract(loss):
    b, d = 8192, 16  # chunks of 2**22 logits: B×B is 16 of them
    peaks = {}
    for provider in ("fastclip-torch", "reference"):
        step = _step(loss, provider, b, d)
        peaks[provider], _ = cpu_peak_extra_bytes(step)
    assert peaks["fastclip-torch"] < peaks["reference"] / 4, peaks
