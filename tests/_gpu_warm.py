"""Compile the kernel variants of ``pytest -m gpu`` for one precision, as a separate process.

``python tests/_gpu_warm.py PRECISION`` (float32, float32-tf32, bfloat16, float16) makes the calls of
tests/test_gpu_kernels.py whose kernel variants need compiling (every block case, the loss level at
the size classes of the large tests) and ignores their results: Triton's on-disk cache then holds the
binaries, and the tests find them there. test_gpu_kernels.py starts one such process per precision,
in parallel (Triton compiles on one CPU core per process; about 100 variants at ~1.4 s each on the
H200 host take ~140 s in one process). ``start()`` launches them once per pytest session (the first
CUDA test of tests/test_autocast.py does, so they compile while the tests before test_gpu_kernels.py
run); ``wait()`` (test_gpu_kernels.py's module fixture) waits for them.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys

import torch

PRECISIONS = ("float32", "float32-tf32", "bfloat16", "float16")
_procs: list = []


def start() -> None:
    """Start the compile processes (once per session; no-op afterwards)."""
    if _procs:
        return
    script = os.path.abspath(__file__)
    for prec in PRECISIONS:
        _procs.append(
            subprocess.Popen(
                [sys.executable, script, prec], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        )
    atexit.register(_stop)


def wait(timeout: float = 300.0) -> list[str]:
    """Wait for the compile processes; returns the errors of those that failed (the tests then compile
    what is missing themselves, so a failure here is reported, not fatal)."""
    start()
    errors = []
    for proc in _procs:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            errors.append(f"{proc.args[-1]}: still compiling after {timeout:.0f} s, stopped")
            continue
        if proc.returncode != 0:
            errors.append(f"{proc.args[-1]}: exit {proc.returncode}\n{(err or '')[-2000:]}")
    return errors


def _stop() -> None:
    for proc in _procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(prec: str) -> None:
    import test_kernels as tk
    from utils import scalar

    import fastclip

    dtype = {"float32": torch.float32, "float32-tf32": torch.float32, "bfloat16": torch.bfloat16}.get(
        prec, torch.float16
    )
    matmul = torch.backends.cuda.matmul
    tf32 = prec == "float32-tf32"
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32" if tf32 else "ieee"
    else:
        matmul.allow_tf32 = tf32
    dev = "cuda"

    def quiet(fn, *args, **kw):
        try:
            fn(*args, **kw)
        except AssertionError:
            pass  # the tests report numbers; this process only compiles

    for case in tk.BLOCKS:
        quiet(tk._check_clip_block, *case, dtype, device=dev)
        quiet(tk._check_siglip_block, *case, dtype, device=dev)
        quiet(tk._check_siglip_block, *case, dtype, device=dev, need_grad=False, bias=None)
    # The loss level at the size classes of the large tests (sizes and strides divisible by 16; odd
    # batches with full-width row chunks; column panels at 65536).
    batches = [256] + ([16385, 65536] if dtype == torch.bfloat16 else [])
    for b in batches:  # values do not matter here: drawn on the device
        x, y = (
            torch.nn.functional.normalize(torch.randn(b, 768, device=dev), dim=-1).to(dtype).requires_grad_()
            for _ in range(2)
        )
        s, bias = scalar(30.0, device=dev), scalar(-10.0, device=dev)
        fastclip.clip_loss(x, y, s, impl="triton").backward()
        fastclip.siglip_loss(x, y, s, bias, impl="triton").backward()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1])
