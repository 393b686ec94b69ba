"""Gradient caching (GradCache, Gao et al. 2021): a contrastive step over a batch larger than what fits
in activation memory, with exactly the gradient of one large-batch step.

1. Forward every micro-batch without autograd and keep only its features (B×D, small).
2. Compute the loss once over all features (fused, never B×B) and its gradient with respect to
   the features, ``logit_scale`` and ``logit_bias``.
3. Forward each micro-batch again with autograd and backpropagate ``<features, cached gradient>``;
   the scale/bias gradient rides on the first micro-batch only, so it is counted once.

Randomness (dropout, patch dropout) is replayed: the RNG state before each micro-batch's first
forward is restored for its second, so both passes see the same masks, and the RNG ends where a
single pass would have left it. Peak activation memory is one micro-batch; compute is one extra
forward.

    loss = gradcache_step(model, loss_fn, images, texts, micro_batch=64)   # then optimizer.step()
"""

from __future__ import annotations

from typing import Callable

import torch

from fastclip import _checks


def _cuda_devices(device: torch.device) -> list:
    """The CUDA generators a forward may draw from: the inputs' device and, once CUDA is in use, the
    current device (a forward that moves host inputs to the model's GPU draws its dropout there)."""
    out = []
    if device.type == "cuda":
        out.append(
            torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        )
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        current = torch.device("cuda", torch.cuda.current_device())
        if current not in out:
            out.append(current)
    return out


def _rng_state(device: torch.device):
    """The CPU generator's state and that of every CUDA generator in :func:`_cuda_devices` (host-side
    copies: reading them does not synchronise the GPU)."""
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in _cuda_devices(device)]


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in cuda:
        torch.cuda.set_rng_state(s, d)


# Per-sample outputs of the model's forward that the loss differentiates (cached, then re-forwarded).
FEATURE_KEYS = ("image_features", "text_features", "negative_features")


def gradcache_step(
    forward: Callable,
    loss_fn: Callable,
    images: torch.Tensor,
    texts: torch.Tensor,
    micro_batch: int,
    *,
    backward: Callable | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """One cached-gradient step over ``images`` (B, ...) and ``texts`` (B, T); returns the detached loss.

    ``forward(images, texts)`` returns the model's dict (``image_features``, ``text_features``,
    ``logit_scale``[, ``logit_bias``]); ``loss_fn(**that dict)`` returns the loss (the distributed
    loss in a multi-process run). ``backward(surrogate)`` runs once per micro-batch (default
    ``surrogate.backward()``; the trainer passes DeepSpeed's ``engine.backward`` + ``engine.step``).
    Gradients accumulate into the parameters' ``.grad`` as if ``loss_fn(**forward(images, texts))``
    had been backpropagated in one piece. Equivalent to::

        loss = loss_fn(**forward(images, texts)); loss.backward()

    ``check_finite``: a non-finite loss raises :class:`FloatingPointError` before any gradient is
    applied (a host read of the loss: on a GPU it waits for the first pass). False: no read; the
    caller checks the returned loss (the trainer records it on the device, see ``step_checks``).
    """
    if not callable(forward) or not callable(loss_fn):
        raise TypeError("forward, loss_fn: expected callables")
    if not isinstance(images, torch.Tensor) or not isinstance(texts, torch.Tensor):
        raise TypeError(
            f"images, texts: expected tensors, got {type(images).__name__} and {type(texts).__name__}"
        )
    if images.shape[0] != texts.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"texts: expected the batch size of images ({images.shape[0]}, > 0), got {texts.shape[0]}"
        )
    _checks.check_int("micro_batch", micro_batch, minimum=1)
    _checks.check_bool("check_finite", check_finite)
    backward = backward or (lambda t: t.backward())
    device = images.device
    chunks = list(zip(images.split(micro_batch), texts.split(micro_batch)))

    # Pass 1: features only, remembering the RNG state each micro-batch started from.
    states, feats = [], []
    with torch.no_grad():
        for imgs, txts in chunks:
            states.append(_rng_state(device))
            feats.append(_outputs(forward(imgs, txts)))
    end_state = _rng_state(device)

    # The loss once over everything, differentiated with respect to the cached leaves. Per-sample
    # features (images, texts and, with hard negatives, the negative captions' (B, K, D) features) are
    # concatenated over the micro-batches; the scale and bias are shared.
    keys = [k for k in FEATURE_KEYS if k in feats[0]]
    batch_f = {k: torch.cat([f[k] for f in feats]).requires_grad_(True) for k in keys}
    head = {
        k: v.clone().requires_grad_(True) for k, v in feats[0].items() if k in ("logit_scale", "logit_bias")
    }
    loss = loss_fn(**batch_f, **head)
    _check_loss(loss, check_finite)
    leaves = [*batch_f.values(), *head.values()]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    g_batch = {
        k: (torch.zeros_like(batch_f[k]) if g is None else g).split(micro_batch) for k, g in zip(keys, grads)
    }
    g_head = dict(zip(head, grads[len(keys) :]))

    # Pass 2: re-forward with autograd under the same randomness; backpropagate the cached gradients.
    for i, (imgs, txts) in enumerate(chunks):
        _set_rng_state(states[i], device)
        out = forward(imgs, txts)
        surrogate = sum(_dot(out[k], g_batch[k][i]) for k in keys)
        if i == 0:  # the scale and bias are shared by all micro-batches: their gradient counts once
            for key, g in g_head.items():
                if g is not None:
                    surrogate = surrogate + _dot(out[key], g)
        backward(surrogate)
    _set_rng_state(end_state, device)
    return loss.detach()


def _outputs(out) -> dict:
    if not isinstance(out, dict) or "image_features" not in out or "text_features" not in out:
        raise TypeError(
            "forward: expected a dict with image_features, text_features, logit_scale[, logit_bias], "
            f"got {type(out).__name__}"
        )
    return {k: v.detach() for k, v in out.items() if v is not None}


def _dot(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(t.dtype, torch.float32)  # at least fp32; float64 stays float64
    return (t.to(dtype) * g.to(dtype)).sum()


def _check_loss(loss, check_finite: bool) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn: expected a scalar tensor, got {type(loss).__name__}")
    if check_finite and not bool(torch.isfinite(loss.detach()).all()):
        raise FloatingPointError(f"loss_fn: the loss is not finite ({loss.item()}): no gradient was applied")
