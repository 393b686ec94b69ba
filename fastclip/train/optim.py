"""Optimizer parameter groups and the learning-rate schedule.

    groups = param_groups(model, weight_decay=0.1)   # [{"params": decayed}, {"params": exempt, "weight_decay": 0}]
    lr = base_lr * lr_factor(step, warmup_steps, total_steps, min_lr_ratio)

Which parameters skip weight decay is the model's decision: ``model.no_weight_decay()`` returns their
names (fastclip's CLIP: biases, norms, logit scale/bias, position embeddings, class token, pooling
probe; the patch-embedding conv and the token embedding are decayed, as in timm). A model without
that method gets the common rule: every parameter with fewer than 2 dimensions is exempt.
"""

from __future__ import annotations

import math


def param_groups(model, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if callable(getattr(model, "no_weight_decay", None)):
        exempt = set(model.no_weight_decay())
        unknown = sorted(exempt - {n for n, _ in model.named_parameters()})
        if unknown:
            raise ValueError(
                f"model.no_weight_decay(): expected names of the model's parameters, got unknown {unknown[:5]}"
            )
    else:
        exempt = {n for n, p in named if p.ndim < 2}
    decay = [p for n, p in named if n not in exempt]
    no_decay = [p for n, p in named if n in exempt]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(s: int, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for optimizer step ``s + 1`` (``s`` steps taken): linear warm-up, then
    cosine from 1 to ``min_lr_ratio`` at ``steps``."""
    if s < warmup_steps:
        return (s + 1) / warmup_steps
    progress = min(1.0, (s - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
