"""Tuning workloads of the contrastive family's kernels for ``fastclip.kernels.tune``'s sweep.

``family-lse`` (the fused forward, ``_family_lse_kernel``) and ``family-grad`` (the gradient tile,
``_family_grad_kernel``) own their configurations (``kernels/config.py``, ``OWN_KERNELS``); the sweep
tries each candidate of ``config.AUTOTUNE_CANDIDATES[kernel]`` like CLIP's: compiled ahead in worker
processes (``python -m fastclip.bench.tune_family --precompile JOBS --cap 90``), checked against the
float64 reference at ``check_batch`` rows on two variants (sentence-transformers' MNRL with one hard
negative; every direction with ids as positives, a hardness shift and label smoothing: the most masks
per cell), skipped if it spills or leaves the error budget, then timed on the MNRL call at ``batch``
rows (the forward alone for ``family-lse``, forward and backward for ``family-grad``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fastclip.kernels import config
from fastclip.kernels import family_tiles as kft
from fastclip.kernels import tune as kt

SCALE = 20.0  # sentence-transformers' MNRL
ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# name -> (options, with ids)
VARIANTS = {
    "mnrl": ({}, False),
    "all": (
        dict(directions=ALL, hardness="in_batch_negatives", hardness_strength=1.0, duplicates="positive",
             label_smoothing=0.1),
        True,
    ),
}  # fmt: skip
KERNELS = ("family-lse", "family-grad")


def _inputs(n: int, dim: int, dtype, device, seed: int):
    """(query, positive, negative): unit rows; ids pair rows two by two (duplicates to mask)."""
    g = torch.Generator(device=device).manual_seed(seed)
    ts = [
        torch.nn.functional.normalize(torch.randn(n, dim, device=device, generator=g), dim=-1)
        for _ in range(3)
    ]
    ids = torch.arange(n, device=device) // 2
    return [t.to(dtype) for t in ts], ids


def _loss_and_grads(fn, ts, kw):
    leaves = [t.detach().clone().requires_grad_() for t in ts]
    q, p, neg = leaves
    loss = fn(q, p, [neg], scale=SCALE, **kw)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


class FamilyWorkload:
    """The family's kernels through ``fastclip.info_nce_loss(impl="triton")`` (the sweep's workload)."""

    precompile_module = "fastclip.bench.tune_family"
    max_spills = 0  # as CLIP's: a candidate that spills is skipped (the shipped tiles spill nowhere)

    def __init__(self, kernel: str):
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
        self.kernel = kernel

    def setup(self, batch: int, check_batch: int, dim: int, dtype, device) -> None:
        """The timing inputs, and per check variant its inputs, the float64 truth and the error budget
        (``2 x err(the materialized loss in the input dtype) + floor * max(1, |truth|)``, the tests'),
        computed once for all candidates."""
        from fastclip.reference_family import info_nce_reference

        self.batch, self.dim = batch, dim
        self.checks = []
        for opts, with_ids in VARIANTS.values():
            ts, ids = _inputs(check_batch, dim, dtype, device, seed=1)
            kw = {**opts, "query_ids": ids, "doc_ids": ids} if with_ids else dict(opts)
            truth = _loss_and_grads(info_nce_reference, [t.double() for t in ts], kw)
            low = _loss_and_grads(info_nce_reference, ts, kw)
            budgets = [
                kt.BUDGET_FACTOR * float((lo.double() - tr).abs().max())
                + kt.FLOOR[dtype] * max(1.0, float(tr.abs().max()))
                for lo, tr in zip(low, truth)
            ]
            self.checks.append((ts, kw, truth, budgets))
        ts, _ = _inputs(batch, dim, dtype, device, seed=0)
        self.ts = [t.requires_grad_(self.kernel == "family-grad") for t in ts]

    def check(self) -> tuple[bool, float]:
        """Every variant's loss and gradients with the current configuration against float64:
        (within budget, worst error / budget)."""
        import fastclip

        worst = 0.0
        for ts, kw, truth, budgets in self.checks:
            got = _loss_and_grads(fastclip.info_nce_loss, ts, {**kw, "impl": "triton"})
            for g, tr, budget in zip(got, truth, budgets):
                err = float((g.double() - tr).abs().max())
                worst = max(worst, err / budget) if err == err else float("inf")
        return worst <= 1.0, worst

    def run(self):
        import fastclip

        q, p, neg = self.ts
        if self.kernel == "family-lse":
            with torch.no_grad():
                return fastclip.info_nce_loss(q, p, [neg], scale=SCALE, impl="triton")
        for t in self.ts:
            t.grad = None
        loss = fastclip.info_nce_loss(q, p, [neg], scale=SCALE, impl="triton")
        loss.backward()
        return loss

    def spills(self) -> int:
        return kt.spills_of(kft._family_lse_kernel, kft._family_grad_kernel, kft._guide_threshold_kernel)

    def flops(self) -> float:
        """MNRL with one hard negative: n = batch rows against N = 2 n columns; the forward is 2 n N D,
        forward and backward 8 n N D (the forward, the gradient tile's recomputation, two GEMMs)."""
        nnd = self.batch * 2 * self.batch * self.dim
        return (2 if self.kernel == "family-lse" else 8) * nnd


def _precompile_worker(jobs: list, cap: int) -> None:
    """Compile ``jobs`` ([kernel, dtype name, dim, config fields]) for sm_``cap`` into Triton's cache: both
    variants' launches at 256 rows (the specialization of a full-size call), the GEMMs on the CPU."""
    import triton

    from fastclip.kernels import common
    from fastclip.kernels import family as kf
    from fastclip.ops.family_variants import InfoNCEOptions, Layout, info_nce_spec

    kt.compile_only(
        {"family-lse": kft._family_lse_kernel, "family-grad": kft._family_grad_kernel,
         "family-thr": kft._guide_threshold_kernel, "round": common._round_tf32_kernel}
    )  # fmt: skip
    triton.runtime.driver.set_active(kt.TargetOnlyDriver(cap))
    config.arch = lambda device: {90: "hopper", 80: "ampere"}.get(cap // 10 * 10, "generic")
    n = 256
    for kernel, dname, dim, fields in jobs:
        cfg = config.TileConfig(**fields)
        key = (config.arch(None), kernel, dname, config.d_bucket(dim))
        config.TUNED[key] = cfg
        t0 = time.perf_counter()
        try:
            for opts, with_ids in VARIANTS.values():
                ids_ops = frozenset({0, 1, 2}) if with_ids else frozenset()
                lay = Layout(q=0, p=1, Q=0, P=1, N=(2,), with_ids=ids_ops)
                spec = info_nce_spec(InfoNCEOptions(**opts), lay, n)
                ts = [torch.randn(n, dim).to(kt.DTYPES[dname]) for _ in range(3)]
                ids = [torch.arange(n) // 2 if with_ids else None for _ in range(3)]
                kf.family_triton(spec, ts, ids, [None] * 3, None, torch.tensor(SCALE), [True] * 3, True)
            row = {"ok": True}
        except Exception as exc:  # noqa: BLE001  (a candidate may not compile: report it)
            row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        job = [kernel, dname, dim, cfg.name()]
        print(json.dumps({"job": job, "s": round(time.perf_counter() - t0, 2), **row}), flush=True)
        config.TUNED.pop(key, None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="precompile worker of the family's tuning (internal)")
    p.add_argument("--precompile", required=True)
    p.add_argument("--cap", type=int, default=90)
    args = p.parse_args(argv)
    _precompile_worker(json.loads(args.precompile), args.cap)


if __name__ == "__main__":
    main()
