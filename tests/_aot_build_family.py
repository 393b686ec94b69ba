"""Compile the contrastive family's Triton epilogue as its launcher launches it, for sm_90 and sm_80, without
a GPU.

The method of ``tests/_aot_build.py`` (its stand-in driver, its SASS reading): ``family_triton`` is called
with CPU tensors of a training step's shapes for the variants real calls get (hard negatives with
every direction and a hardness shift; ids as positives with label smoothing and a bank; GIST), the
kernels' ``run`` compiles only, and the GEMMs around them run on the CPU. Prints one ``RESULT {json}`` line;
tests/test_kernels_aot.py checks it.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _aot_build as ab  # noqa: E402
from fastclip.kernels import common  # noqa: E402
from fastclip.kernels import family as kf  # noqa: E402
from fastclip.kernels import family_tiles as kft  # noqa: E402

from fastclip.ops.family_variants import GistOptions, InfoNCEOptions, Layout, gist_spec, info_nce_spec  # noqa: E402

# (compute capability, precision): fp16 takes the bf16 code path but for the dtype of the stored gradient
# tile; fp32 is built as it runs with TF32 on (operands rounded first, kernels/common.py); fp32 without
# TF32 runs on the CUDA cores (FMA) and is not a training configuration. Ampere is built in bf16 only.
BUILDS = (
    (90, "bf16", torch.bfloat16, False),
    (90, "fp32-tf32", torch.float32, True),
    (80, "bf16", torch.bfloat16, False),
)
N, DIM, K = 256, 768, 2
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _variants():
    lay = Layout(q=0, p=1, Q=0, P=1, N=(2, 3))
    lay_ids = Layout(q=0, p=1, Q=0, P=1, N=(2, 3), bank=4, with_ids=frozenset({0, 1, 2, 3}))
    return {
        "hard": (info_nce_spec(InfoNCEOptions(ALL, "joint", "in_batch_negatives", 1.0), lay, N), 4, False, False),
        "ids": (info_nce_spec(InfoNCEOptions(ALL, "joint", "all_negatives", 1.0, "positive", 0.1), lay_ids, N), 5, True, False),
        "gist": (gist_spec(GistOptions(), Layout(q=0, p=1, Q=0, P=1, N=(2,)), N), 3, False, True),
    }  # fmt: skip


def main() -> None:
    compiled = ab.compile_only(
        {"family-lse": kft._family_lse_kernel, "family-grad": kft._family_grad_kernel,
         "family-thr": kft._guide_threshold_kernel, "round": common._round_tf32_kernel}
    )  # fmt: skip
    out: dict = {}
    for cap, prec, dtype, tf32 in BUILDS:
        arch = ab.ARCHS[cap]
        triton.runtime.driver.set_active(ab.TargetOnlyDriver(cap))
        kf.config.arch = lambda device, _arch=arch: _arch
        kf.gemm.tf32_enabled = lambda _tf32=tf32: _tf32
        for vname, (spec, n_ops, with_ids, guide) in _variants().items():
            g = torch.Generator().manual_seed(0)
            ts = [torch.randn(N, DIM, generator=g).to(dtype) for _ in range(n_ops)]
            ids = [
                torch.randint(0, 9, (N,), generator=g) if with_ids and i < 4 else None for i in range(n_ops)
            ]
            guides = [torch.randn(N, 64, generator=g) if guide else None for _ in range(n_ops)]
            thr = torch.zeros(N) if guide else None
            kf.family_triton(spec, ts, ids, guides, thr, torch.tensor(20.0), [True] * n_ops, True)
            for kname, k in compiled:
                if kname == "round":  # the TF32 rounding pass; tests/_aot_build.py checks it
                    continue
                out[f"{kname}-{vname}-{arch}-{prec}"] = {
                    **ab.describe(k), "kernel": kname, "variant": vname, "arch": arch, "prec": prec,
                }  # fmt: skip
            compiled.clear()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
