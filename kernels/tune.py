"""Offline tuning of the tile configurations on a GPU: ``python -m fastclip.kernels.tune``.

Times ``clip_lse``, ``clip_grad`` and ``siglip_block`` for every entry of
``config.AUTOTUNE_CANDIDATES`` (plus the current table entry) at one problem size, checks each result
against the current configuration, and prints one JSON line per (kernel, candidate) with the median
time in ms and TFLOP/s. Copy the winners into ``config._CONFIGS`` (run-time autotuning is off on
purpose: see config.py). Needs CUDA; not run under the interpreter.
"""

from __future__ import annotations

import argparse
import json

import torch
from fastclip.kernels import clip, config, siglip

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _problem(b: int, d: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=-1).to(dtype)
    y = torch.nn.functional.normalize(torch.randn(b, d, device="cuda", generator=g), dim=-1).to(dtype)
    return x, y, torch.tensor(30.0, device="cuda"), torch.tensor(-10.0, device="cuda")


def _runs(x, y, s, bias, lse):
    coef = 1.0 / (2 * x.shape[0])
    return {
        "clip_lse": (lambda: clip.clip_lse(x, y, s), 2),
        "clip_grad": (lambda: clip.clip_grad(x, y, s, *lse, coef, coef, 0, 2 * coef), 6),
        "siglip_block": (lambda: siglip.siglip_block(x, y, s, bias, 0, True), 6),
    }


def main(argv=None) -> None:
    import triton.testing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32768)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("fastclip.kernels.tune needs a CUDA GPU")
    dev = torch.device("cuda")
    x, y, s, bias = _problem(args.batch, args.dim, _DTYPES[args.dtype])
    lse = clip.clip_lse(x, y, s)
    reference = {name: fn() for name, (fn, _) in _runs(x, y, s, bias, lse).items()}
    table = config._CONFIGS[config.arch(dev)]
    saved = dict(table)
    candidates = [saved["tile"]] + list(config.AUTOTUNE_CANDIDATES)
    try:
        for cand in candidates:
            table["lse"] = table["tile"] = cand
            for name, (fn, flop_factor) in _runs(x, y, s, bias, lse).items():
                row = {"kernel": name, "config": cand.__dict__, "batch": args.batch, "dim": args.dim}
                row.update(dtype=args.dtype, device=torch.cuda.get_device_name(dev))
                try:
                    out = fn()
                    ok = all(
                        torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3)
                        for a, b in zip(out, reference[name])
                        if a is not None
                    )
                    ms = triton.testing.do_bench(fn, quantiles=[0.5])
                    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
                    flops = flop_factor * args.batch * args.batch * args.dim
                    row.update(ms=ms, tflops=flops / ms / 1e9, matches=ok)
                except Exception as exc:  # a candidate may not fit (shared memory, registers)
                    row.update(error=f"{type(exc).__name__}: {exc}"[:200])
                print(json.dumps(row), flush=True)
    finally:
        table.update(saved)


if __name__ == "__main__":
    main()
