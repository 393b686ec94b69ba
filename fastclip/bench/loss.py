"""The loss benchmark: providers side by side over batch size, feature dim, dtype and loss.

For each configuration (loss, dtype, dim, batch) the same normalized random features go to every
provider; each provider gets warm-up iterations, then timed forward / backward / forward+backward
iterations (medians with min and max) and one measurement of its peak extra memory. Achieved
TFLOP/s count the FLOP floor of a fused forward+backward (docs/design.md): 8·B²·D for the softmax loss,
6·B²·D for the sigmoid loss. An out-of-memory case becomes a record with status "oom", any other
failure one with status "error" and the message; larger batches of the same series are then not run.
``max_seconds`` is checked between configurations and inside them (warm-ups and repetitions stop at the
limit once a sample exists; the record's message says how many repetitions ran).

(The inputs, and the cache that shares them between providers: ``fastclip.bench.inputs``.)
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastclip.bench import timing
from fastclip.bench.inputs import InputCache, make_inputs  # noqa: F401  (make_inputs: public here too)
from fastclip.bench.memory import peak_extra_bytes
from fastclip.bench.oom import cleanup, is_oom
from fastclip.bench.providers import LOSSES, PROVIDERS, Provider, get_provider
from fastclip.bench.report import REQUIRED_RECORD_KEYS, SHORT_DTYPE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# The results schema's required fields (fastclip/bench/report.py), then ours.
RECORD_FIELDS = (*REQUIRED_RECORD_KEYS, "matmul_frac", "repeats", "message", "kernel_path")
# Values open_clip models start from: CLIP scale 1/0.07 (already exponentiated); SigLIP scale 10, bias -10.
CLIP_SCALE = 1.0 / 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0
MATERIALIZED = ("reference", "open_clip")


def flop_floor(loss: str, batch: int, dim: int) -> int:
    """FLOPs of a fused forward+backward: 8·B²·D (softmax: 2 forward, 6 backward), 6·B²·D (sigmoid)."""
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    return (8 if loss == "clip" else 6) * batch * batch * dim


def canonical_dtype(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"dtype: expected a string such as 'float32' or 'bf16', got {type(name).__name__}")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)} (or fp32/bf16/fp16), got {name!r}")
    return name


@dataclass
class LossSweep:
    """What to run. ``max_batch`` caps the batch per provider (the providers whose cost grows fastest)."""

    providers: list[str]
    batches: list[int]
    dims: list[int]
    dtypes: list[str]
    losses: list[str]
    device: str = "auto"
    warmup: int = 1
    min_repeats: int = 1
    max_repeats: int = 5
    time_budget_s: float = 4.0  # per configuration and provider, for the timed repetitions
    max_seconds: float | None = None  # the whole sweep; what is left is not run
    max_batch: dict[str, int] = field(default_factory=dict)
    matmul_size: int | None = None  # n of the n×n matmul that measures the device's rate (None: default)

    def validate(self, extra_providers=()) -> None:
        known = tuple(PROVIDERS) + tuple(extra_providers)
        for p in self.providers:
            if p not in known:
                raise ValueError(f"providers: expected names from {known}, got {p!r}")
        for loss in self.losses:
            if loss not in LOSSES:
                raise ValueError(f"losses: expected names from {LOSSES}, got {loss!r}")
        for name, values in (("batches", self.batches), ("dims", self.dims)):
            if not values:
                raise ValueError(f"{name}: expected at least one positive int, got {values!r}")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name}: expected positive ints, got {v!r}")
        if not self.providers or not self.losses or not self.dtypes:
            raise ValueError("providers, losses and dtypes: expected at least one each")
        self.dtypes = [canonical_dtype(d) for d in self.dtypes]
        for name in ("warmup", "min_repeats", "max_repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup" else 1):
                raise ValueError(f"{name}: expected an int >= {0 if name == 'warmup' else 1}, got {v!r}")
        if self.max_repeats < self.min_repeats:
            raise ValueError(
                f"max_repeats: expected >= min_repeats ({self.min_repeats}), got {self.max_repeats}"
            )
        if not (self.time_budget_s > 0):
            raise ValueError(f"time_budget_s: expected a positive number, got {self.time_budget_s!r}")


def default_sweep(device: torch.device) -> LossSweep:
    """The built-in run of ``fastclip bench loss``.

    CPU: the CPU target's benchmark — fastclip-torch vs reference, B ∈ {4096, 8192, 16384}, D ∈ {256,
    512}, fp32, both losses; 2 to 5 timed iterations (2 at large B) so it ends in about five minutes on
    2 cores.
    GPU: the fused-kernel target set — bf16, D = 768, B from 4096 doubling to 1,048,576 for
    fastclip-triton (the others stop at 131072; the materialized ones run out of memory before).
    """
    if device.type == "cuda":
        return LossSweep(
            providers=list(PROVIDERS),
            batches=[2**k for k in range(12, 21)],
            dims=[768],
            dtypes=["bfloat16"],
            losses=list(LOSSES),
            device=str(device),
            warmup=2,
            min_repeats=1,
            max_repeats=10,
            time_budget_s=2.0,
            max_seconds=260.0,
            max_batch={"fastclip-torch": 2**17, "reference": 2**17, "open_clip": 2**17, "inf_cl": 2**17},
        )
    return LossSweep(
        providers=["fastclip-torch", "reference"],
        batches=[4096, 8192, 16384],
        dims=[256, 512],
        dtypes=["float32"],
        losses=list(LOSSES),
        device=str(device),
        warmup=0,  # the profiled (memory) iteration, which runs first on CPU, is the warm-up
        min_repeats=2,
        max_repeats=5,
        time_budget_s=4.0,
    )


def _estimated_bytes(provider: str, batch: int, dim: int, dtype: torch.dtype) -> int:
    """A rough upper estimate of peak extra memory, used on CPU to refuse runs that cannot fit."""
    elt = torch.empty((), dtype=dtype).element_size()
    if provider in MATERIALIZED:
        return 6 * batch * batch * max(elt, 4)
    return 64 * 2**20 + 8 * batch * dim * 4


def _record(loss, provider, batch, dim, dtype_name, status, message="") -> dict:
    rec = {k: None for k in RECORD_FIELDS}
    rec.update(
        loss=loss, provider=provider, batch=batch, dim=dim, dtype=dtype_name, status=status, message=message
    )
    return rec


class ProviderRun:
    """One provider on one configuration: :meth:`prepare` (warm-up, memory, number of repetitions),
    timed iterations (:meth:`time_once` or :meth:`time_all`), then :meth:`record`."""

    def __init__(
        self,
        fn: Callable,
        provider: str,
        loss: str,
        x,
        y,
        device,
        cfg: LossSweep,
        matmul_tflops=None,
        deadline: float | None = None,
    ):
        self.fn, self.provider, self.loss, self.x, self.y = fn, provider, loss, x, y
        self.device, self.cfg, self.matmul_tflops = device, cfg, matmul_tflops
        self.deadline = deadline  # time.perf_counter() value after which no iteration starts
        self.cut_short = False
        s_val, b_val = (CLIP_SCALE, 0.0) if loss == "clip" else (SIGLIP_SCALE, SIGLIP_BIAS)
        self.scale = torch.tensor(s_val, device=device, requires_grad=True)
        self.bias = torch.tensor(b_val, device=device, requires_grad=True)
        self.repeats = cfg.min_repeats
        self.peak: int | None = None
        self.samples: list[tuple[float, float, float]] = []

    def reset(self) -> None:
        for t in (self.x, self.y, self.scale, self.bias):
            t.grad = None

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()

    def fwd(self):
        return self.fn(self.loss, self.x, self.y, self.scale, self.bias)

    @staticmethod
    def bwd(out) -> None:
        out.backward()

    def prepare(self) -> None:
        cfg, device = self.cfg, self.device
        # Warm-up: compilation, autotuning, allocator growth. One long iteration is warm-up enough.
        t_iter = None
        for i in range(cfg.warmup):
            if i > 0 and t_iter is not None and self.time_left() < t_iter:
                break  # one warm-up is done; the time limit would not allow another
            self.reset()
            t0 = time.perf_counter()
            self.bwd(self.fwd())
            timing.synchronize(device)
            t_iter = time.perf_counter() - t0
            if t_iter > cfg.time_budget_s:
                break
        if device.type == "cpu":
            # The profiler's bookkeeping slows the iteration a little, so memory gets its own run.
            self.reset()  # frees the last gradients outside the measured window
            t0 = time.perf_counter()
            self.peak, _ = peak_extra_bytes(lambda: self.bwd(self.fwd()), device)
            dt = time.perf_counter() - t0
            t_iter = dt if t_iter is None else min(t_iter, dt)
        if t_iter is not None and t_iter > 0:
            self.repeats = max(cfg.min_repeats, min(cfg.max_repeats, int(cfg.time_budget_s / t_iter)))
            # The sweep's time limit holds inside a configuration too: no more repetitions than fit.
            fit = int(self.time_left() / t_iter) if self.deadline is not None else self.repeats
            if fit < self.repeats:
                self.repeats, self.cut_short = max(1, fit), True
        self.reset()

    def time_once(self) -> None:
        """One timed iteration (CPU: the sweep interleaves the providers' iterations); none once the
        time limit has passed and at least one sample exists."""
        if self.samples and self.time_left() <= 0:
            self.cut_short = True
            return
        self.samples += timing.time_iterations(self.fwd, self.bwd, self.reset, self.device, 1)
        self.reset()

    def _timed_repeats(self) -> list:
        if self.deadline is None:
            return timing.time_iterations(self.fwd, self.bwd, self.reset, self.device, self.repeats)
        out = []  # one at a time (each synchronized), so the limit is checked between iterations
        while len(out) < self.repeats:
            if out and self.time_left() <= 0:
                self.cut_short = True
                break
            out += timing.time_iterations(self.fwd, self.bwd, self.reset, self.device, 1)
        return out

    def time_all(self) -> None:
        """All timed iterations in a row; on CUDA they also give the peak memory (statistics are free).
        The last warm-up's gradients are freed first so that each iteration allocates its own, as on CPU."""
        self.reset()
        run = self._timed_repeats
        if self.device.type == "cuda":
            self.peak, samples = peak_extra_bytes(run, self.device)
        else:
            samples = run()
        self.samples += samples
        self.reset()

    def record(self) -> dict:
        batch, dim = self.x.shape
        total = [s[2] for s in self.samples]
        fwd_bwd_ms = statistics.median(total)
        tflops = flop_floor(self.loss, batch, dim) / (fwd_bwd_ms * 1e-3) / 1e12
        rec = _record(self.loss, self.provider, batch, dim, DTYPE_NAMES[self.x.dtype], "ok")
        rec.update(
            fwd_ms=_sig(statistics.median(s[0] for s in self.samples)),
            bwd_ms=_sig(statistics.median(s[1] for s in self.samples)),
            fwd_bwd_ms=_sig(fwd_bwd_ms),
            fwd_bwd_ms_min=_sig(min(total)),
            fwd_bwd_ms_max=_sig(max(total)),
            peak_mem_bytes=int(self.peak) if self.peak is not None else None,
            tflops=_sig(tflops),
            matmul_frac=_sig(tflops / self.matmul_tflops) if self.matmul_tflops else None,
            repeats=len(self.samples),
            kernel_path=kernel_path(self.provider, self.x.dtype, self.device),
        )
        if self.cut_short:
            rec["message"] = f"time limit: {len(self.samples)} of {self.repeats} planned repetitions"
        return rec


def kernel_path(provider: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """What the fused kernels' products ran on (fastclip-triton on CUDA): "tensor-core-bf16",
    "tf32" or "fp32-fma" (fp32 with TF32 off, PyTorch's default), plus the GEMM path of the
    gradients; None for other providers."""
    if provider != "fastclip-triton" or device.type != "cuda":
        return None
    from fastclip.kernels import common, gemm

    return f"{common.dot_path(dtype)}; gemm {gemm.gemm_path(device, dtype)}"


def bench_one(fn, loss, x, y, device, cfg: LossSweep, matmul_tflops=None, provider: str = "") -> dict:
    """Benchmark ``fn(loss, x, y, scale, bias)`` forward+backward alone; returns one record."""
    run = ProviderRun(fn, provider, loss, x, y, device, cfg, matmul_tflops)
    run.prepare()
    run.time_all()
    return run.record()


def _sig(v: float, digits: int = 6) -> float:
    """``v`` to ``digits`` significant digits (short JSON without losing small values)."""
    return float(f"{v:.{digits}g}")


def _configs(cfg: LossSweep) -> list[tuple[str, str, int, int, str]]:
    # Batch outside the loss: a time limit then cuts the largest batches of both losses, and the
    # features of one (batch, dim, dtype) serve both losses.
    out = []
    for dtype_name in cfg.dtypes:
        for dim in cfg.dims:
            for batch in sorted(set(cfg.batches)):
                for loss in cfg.losses:
                    for p in cfg.providers:
                        if batch <= cfg.max_batch.get(p, math.inf):
                            out.append((loss, dtype_name, dim, batch, p))
    return out


def run_loss_sweep(
    cfg: LossSweep,
    progress: bool = True,
    log: Callable[[str], None] = print,
    extra_providers: dict[str, Provider] | None = None,
) -> dict:
    """Run the sweep; returns the result document ``{"device", "torch", "triton", "fastclip", "date",
    "matmul_tflops", "records"}`` (records in sweep order).

    The providers of one configuration run on the same inputs. On CPU their timed iterations are
    interleaved (A, B, A, B, ...) so that a machine shared with other work slows them alike; on GPU
    each provider's iterations run back to back (the device is not shared, and CUDA's peak-memory
    statistics then cover one provider at a time).

    ``extra_providers`` maps further names (listed in ``cfg.providers``) to :class:`Provider` objects,
    e.g. a variant under development; names from :data:`PROVIDERS` are looked up as usual.
    """
    extra_providers = dict(extra_providers or {})
    cfg.validate(extra_providers)
    device = timing.resolve_device(cfg.device)
    fns = {}
    for name in cfg.providers:
        if name in extra_providers:
            prov, reason = extra_providers[name], ""
        else:
            prov, reason = get_provider(name, device)
        if prov is None:
            log(f"skipping provider {name}: {reason}")
            continue
        fns[name] = prov
    mm = timing.matmul_tflops(device, n=cfg.matmul_size)
    mm_dtype = "bf16" if device.type == "cuda" else "fp32"
    log(f"device: {timing.device_description(device)}; {mm_dtype} matmul rate {mm:.3f} TFLOP/s")
    doc = {
        "device": timing.device_description(device),
        **timing.versions(),
        "date": timing.utc_now(),
        "matmul_tflops": _sig(mm),
        "records": [],
    }
    todo = [c for c in _configs(cfg) if c[4] in fns and c[0] in fns[c[4]].losses]
    groups: dict[tuple, list[str]] = {}
    for loss, dtype_name, dim, batch, pname in todo:
        groups.setdefault((loss, dtype_name, dim, batch), []).append(pname)
    failed_at: dict[tuple, tuple[int, str]] = {}  # series -> (batch, status) of its first failure
    start = time.perf_counter()
    inputs = InputCache(device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="bench loss", unit="run", dynamic_ncols=True)
    try:
        for key, names in groups.items():
            if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
                log(
                    f"time limit of {cfg.max_seconds:.0f} s reached: {len(todo) - len(doc['records'])} runs not done"
                )
                break
            loss, dtype_name, dim, batch = key
            if bar is not None:
                bar.set_postfix_str(f"{loss} {SHORT_DTYPE[dtype_name]} D={dim} B={batch}")
            deadline = None if cfg.max_seconds is None else start + cfg.max_seconds
            recs = _run_group(key, names, fns, device, cfg, mm, inputs, failed_at, deadline)
            for rec in recs:
                if rec["status"] != "ok":
                    failed_at.setdefault((loss, dtype_name, dim, rec["provider"]), (batch, rec["status"]))
            doc["records"].extend(recs)
            if bar is not None:
                bar.update(len(names))
    except KeyboardInterrupt:  # e.g. a time limit's SIGINT: keep what is done
        log(f"interrupted: {len(todo) - len(doc['records'])} runs not done")
    finally:
        if bar is not None:
            bar.close()
        inputs.drop()
    return doc


def _guarded(call: Callable[[], None], device: torch.device) -> tuple[str, str] | None:
    """Run ``call()``; None when it worked, else ("oom" | "error", message). Never raises."""
    try:
        call()
        return None
    except Exception as exc:  # recorded, never raised: one failure must not end the sweep
        status = "oom" if is_oom(exc) else "error"
        text = str(exc).strip()
        failure = (status, f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300])
    # Out of the except block the traceback, and the tensors its frames hold, are gone.
    cleanup(device)
    return failure


def _run_group(key, names, fns, device, cfg, mm, inputs, failed_at, deadline=None) -> list[dict]:
    """All providers of one (loss, dtype, dim, batch); one record each, in ``names`` order.
    ``deadline`` (a ``time.perf_counter()`` value): no iteration starts after it once every provider
    has one timed sample; providers whose warm-up would start after it are left out."""
    loss, dtype_name, dim, batch = key
    dtype = DTYPES[dtype_name]
    out: dict[str, dict] = {}
    runs: dict[str, ProviderRun] = {}
    for pname in names:
        if (loss, dtype_name, dim, pname) in failed_at:
            b0, st = failed_at[(loss, dtype_name, dim, pname)]
            out[pname] = _record(loss, pname, batch, dim, dtype_name, st, f"not run: {st} at B={b0}")
            continue
        avail = timing.available_cpu_bytes() if device.type == "cpu" else None
        need = _estimated_bytes(pname, batch, dim, dtype)
        if avail is not None and need > 0.9 * avail:
            msg = f"not run: needs about {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            out[pname] = _record(loss, pname, batch, dim, dtype_name, "oom", msg)
            continue
        runs[pname] = None  # to run
    if runs:
        holder = {}
        failure = _guarded(lambda: holder.update(xy=inputs.get(batch, dim, dtype)), device)
        if failure is not None:
            inputs.drop()
            for pname in runs:
                out[pname] = _record(loss, pname, batch, dim, dtype_name, *failure)
            runs = {}
        else:
            x, y = holder.pop("xy")
            for pname in runs:
                runs[pname] = ProviderRun(fns[pname].fn, pname, loss, x, y, device, cfg, mm, deadline)
            del x, y

    def fail(pname, failure):
        out[pname] = _record(loss, pname, batch, dim, dtype_name, *failure)
        runs.pop(pname).reset()
        cleanup(device)

    for pname in list(runs):
        if deadline is not None and time.perf_counter() > deadline:
            runs.pop(pname).reset()  # not started: no record, as for configurations after the limit
            continue
        failure = _guarded(runs[pname].prepare, device)
        if failure is not None:
            fail(pname, failure)
    if device.type == "cpu":
        for r in range(max((run.repeats for run in runs.values()), default=0)):
            for pname in list(runs):
                if r < runs[pname].repeats:
                    failure = _guarded(runs[pname].time_once, device)
                    if failure is not None:
                        fail(pname, failure)
    else:
        for pname in list(runs):
            failure = _guarded(runs[pname].time_all, device)
            if failure is not None:
                fail(pname, failure)
    for pname, run in runs.items():
        out[pname] = run.record()
    runs.clear()
    return [out[p] for p in names if p in out]
