"""The DeepSpeed engine: its config from the run's config, its initialisation, and the few operations on
parameters outside its forward/backward (ZeRO-3 gathering, the logit-scale clamp and read-out).

    engine = build_engine(cfg, model, param_groups(model, cfg.optim.weight_decay), micro, chunks, device)
    with gathered(cfg, [p]): ...            # full parameters under ZeRO-3, a no-op otherwise
    clamp_logit_scale(cfg, engine)          # after every optimizer step; device ops only, no host read
    logit_scale_tensor(cfg, engine)         # exp(logit_scale) as a device tensor, for the metrics row
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from fastclip.train.optim import lr_factor

LN_100 = math.log(100.0)


def ds_config(cfg, micro: int, chunks: int) -> dict:
    """DeepSpeed's JSON config for ``cfg`` with ``micro`` samples per micro-batch, ``chunks`` per step."""
    o, t = cfg.optim, cfg.train
    conf = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": chunks,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 12},
        # Always written: DeepSpeed's default when the key is absent is 1.0 (0.19.x), so leaving it out
        # for optim.grad_clip 0 ("off") clipped every step to norm 1.
        "gradient_clipping": float(o.grad_clip),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return conf


def build_engine(cfg, model, groups: list, micro: int, chunks: int, device: torch.device):
    """``deepspeed.initialize`` with AdamW over ``groups`` and the warm-up + cosine schedule."""
    import deepspeed

    o, steps = cfg.optim, cfg.train.steps

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, o.warmup_steps, steps, o.min_lr_ratio)
        )

    model.to(device)
    _forget_stale_world_clone()
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_config(cfg, micro, chunks), lr_scheduler=schedule
    )
    return engine


def _forget_stale_world_clone() -> None:
    """DeepSpeed keeps one clone of the world process group for the whole process
    (``deepspeed.utils.groups._WORLD_GROUP``). When the process group it was cloned from has been
    destroyed and another made (a second run in one process: a notebook, a sweep, a test suite), the
    clone is no longer registered and ``deepspeed.initialize`` fails ("Group ... is not registered"):
    drop it, and DeepSpeed clones the current world again."""
    from deepspeed.utils import groups

    clone = getattr(groups, "_WORLD_GROUP", None)
    if clone is None:
        return
    try:
        torch.distributed.get_global_rank(clone, 0)
    except (ValueError, RuntimeError):
        groups._WORLD_GROUP = None


def gathered(cfg, params, modify: bool = False):
    """Full parameters inside the block under ZeRO-3 (``modify``: changes made on rank 0 are kept)."""
    if cfg.train.zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def logit_scale_tensor(cfg, engine) -> torch.Tensor | None:
    """exp(raw logit_scale) of the model as a (1,) float32 tensor on its device (None when it has none);
    nothing is read on the host."""
    p = getattr(engine.module, "logit_scale", None)
    if p is None:
        return None
    with gathered(cfg, [p]):
        return (
            p.detach().float().exp().reshape(-1)[:1]
        )  # exp() makes a new tensor: it outlives ZeRO-3's gather


def logit_scale(cfg, engine) -> float:
    """exp(raw logit_scale) of the model (nan when it has none); a host read."""
    t = logit_scale_tensor(cfg, engine)
    return float("nan") if t is None else float(t)


def clamp_logit_scale(cfg, engine) -> None:
    """Clamp the raw logit_scale to [0, ln 100] on the fp32 master copy and on the model's copy.

    No host read of whether the clamp changed anything (``torch.equal`` would wait for the GPU every
    step): the clamped master is written back each step, unchanged when it was inside the range.
    Under ZeRO-3 the write is to this rank's partition of the master: DeepSpeed 0.19.8's full-parameter
    setter narrows past the end of a 1-element parameter on every rank but the first (its partition
    there is padding) and raises; a 2-rank ZeRO-3 run whose logit scale reached the clamp failed so."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    p = getattr(engine.module, "logit_scale", None)
    if p is None:
        return
    if cfg.train.zero_stage == 3:
        local = safe_get_local_fp32_param(p)  # this rank's slice (padding zeros stay 0 when clamped)
        if local is not None:
            safe_set_local_fp32_param(p, local.clamp(0.0, LN_100))
    else:
        master = safe_get_full_fp32_param(p)  # None without a separate master (fp32 at ZeRO 0)
        if master is not None:
            safe_set_full_fp32_param(p, master.clamp(0.0, LN_100))
    with gathered(cfg, [p], modify=True), torch.no_grad():
        p.clamp_(0.0, LN_100)
