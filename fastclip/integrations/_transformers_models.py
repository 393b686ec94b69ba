"""The transformers dual encoders :mod:`fastclip.integrations.transformers` patches: for each, where
transformers defines it, which loss, and how its forward reaches the pre-normalization embeddings
(towers, pooling, projections) and normalizes them, as transformers' own ``forward`` does.

A new model family is one ``encode`` function and one ``FAMILIES`` entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _norm_sum_pow(x: torch.Tensor) -> torch.Tensor:
    # CLIP, AltCLIP, ChineseCLIP: x / (sum x^2)^0.5 (transformers' exportable vector norm).
    return x / torch.pow(torch.sum(torch.pow(x, 2), dim=-1, keepdim=True), 0.5)


def _norm_l2(x: torch.Tensor) -> torch.Tensor:
    # SigLIP, SigLIP2, VisionTextDualEncoder: x / ||x||_2.
    return x / x.norm(p=2, dim=-1, keepdim=True)


def _encode_clip(model, a: dict, kw: dict, return_dict: bool):
    vision = model.get_image_features(
        pixel_values=a["pixel_values"], interpolate_pos_encoding=a["interpolate_pos_encoding"], **kw
    )
    text_args = dict(
        input_ids=a["input_ids"], attention_mask=a["attention_mask"], position_ids=a["position_ids"]
    )
    if "token_type_ids" in a:  # ChineseCLIP
        text_args["token_type_ids"] = a["token_type_ids"]
    text = model.get_text_features(**text_args, **kw)
    return vision.pooler_output, text.pooler_output, vision, text


def _encode_siglip(model, a: dict, kw: dict, return_dict: bool):
    if "spatial_shapes" in a:  # SigLIP2: NaFlex inputs instead of interpolate_pos_encoding
        vision_args = dict(pixel_attention_mask=a["pixel_attention_mask"], spatial_shapes=a["spatial_shapes"])
    else:
        vision_args = dict(interpolate_pos_encoding=a["interpolate_pos_encoding"])
    vision = model.vision_model(pixel_values=a["pixel_values"], **vision_args, **kw)
    text = model.text_model(
        input_ids=a["input_ids"], attention_mask=a["attention_mask"], position_ids=a["position_ids"], **kw
    )
    return vision.pooler_output, text.pooler_output, vision, text


def _encode_altclip(model, a: dict, kw: dict, return_dict: bool):
    vision = model.vision_model(
        pixel_values=a["pixel_values"], interpolate_pos_encoding=a["interpolate_pos_encoding"], **kw
    )
    text = model.text_model(
        input_ids=a["input_ids"], attention_mask=a["attention_mask"], token_type_ids=a["token_type_ids"],
        position_ids=a["position_ids"], **kw,
    )  # fmt: skip
    return model.visual_projection(vision[1]), model.text_projection(text[1]), vision, text


def _encode_dual_encoder(model, a: dict, kw: dict, return_dict: bool):
    # transformers' VisionTextDualEncoderModel passes these three flags to both towers and drops **kwargs.
    flags = dict(
        output_attentions=a["output_attentions"],
        output_hidden_states=a["output_hidden_states"],
        return_dict=return_dict,
    )
    vision = model.vision_model(pixel_values=a["pixel_values"], **flags)
    text = model.text_model(
        input_ids=a["input_ids"], attention_mask=a["attention_mask"], token_type_ids=a["token_type_ids"],
        position_ids=a["position_ids"], **flags,
    )  # fmt: skip
    return model.visual_projection(vision[1]), model.text_projection(text[1]), vision, text


@dataclass(frozen=True)
class _Family:
    module: str  # where transformers defines the class
    output: str  # the output class's name in that module
    loss: str  # "softmax" (CLIP) or "sigmoid" (SigLIP)
    encode: Callable
    normalize: Callable
    params: tuple[str, ...]  # the forward's parameters this module was written against
    tuple_style: str  # "can_return_tuple" (output.to_tuple()) or "dual_encoder" (its own tuple)


_M = "transformers.models."
_CLIP_PARAMS = (
    "input_ids",
    "pixel_values",
    "attention_mask",
    "position_ids",
    "return_loss",
    "interpolate_pos_encoding",
)
_TT_PARAMS = ("input_ids", "pixel_values", "attention_mask", "token_type_ids", "position_ids", "return_loss",
              "interpolate_pos_encoding")  # fmt: skip
FAMILIES: dict[str, _Family] = {
    "CLIPModel": _Family(
        _M + "clip.modeling_clip", "CLIPOutput", "softmax", _encode_clip, _norm_sum_pow,
        ("self", *_CLIP_PARAMS, "kwargs"), "can_return_tuple",
    ),
    "ChineseCLIPModel": _Family(
        _M + "chinese_clip.modeling_chinese_clip", "ChineseCLIPOutput", "softmax", _encode_clip, _norm_sum_pow,
        ("self", *_TT_PARAMS, "kwargs"), "can_return_tuple",
    ),
    "AltCLIPModel": _Family(
        _M + "altclip.modeling_altclip", "AltCLIPOutput", "softmax", _encode_altclip, _norm_sum_pow,
        ("self", *_TT_PARAMS, "kwargs"), "can_return_tuple",
    ),
    "VisionTextDualEncoderModel": _Family(
        _M + "vision_text_dual_encoder.modeling_vision_text_dual_encoder", "CLIPOutput", "softmax",
        _encode_dual_encoder, _norm_l2,
        ("self", "input_ids", "pixel_values", "attention_mask", "position_ids", "return_loss", "token_type_ids",
         "output_attentions", "output_hidden_states", "return_dict", "kwargs"), "dual_encoder",
    ),
    "SiglipModel": _Family(
        _M + "siglip.modeling_siglip", "SiglipOutput", "sigmoid", _encode_siglip, _norm_l2,
        ("self", *_CLIP_PARAMS, "kwargs"), "can_return_tuple",
    ),
    "Siglip2Model": _Family(
        _M + "siglip2.modeling_siglip2", "Siglip2Output", "sigmoid", _encode_siglip, _norm_l2,
        ("self", "input_ids", "pixel_values", "pixel_attention_mask", "spatial_shapes", "attention_mask",
         "position_ids", "return_loss", "kwargs"), "can_return_tuple",
    ),
}  # fmt: skip
#: The transformers classes ``patch`` covers (and their subclasses that keep their ``forward``).
SUPPORTED = tuple(FAMILIES)
