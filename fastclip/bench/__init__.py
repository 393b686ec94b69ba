"""fastclip.bench: the benchmarks behind ``fastclip bench {loss,train}``.

    from fastclip.bench import LossSweep, default_sweep, run_loss_sweep
    doc = run_loss_sweep(default_sweep(torch.device("cpu")))   # {"device", ..., "records": [...]}

Modules: ``providers`` (implementations compared), ``loss`` (the loss sweep), ``train`` (training
step), ``memory`` (peak extra memory on CPU and CUDA), ``timing`` (timers, device facts, matmul
rate), ``report`` (tables, JSON, CSV, target checks), ``plot`` (PNG plots), ``cli``.
"""

from fastclip.bench.loss import LossSweep, default_sweep, flop_floor, run_loss_sweep
from fastclip.bench.providers import PROVIDERS, Provider, get_provider

__all__ = [
    "PROVIDERS",
    "LossSweep",
    "Provider",
    "default_sweep",
    "flop_floor",
    "get_provider",
    "run_loss_sweep",
]
