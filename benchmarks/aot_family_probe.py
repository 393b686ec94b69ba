"""Registers and spills of the family's forward kernel at several tiles, compiled for sm_90 without a GPU.

    TRITON_INTERPRET=0 python benchmarks/aot_family_probe.py      # prints one line per tile

What ``benchmarks/results/aot_sm90_family_2026-12-05.txt`` holds (run once with the GPU image's triton 3.6
first on PYTHONPATH, once with the venv's). Uses the stand-in driver and the variants of
``tests/_aot_build_family.py``; the tile is forced by replacing ``config.tile_config`` for ``family-lse``.
"""

from __future__ import annotations

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import _aot_build as ab  # noqa: E402
import _aot_build_family as abf  # noqa: E402
from fastclip.kernels import config  # noqa: E402
from fastclip.kernels import family as kf  # noqa: E402
from fastclip.kernels import family_tiles as kft  # noqa: E402

TILES = [(64, 64, 64, 8, 3), (64, 64, 64, 4, 3), (64, 64, 32, 8, 3), (64, 64, 64, 8, 2), (64, 64, 32, 4, 3),
         (64, 32, 64, 4, 3), (32, 64, 64, 4, 3), (64, 64, 128, 8, 2)]  # fmt: skip


def main() -> None:
    compiled = ab.compile_only({"family-lse": kft._family_lse_kernel, "family-grad": kft._family_grad_kernel,
                                "family-thr": kft._guide_threshold_kernel})  # fmt: skip
    triton.runtime.driver.set_active(ab.TargetOnlyDriver(90))
    config.arch = lambda device: "hopper"
    kf.gemm.tf32_enabled = lambda: False
    real = config.tile_config
    variants = abf._variants()
    for tile in TILES:
        forced = config.TileConfig(*tile)
        config.tile_config = lambda k, *a, _f=forced, **kw: _f if k == "family-lse" else real(k, *a, **kw)
        row = []
        for vname in ("ids", "gist", "hard"):
            spec, n_ops, with_ids, guide = variants[vname]
            g = torch.Generator().manual_seed(0)
            ts = [torch.randn(abf.N, abf.DIM, generator=g).to(torch.bfloat16) for _ in range(n_ops)]
            ids = [
                torch.randint(0, 9, (abf.N,), generator=g) if with_ids and i < 4 else None
                for i in range(n_ops)
            ]
            guides = [torch.randn(abf.N, 64, generator=g) if guide else None for _ in range(n_ops)]
            kf.family_triton(spec, ts, ids, guides, torch.zeros(abf.N) if guide else None, torch.tensor(20.0),
                             [True] * n_ops, True)  # fmt: skip
            for kname, k in compiled:
                if kname == "family-lse":
                    d = ab.describe(k)
                    row.append(
                        f"{vname}: regs {d['regs']} spill {d['spill_stores']} wgmma {d['wgmma']} smem {d['shared']}"
                    )
            compiled.clear()
        print(triton.__version__, tile, " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
