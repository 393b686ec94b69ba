"""The training-step benchmark: one optimizer step of a named model on synthetic data.

Measures, for a model from :func:`fastclip.create_model`:

* samples/s and peak memory of one step (forward, loss, backward, AdamW step) with the fastclip loss
  (``impl="auto"``: Triton on CUDA, chunked torch on CPU) and with the materialized reference loss;
* the largest global batch that fits, without and with gradient caching (GradCache,
  ``fastclip.train.gradcache``): batches double until a step fails, then bisect.

"Fits" means: on CUDA, the step runs without running out of device memory; on CPU (where running out
of memory would stall the machine rather than raise) the step's memory — parameters, optimizer state,
inputs and the step's peak extra memory — stays under ``--mem-cap``. The search also stops at
``--max-batch`` and after ``--search-seconds``; the record says which limit ended it.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastclip.bench import timing
from fastclip.bench.memory import peak_extra_bytes
from fastclip.bench.oom import cleanup, is_oom

LOSS_IMPLS = ("fastclip", "reference")


@dataclass
class TrainBench:
    model: str
    device: str = "auto"
    batch: int = 256
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; parameters stay fp32)
    warmup: int = 1
    steps: int = 3
    micro_batch: int = 64  # gradient caching: samples per forward/backward chunk
    mem_cap_bytes: int | None = None  # CPU: the budget that decides "fits"
    start_batch: int = 64
    max_batch: int = 2**16
    search_seconds: float = 60.0
    find_max_batch: bool = True
    loss_impls: list[str] = field(default_factory=lambda: list(LOSS_IMPLS))
    seed: int = 0

    @property
    def image_dtype(self) -> torch.dtype:
        """Images are made in the compute dtype: bf16 under bf16 autocast (half the input memory)."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def validate(self) -> None:
        for name in ("batch", "steps", "micro_batch", "start_batch", "max_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0, got {self.warmup!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: expected 'fp32' or 'bf16', got {self.precision!r}")
        for impl in self.loss_impls:
            if impl not in LOSS_IMPLS:
                raise ValueError(f"loss_impls: expected names from {LOSS_IMPLS}, got {impl!r}")
        if self.mem_cap_bytes is not None and self.mem_cap_bytes <= 0:
            raise ValueError(
                f"mem_cap_bytes: expected a positive number of bytes, got {self.mem_cap_bytes!r}"
            )
        if not self.search_seconds > 0:
            raise ValueError(f"search_seconds: expected a positive number, got {self.search_seconds!r}")


def default_train_bench(device: torch.device) -> TrainBench:
    """CPU: the "tiny" model, fp32, batch 128, a 512 MiB memory cap and batches up to 8192 for the
    search (minutes on 2 cores; a smoke-level figure). GPU: ViT-B-16 with bf16 autocast."""
    if device.type == "cuda":
        return TrainBench(model="ViT-B-16", device=str(device), batch=256, precision="bf16", warmup=2, steps=5,
                          micro_batch=256, start_batch=256, max_batch=2**17, search_seconds=30.0)  # fmt: skip
    return TrainBench(model="tiny", device=str(device), batch=128, precision="fp32", warmup=1, steps=3,
                      micro_batch=128, mem_cap_bytes=2**29, start_batch=128, max_batch=2**13,
                      search_seconds=40.0)  # fmt: skip


# The largest-batch searches: (loss, gradient caching). With caching, activations stop growing with the
# batch and the loss's own memory decides: that is where the fused loss and the reference part ways.
SEARCHES = (("fastclip", False), ("fastclip", True), ("reference", True))


# ------------------------------------------------------------------------------------------------
# model, data, steps


def build(name: str, device: torch.device, seed: int = 0):
    """``(model, optimizer)`` for a named config; clear errors when the model API is not there."""
    from fastclip.models import create_model, list_models

    if name not in list_models():
        raise ValueError(f"model: expected one of {list_models()}, got {name!r}")
    torch.manual_seed(seed)
    model = create_model(name).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    return model, optimizer


def synthetic_batch(model, batch: int, device: torch.device, seed: int = 0, dtype=torch.float32):
    """Random images (B, C, H, W) in ``dtype`` and token ids (B, T), of the sizes the model's config
    asks for, generated on ``device`` (the whole global batch lives there, as in a GradCache step)."""
    v, t = model.config.vision, model.config.text
    g = torch.Generator(device=device).manual_seed(seed)
    images = torch.randn(
        batch, v.in_channels, v.image_size, v.image_size, generator=g, device=device, dtype=dtype
    )
    texts = torch.randint(1, t.vocab_size, (batch, t.context_length), generator=g, device=device)
    return images, texts


def make_loss(model, impl: str):
    from fastclip import ClipLoss, SigLipLoss

    cls = SigLipLoss if model.is_siglip else ClipLoss
    return cls(impl="auto" if impl == "fastclip" else "reference")


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def plain_step(model, optimizer, loss_fn, device, precision) -> Callable:
    """One ordinary step: forward of the whole batch, loss, backward, optimizer step."""

    def step(images, texts):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            out = model(images, texts)
            loss = loss_fn(**out)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def gradcache_step(model, optimizer, loss_fn, device, precision, micro_batch: int) -> Callable:
    """One step with gradient caching (``fastclip.train.gradcache.gradcache_step``), ``micro_batch``
    samples per forward/backward chunk, then the optimizer step."""
    from fastclip.train.gradcache import gradcache_step as cached_step

    def step(images, texts):
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = cached_step(model, loss_fn, images, texts, micro_batch)
        optimizer.step()
        return loss.detach()

    return step


def state_bytes(model, optimizer) -> int:
    """Parameters plus optimizer state (the memory a step starts from besides its inputs)."""
    n = sum(p.numel() * p.element_size() for p in model.parameters())
    for st in optimizer.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    return n


def measure_step(step, model, batch, device, warmup, steps, seed=0, image_dtype=torch.float32) -> dict:
    """Warm up, then time ``steps`` steps; the peak extra memory of one step (inputs excluded)."""
    images, texts = synthetic_batch(model, batch, device, seed, image_dtype)
    for _ in range(warmup):
        step(images, texts)
    timing.synchronize(device)
    gc.collect()
    peak, _ = peak_extra_bytes(lambda: step(images, texts), device)
    times = []
    for _ in range(steps):
        timing.synchronize(device)
        t0 = time.perf_counter()
        loss = step(images, texts)
        timing.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    return {
        "step_ms": float(f"{ms:.6g}"),
        "step_ms_min": float(f"{min(times):.6g}"),
        "step_ms_max": float(f"{max(times):.6g}"),
        "samples_per_s": float(f"{batch / (ms * 1e-3):.6g}"),
        "peak_mem_bytes": int(peak),
        "loss": float(loss),
    }


def fits(
    step, model, optimizer, batch, device, mem_cap, image_dtype=torch.float32
) -> tuple[bool, int | None, str]:
    """Run one step at ``batch``: (fits, memory used, message). Memory: CUDA peak allocated; CPU model
    state + inputs + step peak (measured), compared with ``mem_cap``."""
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            images, texts = synthetic_batch(model, batch, device, dtype=image_dtype)
            step(images, texts)
            torch.cuda.synchronize(device)
            used = torch.cuda.max_memory_allocated(device)
            return True, used, ""

        def run():
            images, texts = synthetic_batch(model, batch, device, dtype=image_dtype)
            step(images, texts)

        base = state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        peak, _ = peak_extra_bytes(run, device)
        used = base + peak
        if mem_cap is not None and used > mem_cap:
            return False, used, f"needs {used / 2**20:.0f} MiB > cap {mem_cap / 2**20:.0f} MiB"
        return True, used, ""
    except Exception as exc:
        if not is_oom(exc):
            raise
        msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    cleanup(device)
    optimizer.zero_grad(set_to_none=True)
    return False, None, msg


def find_max_batch(step, model, optimizer, device, cfg: TrainBench, granule: int = 1, log=print) -> dict:
    """Double from ``cfg.start_batch`` until a step does not fit, then bisect to 1/8 of the last fit
    (in multiples of ``granule``)."""
    start = time.perf_counter()
    tried = []

    def attempt(b):
        t0 = time.perf_counter()
        ok, used, msg = fits(step, model, optimizer, b, device, cfg.mem_cap_bytes, cfg.image_dtype)
        tried.append({"batch": b, "fits": ok, "mem_bytes": used, "step_seconds": round(time.perf_counter() - t0, 3),
                      **({"message": msg} if msg else {})})  # fmt: skip
        log(f"  batch {b}: {'fits' if ok else 'does not fit'}" + (f" ({used / 2**20:.0f} MiB)" if used else "")
            + (f" {msg}" if msg else ""))  # fmt: skip
        cleanup(device)
        return ok

    def out_of_time(next_factor: float = 0.0):
        # The next attempt costs about next_factor times the last one (a doubled batch: about 2x).
        last = tried[-1]["step_seconds"] if tried else 0.0
        return time.perf_counter() - start + next_factor * last > cfg.search_seconds

    b = max(granule, cfg.start_batch - cfg.start_batch % granule)
    lo, hi, limit = 0, None, None
    while True:
        if b > cfg.max_batch:
            limit = f"max_batch cap {cfg.max_batch}"
            break
        if not attempt(b):
            hi = b
            break
        lo = b
        if out_of_time(2.2):
            limit = f"time cap {cfg.search_seconds:.0f} s"
            break
        b *= 2
    if hi is not None and lo > 0:
        while hi - lo > max(granule, lo // 8) and not out_of_time(1.5):
            mid = (lo + hi) // 2
            mid -= mid % granule
            if mid <= lo:
                break
            if attempt(mid):
                lo = mid
            else:
                hi = mid
        limit = "memory" if cfg.mem_cap_bytes is None or device.type == "cuda" else (
            f"memory cap {cfg.mem_cap_bytes / 2**20:.0f} MiB")  # fmt: skip
    elif hi is not None:
        limit = "memory: even the first batch does not fit"
    return {"max_batch": lo, "first_failing": hi, "limit": limit, "tried": tried}


# ------------------------------------------------------------------------------------------------
# the run


def run_train_bench(cfg: TrainBench, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns ``{"device", "torch", "triton", "fastclip", "date", "model", ...,
    "records": [...], "max_batch": [...]}``."""
    cfg.validate()
    device = timing.resolve_device(cfg.device)
    if device.type == "cuda":
        # Triton launches on the *current* CUDA device: with --device cuda:N (N > 0) the loss kernels
        # would run on device 0 with pointers into device N, so device N is made current for the run.
        with torch.cuda.device(device):
            return _run_train_bench(cfg, device, log)
    return _run_train_bench(cfg, device, log)


def _run_train_bench(cfg: TrainBench, device: torch.device, log: Callable[[str], None]) -> dict:
    model, optimizer = build(cfg.model, device, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    doc = {
        "device": timing.device_description(device),
        **timing.versions(),
        "date": timing.utc_now(),
        "model": cfg.model,
        "params": n_params,
        "precision": cfg.precision,
        "optimizer": "AdamW",
        "records": [],
        "max_batch": [],
    }
    log(f"model {cfg.model} ({n_params / 1e6:.1f} M parameters) on {doc['device']}, {cfg.precision}")
    for impl in cfg.loss_impls:
        rec = {"model": cfg.model, "loss_impl": impl, "batch": cfg.batch, "grad_cache": False}
        try:
            step = plain_step(model, optimizer, make_loss(model, impl), device, cfg.precision)
            rec.update(
                measure_step(
                    step, model, cfg.batch, device, cfg.warmup, cfg.steps, cfg.seed, cfg.image_dtype
                ),
                status="ok",
            )
        except Exception as exc:
            rec.update(status="oom" if is_oom(exc) else "error", message=f"{type(exc).__name__}: {exc}"[:300])
        optimizer.zero_grad(set_to_none=True)
        cleanup(device)
        doc["records"].append(rec)
        log(f"{impl} loss: " + (f"{rec['samples_per_s']:.1f} samples/s, step {rec['step_ms']:.1f} ms, peak "
            f"{rec['peak_mem_bytes'] / 2**20:.1f} MiB" if rec["status"] == "ok" else rec["message"]))  # fmt: skip
    if cfg.find_max_batch:
        for impl, cached in SEARCHES:
            if impl not in cfg.loss_impls:
                continue
            entry = {
                "loss_impl": impl,
                "grad_cache": cached,
                "micro_batch": cfg.micro_batch if cached else None,
            }
            log(f"largest batch, {impl} loss, {'with' if cached else 'without'} gradient caching:")
            loss_fn = make_loss(model, impl)
            try:
                if cached:
                    step = gradcache_step(model, optimizer, loss_fn, device, cfg.precision, cfg.micro_batch)
                    sub = dataclasses.replace(cfg, start_batch=max(cfg.start_batch, 2 * cfg.micro_batch))
                    entry.update(
                        find_max_batch(step, model, optimizer, device, sub, granule=cfg.micro_batch, log=log)
                    )
                else:
                    step = plain_step(model, optimizer, loss_fn, device, cfg.precision)
                    entry.update(find_max_batch(step, model, optimizer, device, cfg, log=log))
                entry["status"] = "ok"
            except Exception as exc:
                entry.update(status="error", message=f"{type(exc).__name__}: {exc}"[:400])
                log(f"  {entry['message']}")
            except KeyboardInterrupt:  # e.g. the GPU suite's time limit: keep what is measured
                entry.update(status="error", message="interrupted")
                doc["max_batch"].append(entry)
                log("  interrupted")
                break
            optimizer.zero_grad(set_to_none=True)
            cleanup(device)
            doc["max_batch"].append(entry)
    return doc


def train_table(doc: dict) -> str:
    from fastclip.bench.report import format_table

    rows = []
    for r in doc["records"]:
        ok = r["status"] == "ok"
        rows.append([r["model"], r["loss_impl"], r["batch"], f"{r['samples_per_s']:.1f}" if ok else "-",
                     f"{r['step_ms']:.1f}" if ok else "-", f"{r['peak_mem_bytes'] / 2**20:.1f}" if ok else "-",
                     r["status"] if ok else f"{r['status']} ({r.get('message', '')})"[:60]])  # fmt: skip
    text = format_table(rows, ["model", "loss", "batch", "samples/s", "step ms", "peak MiB", "status"])
    if doc.get("max_batch"):
        rows = []
        for m in doc["max_batch"]:
            rows.append([m["loss_impl"], "yes" if m["grad_cache"] else "no", m.get("micro_batch") or "-",
                         m.get("max_batch", "-") if m["status"] == "ok" else "-",
                         m.get("limit") or "-" if m["status"] == "ok" else f"error: {m.get('message', '')}"[:80]])  # fmt: skip
        text += "\n\n" + format_table(
            rows, ["loss", "grad cache", "micro-batch", "largest batch", "limited by"]
        )
    return text
