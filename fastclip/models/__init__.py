"""Encoder towers and the two-tower model: ViT and text transformer on a switchable attention backend,
named configs, local weight loading.

    from fastclip.models import create_model, list_models, load_pretrained
    model = create_model("tiny")                    # or "ViT-B-16", "ViT-B-16-SigLIP", ... (list_models())
    model = load_pretrained("path/to/hf_clip_dir")  # Hugging Face CLIPModel / SiglipModel save_pretrained dir
    model, preprocess_train, preprocess_val = create_model_and_transforms("hf-hub:org/name")
    tokenizer = get_tokenizer("hf-hub:org/name")
"""

from __future__ import annotations

from fastclip.models.configs import (
    FLAT_OVERRIDES,
    MODEL_CONFIGS,
    ModelConfig,
    TextConfig,
    VisionConfig,
    get_config,
    list_models,
)
from fastclip.models.factory import (
    create_model_and_transforms,
    create_model_from_pretrained,
    get_tokenizer,
    list_pretrained,
)
from fastclip.models.hub import HubError
from fastclip.models.model import CLIP
from fastclip.models.openclip_format import save_open_clip
from fastclip.models.pretrained import WeightLoadError, load_state_dict_checked, save_fastclip
from fastclip.models.text import TextTransformer
from fastclip.models.tokenizer import WordTokenizer, load_tokenizer
from fastclip.models.vision import VisionTransformer


def create_model(name: str, **overrides) -> CLIP:
    """A randomly initialized model of the named config (``list_models()``) with ``overrides``.

    Flat override keys: image_size, patch_size, patch_dropout, dynamic_size, in_channels, vision_width,
    vision_depth, vision_heads, context_length, vocab_size, causal, text_pool, eos_id, text_width, text_depth,
    text_heads; top-level: embed_dim, siglip, init_logit_scale, init_logit_bias, attn_impl,
    grad_checkpointing; nested: vision={...}, text={...}. Unknown keys raise ValueError with close matches.
    """
    return CLIP(get_config(name, **overrides))


def load_pretrained(path, model_name=None, **kwargs) -> CLIP:
    """Build and load a model from local weights or a hub id "hf-hub:org/name" (see
    :func:`fastclip.models.pretrained.load_pretrained`)."""
    from fastclip.models.pretrained import load_pretrained as _load

    return _load(path, model_name=model_name, **kwargs)


__all__ = [
    "CLIP",
    "VisionTransformer",
    "TextTransformer",
    "ModelConfig",
    "VisionConfig",
    "TextConfig",
    "WordTokenizer",
    "MODEL_CONFIGS",
    "FLAT_OVERRIDES",
    "create_model",
    "get_config",
    "list_models",
    "load_pretrained",
    "load_tokenizer",
    "save_fastclip",
    "save_open_clip",
    "create_model_and_transforms",
    "create_model_from_pretrained",
    "get_tokenizer",
    "list_pretrained",
    "HubError",
    "load_state_dict_checked",
    "WeightLoadError",
]
