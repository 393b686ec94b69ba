"""Weight loading: Hugging Face ``CLIPModel`` / ``SiglipModel`` ``save_pretrained`` directories, open_clip
hub directories, OpenAI / open_clip state dicts, fastclip's own safetensors, and hub ids (fetched into the
Hugging Face cache by :mod:`fastclip.models.hub`; nothing else here downloads).

The key converters and config builders live in :mod:`fastclip.models.layouts`, file reading and the
strict copy in :mod:`fastclip.models.weights`; this module chooses between them.

    model = load_pretrained("hf_clip_dir")                           # config.json + safetensors / bin
    model = load_pretrained("open_clip.safetensors", "ViT-B-32-quickgelu")
    model = load_pretrained("open_clip.bin")                         # config inferred from tensor shapes
    save_fastclip(model, "model.safetensors")                        # config stored in the file's metadata

Layouts are recognized by their keys and converted to fastclip's names (``visual.*``, ``text.*``,
``logit_scale``, ``logit_bias``). Loading is strict and all-or-nothing: every key is converted and
checked (names and shapes) before any tensor is copied; a mismatch raises :class:`WeightLoadError`
listing missing, unexpected and mis-shaped keys. 0-dim ``logit_scale``/``logit_bias`` are reshaped to (1,).
``.bin``/``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import os

from fastclip.models.configs import ModelConfig, apply_overrides, get_config
from fastclip.models.layouts import (  # noqa: F401  (re-exported: the loader's public helpers)
    config_from_hf,
    detect_layout,
    from_hf,
    from_open_clip,
    infer_open_clip_config,
    preprocess_from_hf,
    to_open_clip,
)
from fastclip.models.model import CLIP
from fastclip.models.weights import (  # noqa: F401
    FORMAT_KEY,
    TORCH_EXTS,
    WeightLoadError,
    load_state_dict_checked,
    read_state_dict,
    save_fastclip,
)


def load_pretrained(path, model_name: str | None = None, **overrides) -> CLIP:
    """Build a fastclip model from local weights or a hub id and load them (strict, all-or-nothing).

    ``path``: a hub id ``"hf-hub:org/name[@rev]"`` (or a plain ``"org/name"`` that is no local path;
    resolved through the local Hugging Face cache, see :mod:`fastclip.models.hub`), an open_clip hub
    directory (open_clip_config.json + open_clip_model.safetensors / open_clip_pytorch_model.bin), a
    Hugging Face CLIPModel/SiglipModel ``save_pretrained`` directory (its config.json
    decides the architecture), a fastclip safetensors file (config in its metadata), or an
    OpenAI/open_clip state dict (.safetensors/.bin/.pt/.pth) loaded into ``model_name``'s config or,
    without a name, a config inferred from the tensor shapes. ``overrides`` (e.g. ``attn_impl="sdpa"``,
    ``grad_checkpointing=True``) are applied to the config as in ``create_model``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if model_name is not None and not isinstance(model_name, str):
        raise TypeError(f"model_name: expected a model name (str) or None, got {type(model_name).__name__}")
    from fastclip.models.hub import parse_hub_id, resolve_repo

    hub = parse_hub_id(path)
    if hub is not None:  # "hf-hub:org/name" (or an "org/name" that is no local path): the cached snapshot
        path = resolve_repo(hub, tokenizer=False)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "open_clip_config.json")):
        from fastclip.models.openclip_format import read_open_clip_dir

        oc_config, sd = read_open_clip_dir(path)
        config = get_config(model_name) if model_name is not None else oc_config
    elif os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ValueError(
                f"path: directory {path!r} has no config.json (expected a save_pretrained directory)"
            )
        with open(cfg_file) as f:
            hf_cfg = json.load(f)
        sd, _ = read_state_dict(path)
        config = get_config(model_name) if model_name is not None else config_from_hf(hf_cfg)
        pre = os.path.join(path, "preprocessor_config.json")
        if model_name is None and os.path.isfile(pre):  # the pixel statistics the processor uses
            with open(pre) as f:
                proc = json.load(f)
            config = apply_overrides(config, vision=preprocess_from_hf(proc))
    else:
        sd, meta = read_state_dict(path)
        config = None
        if model_name is not None:
            config = get_config(model_name)
        elif FORMAT_KEY in meta:
            config = ModelConfig.from_dict(json.loads(meta[FORMAT_KEY]))
    layout = detect_layout(sd)
    if layout == "fastclip":
        converted, left = sd, []
    elif layout in ("hf_clip", "hf_siglip"):
        converted, left = from_hf(sd)
    elif layout == "open_clip":
        converted, left = from_open_clip(sd)
        if config is None:
            config = infer_open_clip_config(sd)
    else:
        sample = ", ".join(sorted(sd)[:8])
        raise WeightLoadError(
            f"path: {path!r} is not a CLIP/SigLIP state dict fastclip recognizes (fastclip, Hugging Face "
            f"CLIPModel/SiglipModel, OpenAI/open_clip); first keys: {sample or '(none)'}",
            unexpected=sorted(sd),
        )
    if config is None:
        raise ValueError(f"model_name: {path!r} carries no config; pass model_name (see list_models())")
    if overrides:
        config = apply_overrides(config, **overrides)
    model = CLIP(config)
    load_state_dict_checked(model, converted, left, source=path)
    return model
