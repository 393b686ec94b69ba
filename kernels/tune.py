"""Offline tuning of the tile configurations on a GPU: ``python -m fastclip.kernels.tune``.

For each (dtype, D bucket) asked for, times ``clip_lse`` ("lse"), ``clip_grad`` ("tile") and
``siglip_block`` ("siglip") with every entry of ``config.AUTOTUNE_CANDIDATES`` (and the current
table entry), skips candidates whose compiled kernel spills registers (``n_spills`` of the compiled
binary) or does not match the current configuration's result, and prints one JSON line per
(kernel, candidate) with the median time and TFLOP/s. The last line is the winners as ``config.TUNED``
entries keyed by (arch, kernel, dtype, D bucket): paste them into ``kernels/config.py`` (run-time
autotuning is off on purpose, see config.py). ``--max-seconds`` bounds the whole run (default 280).
Needs CUDA; not run under the interpreter.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from fastclip.kernels import clip, config, siglip

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# kernel key -> (Triton kernel whose binaries are checked for spills, FLOPs per B*B*D)
_KERNELS = {
    "lse": (clip._clip_lse_kernel, 2),
    "tile": (clip._clip_grad_kernel, 6),
    "siglip": (siglip._siglip_tile_kernel, 6),
}


def _problem(b: int, d: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=-1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=-1).to(dtype)
    return x, y, torch.tensor(30.0, device="cuda"), torch.tensor(-10.0, device="cuda")


def _call(kernel: str, x, y, s, bias, lse):
    coef = 1.0 / (2 * x.shape[0])
    if kernel == "lse":
        return clip.clip_lse(x, y, s)
    if kernel == "tile":
        return clip.clip_grad(x, y, s, *lse, coef, coef, 0, 2 * coef)
    return siglip.siglip_block(x, y, s, bias, 0, True)


def _max_spills(jit_fn) -> int:
    """Largest spill count over the binaries compiled so far for ``jit_fn`` on this device."""
    caches = getattr(jit_fn, "device_caches", {})
    spills = [getattr(k, "n_spills", 0) or 0 for cache in caches.values() for k in cache[0].values()]
    return max(spills, default=0)


def _matches(out, ref) -> bool:
    return all(
        torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3) for a, b in zip(out, ref) if a is not None
    )


def main(argv=None) -> None:
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32768)
    p.add_argument("--dims", type=int, nargs="+", default=[768])
    p.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["bfloat16"])
    p.add_argument("--kernels", nargs="+", choices=sorted(_KERNELS), default=sorted(_KERNELS))
    p.add_argument("--max-seconds", type=float, default=280.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fastclip.kernels.tune needs a CUDA GPU")
    dev = torch.device("cuda")
    arch = config.arch(dev)
    start = time.perf_counter()
    winners = {}
    for dname in args.dtypes:
        for dim in args.dims:
            x, y, s, bias = _problem(args.batch, dim, _DTYPES[dname])
            lse = clip.clip_lse(x, y, s)
            for kernel in args.kernels:
                key = (arch, kernel, dname, config.d_bucket(dim))
                jit_fn, flop_factor = _KERNELS[kernel]
                config.TUNED.pop(key, None)
                default = config.tile_config(kernel, dev, _DTYPES[dname], dim)
                ref = _call(kernel, x, y, s, bias, lse)
                best = None
                for cand in [default] + [c for c in config.AUTOTUNE_CANDIDATES if c != default]:
                    if time.perf_counter() - start > args.max_seconds:
                        print(json.dumps({"stopped": "max-seconds reached", "key": list(key)}), flush=True)
                        break
                    row = {"key": list(key), "config": cand.__dict__, "batch": args.batch}
                    config.TUNED[key] = cand
                    try:
                        out = _call(kernel, x, y, s, bias, lse)
                        torch.cuda.synchronize()
                        spills = _max_spills(jit_fn)
                        if spills:
                            row.update(skipped=f"{spills} register spills")
                        elif not _matches(out, ref):
                            row.update(skipped="result differs from the default configuration")
                        else:
                            fn = functools.partial(_call, kernel, x, y, s, bias, lse)
                            ms = triton.testing.do_bench(fn, quantiles=[0.5])
                            ms = ms[0] if isinstance(ms, (list, tuple)) else ms
                            row.update(ms=ms, tflops=flop_factor * args.batch**2 * dim / ms / 1e9)
                            if best is None or ms < best[0]:
                                best = (ms, cand)
                    except Exception as exc:  # a candidate may not fit (shared memory, registers)
                        row.update(error=f"{type(exc).__name__}: {exc}"[:200])
                    finally:
                        config.TUNED.pop(key, None)
                        for cache in getattr(jit_fn, "device_caches", {}).values():
                            cache[0].clear()  # spills are read per candidate
                    print(json.dumps(row), flush=True)
                if best is not None:
                    winners[key] = best[1]
    print("TUNED = " + repr({k: v for k, v in winners.items()}), flush=True)


if __name__ == "__main__":
    main()
