"""The DeepSpeed engine: its config from the run's config, its initialisation, and the few operations on
parameters outside its forward/backward (ZeRO-3 gathering, the logit-scale clamp).

    engine = build_engine(cfg, model, param_groups(model, cfg.optim.weight_decay), micro, chunks, device)
    with gathered(cfg, [p]): ...            # full parameters under ZeRO-3, a no-op otherwise
    clamp_logit_scale(cfg, engine)          # after every optimizer step
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
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if o.grad_clip > 0:
        conf["gradient_clipping"] = o.grad_clip
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
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds_config(cfg, micro, chunks), lr_scheduler=schedule
    )
    return engine


def gathered(cfg, params, modify: bool = False):
    """Full parameters inside the block under ZeRO-3 (``modify``: changes made on rank 0 are kept)."""
    if cfg.train.zero_stage != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def logit_scale(cfg, engine) -> float:
    """exp(raw logit_scale) of the model (nan when it has none)."""
    p = getattr(engine.module, "logit_scale", None)
    if p is None:
        return float("nan")
    with gathered(cfg, [p]):
        return float(p.detach().float().exp().reshape(-1)[0])


def clamp_logit_scale(cfg, engine) -> None:
    """Clamp the raw logit_scale to [0, ln 100] on the fp32 master copy and on the model's copy."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    p = getattr(engine.module, "logit_scale", None)
    if p is None:
        return
    master = safe_get_full_fp32_param(p)  # None without a separate master (fp32 at ZeRO 0)
    if master is not None:
        clamped = master.clamp(0.0, LN_100)
        if not torch.equal(clamped, master):
            safe_set_full_fp32_param(p, clamped)
    with gathered(cfg, [p], modify=True), torch.no_grad():
        p.clamp_(0.0, LN_100)
