"""Tuning of the tile configurations on a GPU: ``python -m fastclip.kernels.tune``.

For each kernel ("lse" = ``clip_lse``, "tile" = ``clip_grad``, "siglip" = ``siglip_block`` with
gradients) and (dtype, D), every candidate of ``config.AUTOTUNE_CANDIDATES[kernel]`` (at most 16; the
first is the shipped configuration) is

1. compiled ahead, in parallel worker processes that compile for the GPU's target without touching it
   (``precompile``: the stand-in driver of tests/_aot_build.py; the binaries land in Triton's cache,
   so the timing process loads them instead of compiling one after another),
2. checked against a float64 reference at a small size (``check``: the error budget of the tests,
   ``err <= 2 * err(the same maths in the input dtype) + floor``) and skipped if it fails or spills,
3. timed at the tuning batch (median of ``triton.testing.do_bench``).

It prints one JSON line per candidate and, last, the winners as ``config.TUNED`` entries keyed by
(arch, kernel, dtype, D bucket): paste them into ``kernels/config.py`` (run-time autotuning is off
on purpose: the tile shape fixes every reduction order, see config.py). ``--max-seconds`` bounds the
whole run. The device check's ``tune`` part (benchmarks/device_parts/tune.py) runs the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
from fastclip.kernels import clip, config, siglip

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FLOP_FACTOR = {"lse": 2, "tile": 6, "siglip": 6}  # FLOPs per B*B*D of one call
# err <= BUDGET_FACTOR * err(same maths in the input dtype) + FLOOR * max(1, |truth|) (tests/utils.py)
BUDGET_FACTOR = 2.0
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
CLIP_SCALE, SIGLIP_SCALE, SIGLIP_BIAS = 1.0 / 0.07, 10.0, -10.0  # fastclip.bench.loss's values


# ----------------------------------------------------------------------------------------------------
# compiling without a GPU (also used by tests/_aot_build.py)


class TargetOnlyDriver:
    """Just enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: a device id, a
    stream and the compile target (``cap`` = 90 for sm_90)."""

    def __init__(self, cap: int):
        self.cap = cap

    def is_active(self):
        return True

    def get_current_device(self):
        return self.cap  # one kernel cache per target

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.cap, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def compile_only(kernels: dict, sms: int = 132) -> list:
    """Make each named kernel's ``run`` compile without launching, and the launchers take their GPU
    code paths on CPU tensors; returns the list that collects ``(name, compiled kernel)`` of every launch."""
    compiled: list = []
    for name, kern in kernels.items():
        orig = kern.run

        def run(*args, grid, warmup, _orig=orig, _name=name, **kwargs):
            k = _orig(*args, grid=grid, warmup=True, **kwargs)
            compiled.append((_name, k))
            return k

        kern.run = run
    config.interpreting = lambda: False
    config.num_sms = lambda device: sms
    clip.check_block = siglip.check_block = lambda *a, **k: None
    return compiled


def _precompile_worker(jobs: list, cap: int) -> None:
    """Compile ``jobs`` ([kernel, dtype name, dim, config fields]) for sm_``cap`` into Triton's cache."""
    import triton

    compile_only(
        {"lse": clip._clip_lse_kernel, "tile": clip._clip_grad_kernel, "siglip": siglip._siglip_tile_kernel}
    )
    triton.runtime.driver.set_active(TargetOnlyDriver(cap))
    config.arch = lambda device: {90: "hopper", 80: "ampere"}.get(cap // 10 * 10, "generic")
    for kernel, dname, dim, fields in jobs:
        cfg = config.TileConfig(**fields)
        key = (config.arch(None), kernel, dname, config.d_bucket(dim))
        config.TUNED[key] = cfg
        t0 = time.perf_counter()
        try:  # 256 rows: the specialization of a full-size call (sizes divisible by 16, full tiles)
            x, y = (torch.randn(256, dim).to(DTYPES[dname]) for _ in range(2))
            _call(kernel, x, y, torch.tensor(10.0), torch.tensor(-10.0), (torch.zeros(256), torch.zeros(256)))
            row = {"ok": True}
        except Exception as exc:  # noqa: BLE001  (a candidate may not compile: report it)
            row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(
            json.dumps(
                {"job": [kernel, dname, dim, cfg.name()], "s": round(time.perf_counter() - t0, 2), **row}
            )
        )
        config.TUNED.pop(key, None)


def precompile(
    jobs: list, cap: int, workers: int, timeout: float, module: str = "fastclip.kernels.tune"
) -> list:
    """Compile ``jobs`` in ``workers`` processes (TRITON_INTERPRET=0, no GPU touched); one dict per job.
    ``module``: whose ``--precompile`` worker compiles them (a workload's ``precompile_module``)."""
    procs, out = [], []
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    for w in range(max(1, min(workers, len(jobs)))):
        part = jobs[w::workers]
        cmd = [
            sys.executable,
            "-m",
            module,
            "--precompile",
            json.dumps(part),
            "--cap",
            str(cap),
        ]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    deadline = time.perf_counter() + timeout
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            out.append({"error": "precompile worker stopped at its time limit"})
        out += [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
        if p.returncode and not stdout.strip():
            out.append({"error": f"precompile worker exit {p.returncode}: {stderr[-300:]}"})
    return out


# ----------------------------------------------------------------------------------------------------
# checking and timing


def _call(kernel: str, x, y, s, bias, lse):
    coef = 1.0 / (2 * x.shape[0])
    if kernel == "lse":
        return clip.clip_lse(x, y, s)
    if kernel == "tile":
        return clip.clip_grad(x, y, s, *lse, coef, coef, 0, 2 * coef)
    return siglip.siglip_block(x, y, s, bias, 0, True)


def _truth(kernel: str, x, y, s: float, b: float, exact: bool):
    """The outputs of ``_call`` from float64 maths (``exact``) or with the matmuls in the input dtype."""
    S = (x.double() @ y.double().T) if exact else (x @ y.T).double()
    mm = (lambda a, t: a @ t.double()) if exact else (lambda a, t: (a.to(t.dtype) @ t).double())  # noqa: E731
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.float64, device=x.device)
    if kernel == "siglip":
        L = s * S + b
        G = torch.sigmoid(L) - eye
        loss = (torch.nn.functional.softplus(L) - eye * L).sum()
        return loss, s * mm(G, y), s * mm(G.T, x), (G * S).sum(), G.sum()
    L = s * S
    lr, lc = L.logsumexp(1), L.logsumexp(0)
    if kernel == "lse":
        return lr, lc
    c = 1.0 / (2 * n)
    G = c * torch.exp(L - lr[:, None]) + c * torch.exp(L - lc[None, :]) - 2 * c * eye
    return s * mm(G, y), s * mm(G.T, x), (G * S).sum()


def check(kernel: str, x, y) -> tuple[bool, float]:
    """The current configuration of ``kernel`` against float64 on (x, y): (within budget, worst
    error / budget)."""
    s = SIGLIP_SCALE if kernel == "siglip" else CLIP_SCALE
    st, bt = torch.tensor(s, device=x.device), torch.tensor(SIGLIP_BIAS, device=x.device)
    truth, low = _truth(kernel, x, y, s, SIGLIP_BIAS, True), _truth(kernel, x, y, s, SIGLIP_BIAS, False)
    lse = tuple(t.float() for t in _truth("lse", x, y, CLIP_SCALE, 0.0, True)) if kernel == "tile" else None
    got = _call(kernel, x, y, st, bt, lse)
    worst = 0.0
    for g, lo, tr in zip(got, low, truth):
        if g is None:
            continue
        err = float((g.double() - tr).abs().max())
        budget = BUDGET_FACTOR * float((lo - tr).abs().max()) + FLOOR[x.dtype] * max(
            1.0, float(tr.abs().max())
        )
        worst = max(worst, err / budget) if err == err else float("inf")
    return worst <= 1.0, worst


def _features(b: int, d: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [
        torch.nn.functional.normalize(torch.randn(b, d, device=device, generator=g), dim=-1).to(dtype)
        for _ in "xy"
    ]


def time_ms(fn, device) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` on a GPU, wall clock of 2 calls on CPU (dry run)."""
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(fn, warmup=10, rep=60, quantiles=[0.5])
        return ms[0] if isinstance(ms, (list, tuple)) else ms
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[0]


def spills_of(*fns) -> int:
    """The most register spills of any binary compiled so far for the ``@triton.jit`` functions ``fns``."""
    worst = 0
    for fn in fns:
        caches = getattr(fn, "device_caches", {})
        worst = max(
            [worst, *(getattr(k, "n_spills", 0) or 0 for c in caches.values() for k in c[0].values())]
        )
    return worst


def _spills(kernel: str) -> int:
    fns = {"lse": clip._clip_lse_kernel, "tile": clip._clip_grad_kernel, "siglip": siglip._siglip_tile_kernel}
    return spills_of(fns[kernel])


class BlockWorkload:
    """What the sweep checks and times for one of CLIP's and SigLIP's kernels (``config.KERNELS``): the
    block primitive at a square ``batch x batch`` block. ``fastclip/bench/tune_family.py`` has the same
    methods for the contrastive family's kernels."""

    precompile_module = "fastclip.kernels.tune"
    max_spills = 0  # a candidate that spills is skipped (None: the spills are only reported)

    def __init__(self, kernel: str):
        self.kernel = kernel

    def setup(self, batch: int, check_batch: int, dim: int, dtype, device) -> None:
        self.batch, self.dim = batch, dim
        self.xs, self.ys = _features(check_batch, dim, dtype, device, seed=1)
        self.x, self.y = _features(batch, dim, dtype, device)
        self.s = torch.tensor(CLIP_SCALE if self.kernel != "siglip" else SIGLIP_SCALE, device=device)
        self.bias = torch.tensor(SIGLIP_BIAS, device=device)
        self.lse = clip.clip_lse(self.x, self.y, self.s) if self.kernel == "tile" else None

    def check(self) -> tuple[bool, float]:
        return check(self.kernel, self.xs, self.ys)

    def run(self):
        return _call(self.kernel, self.x, self.y, self.s, self.bias, self.lse)

    def spills(self) -> int:
        return _spills(self.kernel)

    def flops(self) -> float:
        return FLOP_FACTOR[self.kernel] * self.batch * self.batch * self.dim


def sweep(kernel, dname, dim, batch, candidates, device, *, check_batch, deadline, log=print, workload=None):
    """Check and time each candidate; returns (rows, winner config or None). Restores ``config.TUNED``.
    ``workload``: what to check and time (default: :class:`BlockWorkload` of ``kernel``)."""
    dtype = DTYPES[dname]
    key = (config.arch(device), kernel, dname, config.d_bucket(dim))
    saved = config.TUNED.pop(key, None)
    work = workload if workload is not None else BlockWorkload(kernel)
    work.setup(batch, check_batch, dim, dtype, device)
    rows, best = [], None
    try:
        for cand in candidates:
            row = {
                "kernel": kernel,
                "dtype": dname,
                "dim": dim,
                "batch": batch,
                "config": cand.name(),
                "fields": dataclasses.asdict(cand),
            }
            if time.perf_counter() > deadline:
                rows.append({**row, "skipped": "time limit"})
                continue
            config.TUNED[key] = cand
            try:
                t0 = time.perf_counter()
                ok, worst = work.check()
                row.update(first_call_s=round(time.perf_counter() - t0, 2), error_vs_budget=round(worst, 4))
                spills = work.spills() if device.type == "cuda" else 0
                row["spill_stores"] = spills
                if work.max_spills is not None and spills > work.max_spills:
                    row["skipped"] = f"{spills} register spills"
                elif not ok:
                    row["skipped"] = f"outside the float64 error budget ({worst:.3g} x budget)"
                else:
                    ms = time_ms(work.run, device)
                    row.update(ms=round(ms, 4), tflops=round(work.flops() / ms / 1e9, 1))
                    if best is None or ms < best[0]:
                        best = (ms, cand)
            except Exception as exc:  # noqa: BLE001  (shared memory, registers, an unsupported variant)
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            finally:
                config.TUNED.pop(key, None)
            rows.append(row)
            log(json.dumps(row))
    finally:
        if saved is not None:
            config.TUNED[key] = saved
    return rows, (best[1] if best else None)


def tuned_snippet(winners: dict) -> str:
    """``TUNED = {...}`` as Python for kernels/config.py (keys: (arch, kernel, dtype, D bucket))."""
    lines = ["TUNED: dict[tuple[str, str, str, int], TileConfig] = {"]
    defaults = {f.name: f.default for f in dataclasses.fields(config.TileConfig)}
    for key, cfg in sorted(winners.items()):
        extra = [f"num_warps={cfg.num_warps}", f"num_stages={cfg.num_stages}"]
        extra += [f"{k}={v!r}" for k, v in dataclasses.asdict(cfg).items() if defaults[k] != v
                  and k not in ("block_m", "block_n", "block_k", "num_warps", "num_stages")]  # fmt: skip
        lines.append(
            f"    {key!r}: TileConfig({cfg.block_m}, {cfg.block_n}, {cfg.block_k}, {', '.join(extra)}),"
        )
    return "\n".join(lines + ["}"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32768)
    p.add_argument("--dims", type=int, nargs="+", default=[768])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bfloat16"])
    p.add_argument("--kernels", nargs="+", choices=config.KERNELS, default=list(config.KERNELS))
    p.add_argument("--max-seconds", type=float, default=280.0)
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--precompile", help=argparse.SUPPRESS)  # worker mode: a JSON list of jobs
    p.add_argument("--cap", type=int, default=90, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.precompile:
        return _precompile_worker(json.loads(args.precompile), args.cap)
    if not torch.cuda.is_available():
        raise SystemExit("fastclip.kernels.tune needs a CUDA GPU")
    dev = torch.device("cuda")
    start = time.perf_counter()
    major, minor = torch.cuda.get_device_capability(dev)
    jobs = [[k, dn, d, dataclasses.asdict(c)] for dn in args.dtypes for d in args.dims for k in args.kernels
            for c in config.AUTOTUNE_CANDIDATES[k]]  # fmt: skip
    for r in precompile(jobs, 10 * major + minor, args.workers, args.max_seconds / 3):
        print(json.dumps({"precompile": r}), flush=True)
    winners = {}
    for dn in args.dtypes:
        for d in args.dims:
            for k in args.kernels:
                _, best = sweep(k, dn, d, args.batch, config.AUTOTUNE_CANDIDATES[k], dev, check_batch=1024,
                                deadline=start + args.max_seconds, log=lambda m: print(m, flush=True))  # fmt: skip
                if best is not None:
                    winners[(config.arch(dev), k, dn, config.d_bucket(d))] = best
    print(tuned_snippet(winners), flush=True)


if __name__ == "__main__":
    main()
