"""Peak *extra* memory of a callable: the most it holds at once beyond what existed when it started.

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  allocation at the start (the caching allocator's reserve is not counted).
* CPU: ``torch.profiler`` with ``profile_memory=True`` records every allocation and free of torch's
  CPU allocator as a ``[memory]`` event (size, time), including temporaries inside ops and inside
  Python autograd Functions; replaying them in time order gives the running total and its maximum.
  (Per-op "self memory" replayed by op end time over-counts when a Python autograd Function frees
  what its child ops allocated, and ru_maxrss/tracemalloc do not see torch's allocator reliably.)

Both count what the callable allocates and still holds at its peak, so for a loss forward+backward
they include the input gradients it produces (2·B·D elements) and exclude the inputs themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from typing import Any, Callable

import torch


@contextlib.contextmanager
def _quiet_fd2():
    """Silence file descriptor 2 (kineto prints 'profiler_start/stop' lines from C++)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. an embedded interpreter)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def replay_memory_events(events: list[tuple[float, int]]) -> tuple[int, int]:
    """``(peak, final)`` running total of ``(time, bytes)`` allocation (+) / free (-) events in time order."""
    total = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        total += nbytes
        peak = max(peak, total)
    return peak, total


def cpu_peak_extra_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` once under the profiler; return (peak extra bytes of CPU memory, fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_fd2():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_fd2():
            prof.stop()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="fastclip_mem_")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.remove(path)
    events = []
    for ev in trace.get("traceEvents", []):
        if ev.get("name") != "[memory]":
            continue
        args = ev.get("args", {})
        if args.get("Device Type", 0) != 0:  # 0 = CPU
            continue
        events.append((float(ev["ts"]), int(args.get("Bytes", 0))))
    peak, _ = replay_memory_events(events)
    return peak, out


def cuda_peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Run ``fn()`` once; return (peak bytes allocated on ``device`` above the start, fn's result)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base), out


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """Peak extra memory of one call of ``fn`` on ``device`` ("cpu" or "cuda")."""
    if device.type == "cuda":
        return cuda_peak_extra_bytes(fn, device)
    if device.type == "cpu":
        return cpu_peak_extra_bytes(fn)
    raise ValueError(f"device: expected a cpu or cuda device, got {device}")
