"""Timing helpers and the facts a result file names: device, versions, the matmul rate of the run.

Times are CUDA-event intervals on GPU and ``time.perf_counter`` intervals on CPU (where every op is
synchronous). Each benchmark warms up first (compilation, autotuning, allocator growth).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch


def resolve_device(device: str | None) -> torch.device:
    """``"auto"``/None -> cuda when available, else cpu; otherwise ``torch.device(device)`` checked."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str):
        raise TypeError(
            f"device: expected a string such as 'cpu', 'cuda' or 'auto', got {type(device).__name__}"
        )
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda[:N]' or 'auto', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but torch.cuda.is_available() is False")
    return dev


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: torch.device) -> str:
    """E.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu: AMD EPYC (2 threads)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_model()} ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """Short lower-case tag for file names: ``cpu`` or e.g. ``h100``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for key in ("h200", "h100", "a100", "l40s", "l4", "a10", "v100", "b200", "4090", "3090"):
        if key in name:
            return key
    return "cuda"


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    try:
        import fastclip

        fastclip_version = fastclip.__version__
    except Exception:
        fastclip_version = None
    return {"torch": torch.__version__, "triton": triton_version, "fastclip": fastclip_version}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` calls after ``warmup`` calls (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(device: torch.device, dtype: torch.dtype | None = None, n: int | None = None) -> float:
    """Dense ``n×n @ n×n`` rate in TFLOP/s measured now (median of several): bf16 on GPU, fp32 on CPU.

    The yardstick for "fraction of the matmul rate": same device, same run, same moment.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    cuda = device.type == "cuda"
    seconds = median_seconds(lambda: a @ b, device, warmup=3 if cuda else 1, reps=20 if cuda else 5)
    return 2.0 * n**3 / seconds / 1e12


def gemm_tflops(
    device: torch.device, m: int, n: int, k: int, dtype: torch.dtype | None = None, reps: int | None = None
) -> float:
    """Rate of ``(m, k) @ (k, n)`` in TFLOP/s measured now (median): e.g. the B x B x D product of a
    loss at its own shape, beside the square ``matmul_tflops``. bf16 on GPU, fp32 on CPU by default."""
    for name, v in (("m", m), ("n", n), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    reps = reps or (10 if device.type == "cuda" else 3)
    seconds = median_seconds(lambda: a @ b, device, warmup=1, reps=reps)
    return 2.0 * m * n * k / seconds / 1e12


def gpu_clocks() -> dict[str, str] | None:
    """Name, SM/memory clocks (current and max), power limit and temperature from ``nvidia-smi``;
    None where it is not available."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    fields = "name,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.splitlines()[0]  # fmt: skip
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    return dict(zip(fields.split(","), (v.strip() for v in out.split(","))))


def time_iterations(
    fwd: Callable[[], Any],
    bwd: Callable[[Any], None],
    reset: Callable[[], None],
    device: torch.device,
    repeats: int,
) -> list[tuple[float, float, float]]:
    """``repeats`` × (forward ms, backward ms, forward+backward ms); ``reset()`` runs untimed before each."""
    out = []
    if device.type == "cuda":
        events = []
        for _ in range(repeats):
            reset()
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
            result = fwd()
            e[1].record()
            bwd(result)
            e[2].record()
            del result
            events.append(e)
        torch.cuda.synchronize(device)
        for e0, e1, e2 in events:
            out.append((e0.elapsed_time(e1), e1.elapsed_time(e2), e0.elapsed_time(e2)))
        return out
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        result = fwd()
        t1 = time.perf_counter()
        bwd(result)
        t2 = time.perf_counter()
        del result
        out.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3))
    return out


def available_cpu_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def num_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
