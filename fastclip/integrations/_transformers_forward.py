"""The forward :func:`fastclip.integrations.transformers.patch` installs: transformers' ``forward``
when ``return_loss`` is false (or the patch was undone), else the model's own towers, projections and
normalization (:mod:`fastclip.integrations._transformers_models`), then fastclip's fused loss.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastclip.integrations._transformers_models import _Family

#: SigLIP's distributed loss calls the ring "bidir".
_SIGLIP_DIST_IMPL = {"gather": "gather", "ring": "bidir"}


@dataclass(frozen=True)
class _Options:
    global_loss: bool
    dist_impl: str
    group: Any
    logits: str
    impl: str
    chunk_size: int | None


class _State:
    """One handle's live options; the forwards it installed read ``active`` on every call."""

    def __init__(self, options: _Options) -> None:
        self.options = options
        self.active = True


def _distributed_world(group) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return torch.distributed.get_world_size(group)


def _loss(o: _Options, kind: str, image, text, scale, bias):
    """The fused loss of normalized embeddings: local, or (global_loss) over every rank's batch."""
    if o.global_loss and _distributed_world(o.group) > 1:
        from fastclip.distributed import clip_loss_distributed, siglip_loss_distributed

        if kind == "softmax":  # every rank: the global loss; features' gradients W x (DDP averages)
            return clip_loss_distributed(
                image, text, scale, local_loss=False, gather_with_grad=True, dist_impl=o.dist_impl,
                group=o.group, impl=o.impl, chunk_size=o.chunk_size,
            )  # fmt: skip
        own = siglip_loss_distributed(
            image, text, scale, bias, dist_impl=_SIGLIP_DIST_IMPL[o.dist_impl], group=o.group, impl=o.impl,
            chunk_size=o.chunk_size,
        )  # fmt: skip
        # This rank's rows against every rank's columns, over the local batch size: the ranks' mean is
        # the global loss, and its gradient is the DDP average of the ranks'. Report that mean here.
        with torch.no_grad():
            mean = own.detach().clone()
            torch.distributed.all_reduce(mean, group=o.group)
            mean /= _distributed_world(o.group)
        return own + (mean - own.detach())
    from fastclip.functional import clip_loss, siglip_loss

    if kind == "softmax":
        return clip_loss(image, text, scale, impl=o.impl, chunk_size=o.chunk_size)
    return siglip_loss(image, text, scale, bias, impl=o.impl, chunk_size=o.chunk_size)


def _fused_forward(model, family: _Family, output_cls: type, o: _Options, a: dict):
    """transformers' forward with ``return_loss=True``, loss fused, logits as ``o.logits`` says."""
    kw = dict(a.get("kwargs") or {})
    if family.tuple_style == "can_return_tuple":  # transformers' decorator: return_dict from kwargs/config
        return_dict = getattr(getattr(model, "config", None), "return_dict", True)
        passed = kw.pop("return_dict", return_dict)
        if passed is not None:
            return_dict = passed
    else:
        return_dict = a["return_dict"] if a["return_dict"] is not None else model.config.return_dict

    image_raw, text_raw, vision_out, text_out = family.encode(model, a, kw, return_dict)
    image_embeds = family.normalize(image_raw)
    text_embeds = family.normalize(text_raw)
    device = text_embeds.device
    image_for_loss = image_embeds.to(device)
    if family.loss == "softmax":
        scale, bias = model.logit_scale.exp().to(device), None
    else:
        scale, bias = model.logit_scale.to(device).exp(), model.logit_bias.to(device)
    loss = _loss(o, family.loss, image_for_loss, text_embeds, scale, bias)

    want_logits = not return_dict or o.logits == "always" or (o.logits == "eval" and not model.training)
    logits_per_text = logits_per_image = None
    if want_logits:  # for the caller only; the loss above never sees them
        logits_per_text = torch.matmul(text_embeds, image_for_loss.t()) * scale
        if bias is not None:
            logits_per_text = logits_per_text + bias
        logits_per_image = logits_per_text.t()

    if family.tuple_style == "dual_encoder" and not return_dict:
        return (loss, logits_per_image, logits_per_text, text_embeds, image_embeds, text_out, vision_out)
    out = output_cls(
        loss=loss, logits_per_image=logits_per_image, logits_per_text=logits_per_text, text_embeds=text_embeds,
        image_embeds=image_embeds, text_model_output=text_out, vision_model_output=vision_out,
    )  # fmt: skip
    return out if return_dict else out.to_tuple()


def _make_forward(original: Callable, family: _Family, output_cls: type, state: _State) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)  # same name, docs and inspect.signature (Trainer reads the parameters)
    def forward(self, *args, **kwargs):
        if not state.active:  # undone, but captured somewhere while patched: transformers' own
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if not bound.arguments.get("return_loss"):
            return original(self, *args, **kwargs)
        return _fused_forward(self, family, output_cls, state.options, bound.arguments)

    forward._fastclip_state = state
    return forward
