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

import os

from fastclip.models.configs import ModelConfig, apply_overrides, config_from_file_dict, get_config
from fastclip.models.jsonfile import parse_json, read_json, read_json_object
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
    check_state_dict,
    expected_shapes,
    load_state_dict_checked,
    read_state_dict,
    save_fastclip,
)

RUN_CONFIG = "model_config.json"  # the trainer's run directory: the model's config beside model.safetensors
RUN_WEIGHTS = "model.safetensors"


def _sizes_in_weights(sd: dict, config: ModelConfig) -> dict:
    """``{config key: (value the fastclip-named weights imply, the tensor that says so)}``."""
    out = {}

    def put(key, tensor_name, fn):
        t = sd.get(tensor_name)
        if t is not None and t.dim() >= 1:
            out[key] = (fn(tuple(t.shape)), f"{tensor_name} {tuple(t.shape)}")

    put("vision.width", "visual.patch_embed.weight", lambda s: s[0])
    put("vision.in_channels", "visual.patch_embed.weight", lambda s: s[1] if len(s) == 4 else None)
    put("vision.patch_size", "visual.patch_embed.weight", lambda s: s[-1] if len(s) == 4 else None)
    patch = out.get("vision.patch_size", (config.vision.patch_size,))[0] or config.vision.patch_size
    grid = sd.get("visual.pos_embed")
    if grid is not None and grid.dim() == 2:
        n = grid.shape[0] - config.vision.num_prefix_tokens
        side = int(round(max(n, 0) ** 0.5))
        if side * side == n:
            out["vision.image_size"] = (side * patch, f"visual.pos_embed {tuple(grid.shape)}")
    for tower, prefix in (("vision", "visual"), ("text", "text")):
        blocks = {int(k.split(".")[3]) for k in sd if k.startswith(f"{prefix}.transformer.blocks.")}
        if blocks:
            out[f"{tower}.depth"] = (max(blocks) + 1, f"{prefix}.transformer.blocks.{max(blocks)}")
        put(f"{tower}.mlp_dim", f"{prefix}.transformer.blocks.0.mlp.fc1.weight", lambda s: s[0])
    put("text.vocab_size", "text.token_embed.weight", lambda s: s[0])
    put("text.width", "text.token_embed.weight", lambda s: s[-1])
    put("text.context_length", "text.pos_embed", lambda s: s[0])
    put("embed_dim", "text.proj.weight", lambda s: s[0])
    return {k: v for k, v in out.items() if v[0] is not None}


def _config_hint(config: ModelConfig, sd: dict, config_source: str) -> str:
    """Which keys of a config that came with the weights (``config_source`` says where) disagree with the weights' shapes ("" if none
    can be named)."""
    flat = {
        **config.to_dict(),
        **{f"{t}.{k}": v for t in ("vision", "text") for k, v in config.to_dict()[t].items()},
    }
    wrong = [
        f"{key} is {flat[key]}, the weights have {value} ({tensor})"
        for key, (value, tensor) in _sizes_in_weights(sd, config).items()
        if flat.get(key) != value
    ]
    if not wrong:
        return ""
    return f"the model config ({config_source}) does not fit the weights: " + "; ".join(wrong)


def _run_dir_weights(path: str) -> str | None:
    """``DIR/model.safetensors`` of a fastclip run directory (``model.safetensors`` and/or
    ``model_config.json``, no Hugging Face ``config.json``); None for other directories."""
    has_weights = os.path.isfile(os.path.join(path, RUN_WEIGHTS))
    if not (has_weights or os.path.isfile(os.path.join(path, RUN_CONFIG))):
        return None
    if not has_weights:
        raise ValueError(
            f"path: {path!r} looks like a fastclip run directory ({RUN_CONFIG}) but has no {RUN_WEIGHTS}: the "
            "run writes it at the end (checkpoint.export, on by default), or export a checkpoint with "
            "`fastclip train --export DIR/checkpoints DIR/model.safetensors`"
        )
    return os.path.join(path, RUN_WEIGHTS)


def load_pretrained(path, model_name: str | None = None, **overrides) -> CLIP:
    """Build a fastclip model from local weights or a hub id and load them (strict, all-or-nothing).

    ``path``: a hub id ``"hf-hub:org/name[@rev]"`` (or a plain ``"org/name"`` that is no local path;
    resolved through the local Hugging Face cache, see :mod:`fastclip.models.hub`), an open_clip hub
    directory (open_clip_config.json + open_clip_model.safetensors / open_clip_pytorch_model.bin), a
    Hugging Face CLIPModel/SiglipModel ``save_pretrained`` directory (its config.json
    decides the architecture), a fastclip run directory (``fastclip train --output-dir``: its
    model.safetensors), a fastclip safetensors file (config in its metadata, else in a model_config.json
    beside it), or an OpenAI/open_clip state dict (.safetensors/.bin/.pt/.pth) loaded into
    ``model_name``'s config or, without a name, a config inferred from the tensor shapes. ``overrides``
    (e.g. ``attn_impl="sdpa"``, ``grad_checkpointing=True``) are applied to the config as in ``create_model``.

    A config that comes with the weights is checked against their shapes (and sane size bounds) before
    the model is built; an error names the key that disagrees.
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
    config_source = None  # where a config that came with the weights was read (for the errors)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "open_clip_config.json")):
        if not os.path.isfile(os.path.join(path, "config.json")):
            run_weights = _run_dir_weights(path)
            if run_weights is None:
                raise ValueError(
                    f"path: directory {path!r} has no config.json (a Hugging Face save_pretrained directory), "
                    f"open_clip_config.json (an open_clip repo) or {RUN_WEIGHTS} (a fastclip run directory)"
                )
            path = run_weights
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "open_clip_config.json")):
        from fastclip.models.openclip_format import read_open_clip_dir

        oc_config, sd = read_open_clip_dir(path)
        config = get_config(model_name) if model_name is not None else oc_config
        config_source = None if model_name is not None else os.path.join(path, "open_clip_config.json")
    elif os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        hf_cfg = read_json_object(cfg_file, "a Hugging Face model config (a JSON object)")
        sd, _ = read_state_dict(path)
        if model_name is not None:
            config = get_config(model_name)
        else:
            try:
                config = config_from_hf(hf_cfg)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(
                    f"{cfg_file}: {'missing key ' if isinstance(exc, KeyError) else ''}{exc}"
                ) from exc
        config_source = None if model_name is not None else cfg_file
        pre = os.path.join(path, "preprocessor_config.json")
        if model_name is None and os.path.isfile(pre):  # the pixel statistics the processor uses
            proc = read_json_object(pre, "a preprocessor config (a JSON object)")
            config = apply_overrides(config, vision=preprocess_from_hf(proc))
    else:
        sd, meta = read_state_dict(path)
        config = None
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), RUN_CONFIG)
        if model_name is not None:
            config = get_config(model_name)
        elif FORMAT_KEY in meta:
            where = f"{path}: metadata {FORMAT_KEY!r}"
            config = config_from_file_dict(parse_json(meta[FORMAT_KEY], where), where)
            config_source = f"metadata {FORMAT_KEY!r}"
        elif detect_layout(sd) == "fastclip" and os.path.isfile(beside):  # a run's export without metadata
            config_source = beside
            config = config_from_file_dict(read_json(beside), beside)
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
        raise ValueError(
            f"model_name: {path!r} carries no config (no {FORMAT_KEY!r} metadata, no {RUN_CONFIG} beside it); "
            "pass model_name (see list_models())"
        )
    if overrides:
        config = apply_overrides(config, **overrides)
    # Names and shapes first, on a model that allocates nothing: a config that does not fit is an error
    # naming its key, not an allocation of what it asks for.
    hint = _config_hint(config, converted, config_source) if config_source else ""
    check_state_dict(expected_shapes(config), converted, left, source=path, hint=hint)
    model = CLIP(config)
    load_state_dict_checked(model, converted, left, source=path)
    return model
