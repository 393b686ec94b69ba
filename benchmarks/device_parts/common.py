"""What every part shares: the JSON record with its time limit, the device, sizes, TF32 switching and
guarded third-party imports (a missing or broken package is a "skipped: <reason>", never a crash)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)
# Sizes: (GPU, dry run on CPU).
SIZES = {
    "target": (([32768, 65536], 768), ([64, 128], 32)),
    "third_party": ((32768, 768), (64, 32)),
    "phases": ((32768, 768), (128, 32)),
    "million": ((2**20, 768), (256, 16)),
    "repeat": ((16387, 768), (130, 33)),
    "matmul": (8192, 256),
    "family": ((32768, 768), (64, 16)),  # issue 29's H200 targets are at B = 32768
    "distill": ((32768, 768), (64, 16)),
    "distill_check": ((2048, 768), (48, 16)),
}


def sizes(name: str, dry: bool):
    return SIZES[name][1 if dry else 0]


class Part:
    """Writes ``part_<name>.json`` after every step; knows how much of its time is left."""

    def __init__(self, name: str, out: str, seconds: float, dry: bool):
        self.name, self.out, self.dry = name, out, dry
        self.start = time.perf_counter()
        self.deadline = self.start + seconds
        self.data: dict = {"part": name, "dry_run": dry, "status": "running", "limit_s": seconds}
        self.save()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self, **update) -> None:
        self.data.update(update, seconds=round(time.perf_counter() - self.start, 2))
        path = os.path.join(self.out, f"part_{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(path + ".tmp", path)


def device(dry: bool):
    import torch

    if dry:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a machine without a GPU")
    return torch.device("cuda")


def error_text(exc: BaseException, n: int = 300) -> str:
    return f"{type(exc).__name__}: {exc}"[:n]


def optional_import(name: str):
    """``(module, "")`` or ``(None, "skipped: <reason>")``: any failure of a third-party import."""
    try:
        return importlib.import_module(name), ""
    except BaseException as exc:  # noqa: BLE001  (a broken package may raise anything, even SystemExit)
        if isinstance(exc, KeyboardInterrupt):
            raise
        return None, f"skipped: {name} does not import ({error_text(exc, 200)})"


def autocast(dev, enabled: bool = True):
    """bf16 autocast on CUDA (as open_clip's and sentence-transformers' training loops run their
    losses); CPU autocast in the dry run, so the same code path is exercised."""
    import torch

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(dev.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for fp32 matmuls through whichever precision API this torch has."""
    import torch

    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        old = m.fp32_precision
        m.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            m.fp32_precision = old
    else:
        old = m.allow_tf32
        m.allow_tf32 = enabled
        try:
            yield
        finally:
            m.allow_tf32 = old


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None
