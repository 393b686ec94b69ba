"""The family's tuning workload (fastclip/bench/tune_family.py): its float64 check passes the shipped
kernels and refuses a candidate whose results are off, and the sweep records each candidate's error,
spills and time (interpreter, tiny sizes)."""

from __future__ import annotations

import time

import pytest
import torch

pytestmark = pytest.mark.interpreter


def _workload(kernel):
    from fastclip.bench.tune_family import FamilyWorkload

    w = FamilyWorkload(kernel)
    w.setup(96, 40, 24, torch.bfloat16, torch.device("cpu"))
    return w


def test_check_passes_the_shipped_kernels_and_refuses_wrong_gradients(monkeypatch):
    from fastclip.kernels import family as kf

    w = _workload("family-grad")
    ok, worst = w.check()
    assert ok and worst < 0.5, worst
    real = kf.family_triton

    def off(*args, **kwargs):  # a candidate whose gradients are 25 % off
        loss, ds, grads = real(*args, **kwargs)
        return loss, ds, [None if g is None else g * 1.25 for g in grads]

    monkeypatch.setattr(kf, "family_triton", off)
    ok, worst = w.check()
    assert not ok and worst > 1.0, worst


def test_sweep_records_each_candidate():
    from fastclip.kernels import config
    from fastclip.kernels import tune as kt

    from fastclip.bench.tune_family import FamilyWorkload

    dev = torch.device("cpu")
    base = config.tile_config("family-lse", dev, torch.bfloat16, 24)
    rows, best = kt.sweep("family-lse", "bfloat16", 24, 96, [base], dev, check_batch=40,
                          deadline=time.perf_counter() + 120, log=lambda m: None,
                          workload=FamilyWorkload("family-lse"))  # fmt: skip
    assert best == base and rows[0]["ms"] > 0 and rows[0]["error_vs_budget"] <= 1.0
    assert ("interpreter", "family-lse", "bfloat16", 256) not in config.TUNED  # restored
    with pytest.raises(ValueError, match="kernel: expected one of"):
        FamilyWorkload("lse")
