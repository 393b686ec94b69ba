"""The loss sweep's time limit holds inside a configuration, not only between configurations."""

from __future__ import annotations

import time

import torch

from fastclip.bench.loss import LossSweep, run_loss_sweep
from fastclip.bench.providers import Provider


def _slow_provider(seconds: float) -> Provider:
    def fn(loss, x, y, scale, bias):
        time.sleep(seconds)
        return (x * y).sum() * scale

    return Provider("slow", fn)


def test_time_limit_cuts_the_repetitions_of_a_running_configuration():
    """One configuration whose planned repetitions (time_budget_s / iteration = 40) would take ~8 s;
    with max_seconds = 1 the sweep stops after about a second and says so in the record."""
    cfg = LossSweep(
        providers=["slow"], batches=[8], dims=[4], dtypes=["float32"], losses=["clip"], device="cpu",
        warmup=1, min_repeats=1, max_repeats=40, time_budget_s=60.0, max_seconds=1.0, matmul_size=64,
    )  # fmt: skip
    t0 = time.perf_counter()
    doc = run_loss_sweep(
        cfg, progress=False, log=lambda _: None, extra_providers={"slow": _slow_provider(0.2)}
    )
    elapsed = time.perf_counter() - t0
    assert elapsed < 4.0, elapsed
    (rec,) = doc["records"]
    assert rec["status"] == "ok" and 1 <= rec["repeats"] < 40
    assert rec["message"].startswith("time limit:"), rec["message"]
    assert rec["kernel_path"] is None  # only the fused kernels on CUDA name a path


def test_without_a_limit_the_planned_repetitions_run():
    cfg = LossSweep(
        providers=["slow"], batches=[8], dims=[4], dtypes=["float32"], losses=["clip"], device="cpu",
        warmup=1, min_repeats=3, max_repeats=3, time_budget_s=60.0, matmul_size=64,
    )  # fmt: skip
    doc = run_loss_sweep(
        cfg, progress=False, log=lambda _: None, extra_providers={"slow": _slow_provider(0.01)}
    )
    (rec,) = doc["records"]
    assert rec["repeats"] == 3 and not rec["message"]
    assert torch.isfinite(torch.tensor(rec["fwd_bwd_ms"]))
