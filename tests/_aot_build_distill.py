"""Compile the distillation kernels as their launchers launch them, for sm_90 and sm_80, without a GPU.

The same method as ``tests/_aot_build.py`` (its stand-in driver, its SASS reading): the launchers of
``fastclip.kernels.distill`` are called with CPU tensors of a training step's shapes, the kernels'
``run`` compiles only, and the GEMMs that follow the tile kernel are skipped (nothing runs). Prints one
``RESULT {json}`` line; tests/test_kernels_aot.py checks it.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _aot_build as ab  # noqa: E402
from fastclip.kernels import config  # noqa: E402
from fastclip.kernels import distill as kd  # noqa: E402

PRECS = {"bf16": torch.bfloat16, "fp16": torch.float16}
DIM = 768


def main() -> None:
    compiled = ab.compile_only(
        {"distill-stats": kd._distill_stats_kernel, "distill-grad": kd._distill_grad_kernel}
    )
    kd.check_block = kd._check_pair_blocks = lambda *a, **k: None
    kd.gemm.accumulate = lambda *a, **k: None  # CPU tensors: compile the tile kernels only
    out: dict = {}
    for cap, arch in ab.ARCHS.items():
        triton.runtime.driver.set_active(ab.TargetOnlyDriver(cap))
        config.arch = lambda device, _arch=arch: _arch
        for prec, dtype in PRECS.items():
            g = torch.Generator().manual_seed(0)
            x, y, xt, yt = (torch.randn(256, DIM, generator=g).to(dtype) for _ in range(4))
            s, t = torch.tensor(10.0), torch.tensor(20.0)
            stats = [torch.zeros(256)] * 6
            kd.distill_stats(x, y, s, xt, yt, t, True)
            kd.distill_grad(x, y, s, xt, yt, t, stats, torch.full((5,), 0.1), 0, True, True)
            for kname, k in compiled:
                out[f"{kname}-{arch}-{prec}"] = {
                    **ab.describe(k),
                    "kernel": kname,
                    "arch": arch,
                    "prec": prec,
                }
            compiled.clear()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
