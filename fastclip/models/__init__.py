"""Encoder towers and the two-tower model: ViT and text transformer on a switchable attention backend,
named configs, local weight loading.

    from fastclip.models import create_model, list_models, load_pretrained
    model = create_model("tiny")                    # or "ViT-B-16", "ViT-B-16-SigLIP", ... (list_models())
    model = load_pretrained("path/to/hf_clip_dir")  # Hugging Face CLIPModel / SiglipModel save_pretrained dir
    model, preprocess_train, preprocess_val = create_model_and_transforms("hf-hub:org/name")
    tokenizer = get_tokenizer("hf-hub:org/name")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastclip.models.model import CLIP

# Each name is imported on first use, so that `fastclip convert --help` does not import torch.
# name -> module that defines it
_LAZY = {
    "FLAT_OVERRIDES": "fastclip.models.configs",
    "MODEL_CONFIGS": "fastclip.models.configs",
    "ModelConfig": "fastclip.models.configs",
    "TextConfig": "fastclip.models.configs",
    "VisionConfig": "fastclip.models.configs",
    "get_config": "fastclip.models.configs",
    "list_models": "fastclip.models.configs",
    "create_model_and_transforms": "fastclip.models.factory",
    "create_model_from_pretrained": "fastclip.models.factory",
    "get_tokenizer": "fastclip.models.factory",
    "list_pretrained": "fastclip.models.factory",
    "HubError": "fastclip.models.hub",
    "CLIP": "fastclip.models.model",
    "save_open_clip": "fastclip.models.openclip_format",
    "WeightLoadError": "fastclip.models.pretrained",
    "load_state_dict_checked": "fastclip.models.pretrained",
    "save_fastclip": "fastclip.models.pretrained",
    "TextTransformer": "fastclip.models.text",
    "WordTokenizer": "fastclip.models.tokenizer",
    "load_tokenizer": "fastclip.models.tokenizer",
    "VisionTransformer": "fastclip.models.vision",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastclip.models' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def create_model(name: str, **overrides) -> CLIP:
    """A randomly initialized model of the named config (``list_models()``) with ``overrides``.

    Flat override keys: image_size, patch_size, patch_dropout, dynamic_size, in_channels, vision_width,
    vision_depth, vision_heads, context_length, vocab_size, causal, text_pool, eos_id, text_width, text_depth,
    text_heads; top-level: embed_dim, siglip, init_logit_scale, init_logit_bias, attn_impl,
    grad_checkpointing; nested: vision={...}, text={...}. Unknown keys raise ValueError with close matches.
    """
    from fastclip.models.configs import get_config
    from fastclip.models.model import CLIP

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
