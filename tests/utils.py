"""Helpers shared by the tests: inputs, float64 comparisons with error budgets, open_clip's loss module."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

# Budget for fused results against float64, relative to the reference computed in the same dtype:
# err(fused) <= BUDGET_FACTOR * err(reference same dtype) + ABS_FLOOR[dtype].
BUDGET_FACTOR = 2.0
ABS_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def features(n, d, dtype=torch.float32, seed=0, requires_grad=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return t.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def scalar(value, dtype=torch.float32, requires_grad=True, device="cpu"):
    return torch.tensor(float(value), dtype=dtype, device=device, requires_grad=requires_grad)


def loss_and_grads(fn, x, y, s, b, **kw):
    """Loss and the gradients of (x, y, s, b) (None where an input does not require grad)."""
    loss = fn(x, y, s, b, **kw) if b is not None else fn(x, y, s, **kw)
    inputs = [t for t in (x, y, s, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    it = iter(grads)
    out = [next(it) if (t is not None and t.requires_grad) else None for t in (x, y, s, b)]
    return loss, out


def max_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, tuple]:
    diff = (a.detach().double() - b.detach().double()).abs()
    flat = int(diff.argmax()) if diff.numel() else 0
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.dim() else ()
    return (float(diff.max()) if diff.numel() else 0.0), where


def assert_within_budget(name, got, ref_same_dtype, truth, dtype):
    """``|got - truth| <= 2 * |ref_same_dtype - truth| + floor``, elementwise maximum; prints where it failed."""
    err, where = max_err(got, truth)
    ref_err, _ = max_err(ref_same_dtype, truth)
    scale = float(truth.detach().double().abs().max()) if truth.numel() else 1.0
    budget = BUDGET_FACTOR * ref_err + ABS_FLOOR[dtype] * max(1.0, scale)
    assert err <= budget, (
        f"{name} ({dtype}): max |diff| {err:.3e} at {where} exceeds budget {budget:.3e} "
        f"(reference in the same dtype: {ref_err:.3e})"
    )


def load_open_clip_loss():
    """open_clip's ``loss.py`` as a module (None when open_clip_torch is not installed); see
    ``fastclip.bench.providers.load_open_clip_loss``."""
    from fastclip.bench.providers import load_open_clip_loss as load

    return load()


class LargestOutput(TorchDispatchMode):
    """Records the numel of the largest tensor any ATen op returns inside the ``with`` block: the
    memory tests' instrument (it sees the B×B matrix of a materialized loss)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _fresh_env(**extra) -> dict:
    """This environment, one thread, without a launcher's rendezvous variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def train_cli(args, timeout=300) -> subprocess.CompletedProcess:
    """``fastclip train ARGS`` in a fresh process, one thread, without a launcher's environment."""
    cmd = [sys.executable, "-m", "fastclip.cli", "train", *args]
    return subprocess.run(cmd, env=_fresh_env(), capture_output=True, text=True, timeout=timeout)


def torchrun_two(script: str, *args, timeout=300, **env) -> subprocess.CompletedProcess:
    """``script ARGS`` on 2 local ranks (``torch.distributed.run --standalone``), one thread each."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        script,
        *args,
    ]
    return subprocess.run(cmd, env=_fresh_env(**env), capture_output=True, text=True, timeout=timeout)
