"""open_clip's hub format: a directory with ``open_clip_config.json`` and ``open_clip_model.safetensors``
(or ``open_clip_pytorch_model.bin``), as ``open_clip.push_to_hf_hub`` writes it.

    save_open_clip(model, "out_dir")                  # open_clip_config.json + open_clip_model.safetensors
    config, sd = read_open_clip_dir("out_dir")        # ModelConfig and the (open_clip-named) tensors

``open_clip_config.json`` holds ``{"model_cfg": {...}, "preprocess_cfg": {...}}``. fastclip writes open_clip's
``model_cfg`` keys (embed_dim, quick_gelu, vision_cfg, text_cfg, ...) so that open_clip can read the
repo, plus its own full config under ``"fastclip_config"``, which it prefers when reading back. Repos
written by open_clip are read by inferring the sizes from the tensor shapes and taking heads,
activations, attention masks, pooling, tokenizer and preprocessing from ``model_cfg`` /
``preprocess_cfg``. Towers open_clip builds from other libraries (Hugging Face text encoders,
attention-pool CoCa towers, ResNets) are refused with a message.
"""

from __future__ import annotations

import json
import os
import re

from fastclip.models.configs import ModelConfig, apply_overrides, config_from_file_dict
from fastclip.models.jsonfile import read_json

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
FASTCLIP_KEY = "fastclip_config"
OPENAI_VOCAB_SIZE = 49408
OPENAI_TOKENIZER_REPO = "openai/clip-vit-base-patch32"

# timm SigLIP towers named in open_clip configs: heads per size (the widths and depths come from the shapes).
_TIMM_HEADS = {"base": 12, "large": 16, "so400m": 16}
_TIMM_SIZES = {(768, 12, 12): "base", (1024, 24, 16): "large", (1152, 27, 16): "so400m"}


def _timm_name(v) -> str | None:
    size = _TIMM_SIZES.get((v.width, v.depth, v.heads))
    if size is None:
        return None
    return f"vit_{size}_patch{v.patch_size}_siglip_{v.image_size}"


def open_clip_json(config: ModelConfig) -> dict:
    """The ``open_clip_config.json`` content for ``config``: open_clip's model_cfg and preprocess_cfg,
    and fastclip's own config under ``"fastclip_config"``."""
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
    v, t = config.vision, config.text
    timm = v.pool == "map" or not v.class_token
    if timm:
        vision_cfg = {
            "image_size": v.image_size,
            "timm_model_name": _timm_name(v),  # None: no timm model of this size (fastclip_config is exact)
            "timm_model_pretrained": False,
            "timm_pool": "map" if v.pool == "map" else ("token" if v.class_token else "avg"),
            "timm_proj": "linear" if v.proj else "none",
        }
    else:
        vision_cfg = {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "width": v.width,
            "layers": v.depth,
            "head_width": v.width // v.heads,
            "mlp_ratio": v.mlp_dim / v.width,
        }
        if v.ls_init is not None:
            vision_cfg["ls_init_value"] = v.ls_init
        if not v.pre_norm:
            vision_cfg["no_ln_pre"] = True
        if v.pool == "mean":
            vision_cfg["pool_type"] = "avg"
        if v.norm_eps != 1e-5:
            vision_cfg["norm_kwargs"] = {"eps": v.norm_eps}
        if v.act == "gelu_tanh":
            vision_cfg["act_kwargs"] = {"approximate": "tanh"}
    text_cfg = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.depth,
        "mlp_ratio": t.mlp_dim / t.width,
    }
    if t.ls_init is not None:
        text_cfg["ls_init_value"] = t.ls_init
    if not t.causal:
        text_cfg["no_causal_mask"] = True
    if t.proj_bias:
        text_cfg["proj_bias"] = True
    if t.pool != "argmax":
        text_cfg["pool_type"] = t.pool
    if t.pool == "eos":
        text_cfg["eos_id"] = t.eos_id
    if t.norm_eps != 1e-5:
        text_cfg["norm_kwargs"] = {"eps": t.norm_eps}
    if t.act == "gelu_tanh":
        text_cfg["act_kwargs"] = {"approximate": "tanh"}
    if t.tokenizer:
        text_cfg["hf_tokenizer_name"] = t.tokenizer
    if t.tokenizer_clean not in ("none", "whitespace"):
        text_cfg["tokenizer_kwargs"] = {"clean": t.tokenizer_clean}
    model_cfg = {
        "embed_dim": config.embed_dim,
        "quick_gelu": v.act == "quick_gelu" or t.act == "quick_gelu",
        "vision_cfg": vision_cfg,
        "text_cfg": text_cfg,
    }
    if timm or t.proj_bias:
        model_cfg["custom_text"] = True
    if config.siglip:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    preprocess_cfg = {
        "mean": list(v.mean),
        "std": list(v.std),
        "interpolation": v.interpolation,
        "resize_mode": v.resize_mode,
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, FASTCLIP_KEY: config.to_dict()}


def save_open_clip(model, directory, *, safetensors: bool = True) -> None:
    """Write ``model`` as an open_clip hub directory: ``open_clip_config.json`` and
    ``open_clip_model.safetensors`` (open_clip tensor names). The directory is created if needed."""
    from fastclip.models.layouts import to_open_clip
    from fastclip.models.model import CLIP
    from fastclip.models.weights import save_safetensors

    if not isinstance(model, CLIP):
        raise TypeError(f"model: expected a fastclip CLIP model, got {type(model).__name__}")
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
    if not safetensors:
        raise ValueError("safetensors: only safetensors output is written (pickles are not), got False")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    sd = to_open_clip({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    sd = {k: (v.reshape(()) if k in ("logit_scale", "logit_bias") else v) for k, v in sd.items()}
    save_safetensors(sd, os.path.join(directory, OPEN_CLIP_WEIGHTS[0]), metadata={"format": "pt"})
    with open(os.path.join(directory, OPEN_CLIP_CONFIG), "w") as f:
        json.dump(open_clip_json(model.config), f, indent=2)


def read_open_clip_json(path: str) -> dict:
    oc = read_json(path)
    if not isinstance(oc, dict) or not isinstance(oc.get("model_cfg", oc.get(FASTCLIP_KEY)), dict):
        raise ValueError(f"{path}: expected a JSON object with a 'model_cfg' object (open_clip_config.json)")
    return oc


def _act(cfg: dict, quick: bool, default: str) -> str:
    if quick:
        return "quick_gelu"
    approx = (cfg.get("act_kwargs") or {}).get("approximate")
    return "gelu_tanh" if approx == "tanh" else default


def text_settings(oc: dict) -> dict:
    """TextConfig fields open_clip's config decides (usable without the weights): context length,
    tokenizer repo and text cleaning."""
    if FASTCLIP_KEY in oc:
        t = ModelConfig.from_dict(oc[FASTCLIP_KEY]).text
        return {
            "context_length": t.context_length,
            "tokenizer": t.tokenizer,
            "tokenizer_clean": t.tokenizer_clean,
        }
    tc = oc["model_cfg"].get("text_cfg") or {}
    clean = (tc.get("tokenizer_kwargs") or {}).get("clean", "whitespace")
    tokenizer = tc.get("hf_tokenizer_name") or None
    if tokenizer is None and int(tc.get("vocab_size", 49408)) == OPENAI_VOCAB_SIZE:
        # open_clip's built-in tokenizer: OpenAI CLIP's BPE vocabulary, published with the OpenAI weights
        tokenizer = OPENAI_TOKENIZER_REPO
    return {
        "context_length": int(tc.get("context_length", 77)),
        "tokenizer": tokenizer,
        "tokenizer_clean": clean,
    }


def config_from_open_clip(oc: dict, sd: dict, source: str = OPEN_CLIP_CONFIG) -> ModelConfig:
    """ModelConfig of an open_clip_config.json (``oc``, read from ``source``: errors name it) and its
    open_clip-named tensors ``sd``."""
    from fastclip.models.layouts import infer_open_clip_config

    if FASTCLIP_KEY in oc:
        return config_from_file_dict(oc[FASTCLIP_KEY], f"{source}: key {FASTCLIP_KEY!r}")
    mc = oc["model_cfg"]
    vc, tc = mc.get("vision_cfg") or {}, mc.get("text_cfg") or {}
    for bad, where in (
        ("hf_model_name", tc),
        ("attentional_pool", vc),
        ("final_ln_after_pool", vc),
        ("output_tokens", vc),
    ):
        if where.get(bad):
            raise ValueError(f"{source}: {bad}={where[bad]!r} is not supported by fastclip's towers")
    if isinstance(vc.get("layers"), (list, tuple)):
        raise ValueError(f"{source}: ResNet vision towers (layers as a list) are not supported")
    base = infer_open_clip_config(sd)
    quick = bool(mc.get("quick_gelu", False))
    vis: dict = {}
    if vc.get("timm_model_name") is not None or "visual.trunk.patch_embed.proj.weight" in sd:
        m = re.match(r"vit_([a-z0-9]+)_patch", str(vc.get("timm_model_name") or ""))
        if m and m.group(1) in _TIMM_HEADS:
            vis["heads"] = _TIMM_HEADS[m.group(1)]
    else:
        vis["heads"] = base.vision.width // int(vc.get("head_width", 64))
        vis["act"] = _act(vc, quick, "gelu")
        vis["pre_norm"] = not vc.get("no_ln_pre", False)
        pool = vc.get("pool_type", "avg" if vc.get("global_average_pool") else "tok")
        if pool not in ("tok", "avg"):
            raise ValueError(f"{source}: vision pool_type {pool!r} is not supported")
        vis["pool"] = "mean" if pool == "avg" else "tok"
        if "eps" in (vc.get("norm_kwargs") or {}):
            vis["norm_eps"] = float(vc["norm_kwargs"]["eps"])
    pp = oc.get("preprocess_cfg") or {}
    for key in ("mean", "std", "resize_mode", "interpolation"):
        if key in pp:
            vis[key] = tuple(pp[key]) if key in ("mean", "std") else pp[key]
    txt = {
        "heads": int(tc.get("heads", 8)),
        "act": _act(tc, quick, "gelu"),
        "causal": not tc.get("no_causal_mask", False),
        "pool": tc.get("pool_type", "argmax"),
        **{k: v for k, v in text_settings(oc).items() if k != "context_length"},
    }
    if txt["pool"] == "eos":
        txt["eos_id"] = int(tc.get("eos_id", 2))
    if "eps" in (tc.get("norm_kwargs") or {}):
        txt["norm_eps"] = float(tc["norm_kwargs"]["eps"])
    top = {}
    if "init_logit_bias" in mc:
        top["siglip"] = True
    return apply_overrides(base, vision=vis, text=txt, **top)


def read_open_clip_dir(directory: str) -> tuple[ModelConfig, dict]:
    """(config, open_clip-named tensors) of an open_clip hub directory."""
    from fastclip.models.weights import read_state_dict

    oc = read_open_clip_json(os.path.join(directory, OPEN_CLIP_CONFIG))
    for name in OPEN_CLIP_WEIGHTS:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            sd, _ = read_state_dict(path)
            try:
                return config_from_open_clip(oc, sd, os.path.join(directory, OPEN_CLIP_CONFIG)), sd
            except (AttributeError, KeyError, TypeError) as exc:  # an object where another kind was expected
                raise ValueError(
                    f"{os.path.join(directory, OPEN_CLIP_CONFIG)}: not an open_clip model config "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
    raise ValueError(f"path: {directory!r} has {OPEN_CLIP_CONFIG} but no {' or '.join(OPEN_CLIP_WEIGHTS)}")
