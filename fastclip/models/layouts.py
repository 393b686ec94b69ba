"""Key layouts of CLIP/SigLIP checkpoints and the configs they imply: recognize fastclip, Hugging Face
and OpenAI/open_clip (incl. timm towers) names, convert them to fastclip's, and build a
:class:`ModelConfig` from a Hugging Face ``config.json``, a ``preprocessor_config.json`` or the tensor
shapes of an open_clip state dict.

Longer than the house's ~400 lines on purpose: the three layouts' converters sit side by side, so
that one key's path through fastclip, Hugging Face and open_clip/timm names reads in one place.
"""

from __future__ import annotations

import math
import re

import torch

from fastclip.models.configs import (
    CLIP_MEAN,
    CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ModelConfig,
    TextConfig,
    VisionConfig,
)

# ----------------------------------------------------------------------------------------------- layouts


def detect_layout(sd: dict) -> str:
    """ "fastclip", "hf_clip", "hf_siglip", "open_clip" or "unknown", from the keys."""
    keys = set(sd)
    if "visual.patch_embed.weight" in keys and "text.token_embed.weight" in keys:
        return "fastclip"
    if "vision_model.embeddings.patch_embedding.weight" in keys:
        return (
            "hf_siglip"
            if "vision_model.head.probe" in keys or "text_model.head.weight" in keys
            else "hf_clip"
        )
    has_vision = "visual.conv1.weight" in keys or "visual.trunk.patch_embed.proj.weight" in keys
    if has_vision and ("token_embedding.weight" in keys or "text.token_embedding.weight" in keys):
        return "open_clip"
    return "unknown"


_OC_BLOCK = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "ls_1.gamma": "ls1.gamma",
    "ls_2.gamma": "ls2.gamma",
}


def _to_timm_trunk(k: str, v: torch.Tensor) -> dict:
    rest = k[len("visual.") :]
    if rest.startswith("transformer.blocks."):
        return {f"visual.trunk.{rest[len('transformer.') :]}": v}
    if rest.startswith("patch_embed."):
        return {f"visual.trunk.patch_embed.proj.{rest.rsplit('.', 1)[1]}": v}
    if rest == "pos_embed":
        return {"visual.trunk.pos_embed": v.unsqueeze(0)}
    if rest == "cls_token":
        return {"visual.trunk.cls_token": v.reshape(1, 1, -1)}
    if rest == "attn_pool.probe":
        return {"visual.trunk.attn_pool.latent": v.reshape(1, 1, -1)}
    if rest == "proj.weight":
        return {"visual.head.proj.weight": v}
    return {f"visual.trunk.{rest}": v}  # norm_pre, norm, attn_pool.{q,kv,proj,norm,mlp}: the same names


def _rename_block(rest: str, table: dict) -> str | None:
    for src, dst in table.items():
        if rest == src or rest.startswith(src + "."):
            return dst + rest[len(src) :]
    return None


_TIMM_SAME = re.compile(
    r"(?:blocks\.\d+\.(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma"
    r"|attn_pool\.(?:q|kv|proj|norm|mlp\.fc1|mlp\.fc2)\.(?:weight|bias)"
    r"|norm_pre\.(?:weight|bias)|norm\.(?:weight|bias))"
)


def _from_timm_trunk(rest: str, v: torch.Tensor):
    """A timm VisionTransformer tensor (open_clip's TimmModel ``visual.trunk.``) -> (fastclip name, tensor)."""
    if _TIMM_SAME.fullmatch(rest):
        return (f"visual.transformer.{rest}" if rest.startswith("blocks.") else f"visual.{rest}"), v
    if rest in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        return f"visual.patch_embed.{rest.rsplit('.', 1)[1]}", v
    if rest == "pos_embed":  # (1, P, W)
        return "visual.pos_embed", v.reshape(-1, v.shape[-1])
    if rest == "cls_token":  # (1, 1, W)
        return "visual.cls_token", v.reshape(-1)
    if rest == "attn_pool.latent" and v.dim() == 3 and v.shape[1] == 1:  # (1, 1, W): one latent query
        return "visual.attn_pool.probe", v.reshape(1, -1)
    return None, None


def from_open_clip(sd: dict) -> tuple[dict, list]:
    """open_clip / OpenAI names -> fastclip names, including open_clip's timm vision towers
    (``visual.trunk.*``, as in its SigLIP models). Returns (converted, unconverted keys)."""
    out, left = {}, []
    text_prefix = "text." if "text.token_embedding.weight" in sd else ""
    simple = {
        "visual.conv1.weight": "visual.patch_embed.weight",
        "visual.class_embedding": "visual.cls_token",
        "visual.positional_embedding": "visual.pos_embed",
        f"{text_prefix}token_embedding.weight": "text.token_embed.weight",
        f"{text_prefix}positional_embedding": "text.pos_embed",
        f"{text_prefix}text_projection.weight": "text.proj.weight",
        f"{text_prefix}text_projection.bias": "text.proj.bias",
        "logit_scale": "logit_scale",
        "logit_bias": "logit_bias",
    }
    for k, v in sd.items():
        if k.startswith("visual.trunk."):
            new, t = _from_timm_trunk(k[len("visual.trunk.") :], v)
            if new is None:
                left.append(k)
            else:
                out[new] = t
        elif k == "visual.head.proj.weight":  # TimmModel's linear projection
            out["visual.proj.weight"] = v
        elif k in simple:
            out[simple[k]] = v
        elif k == "visual.proj":
            out["visual.proj.weight"] = v.t()  # open_clip: pooled @ proj, (W, E)
        elif k == f"{text_prefix}text_projection":
            out["text.proj.weight"] = v.t()
        elif k.startswith(("visual.ln_pre.", "visual.ln_post.", f"{text_prefix}ln_final.")):
            head, leaf = k.rsplit(".", 1)
            name = {"visual.ln_pre": "visual.norm_pre", "visual.ln_post": "visual.norm"}.get(
                head, "text.norm"
            )
            out[f"{name}.{leaf}"] = v
        elif k in ("attn_mask", f"{text_prefix}attn_mask"):
            continue  # buffer, not a weight
        else:
            m = re.fullmatch(rf"(visual\.|{re.escape(text_prefix)})transformer\.resblocks\.(\d+)\.(.+)", k)
            new = _rename_block(m.group(3), _OC_BLOCK) if m else None
            if new is None:
                left.append(k)
                continue
            tower = "visual" if m.group(1) == "visual." else "text"
            out[f"{tower}.transformer.blocks.{m.group(2)}.{new}"] = v
    return out, left


def to_open_clip(sd: dict, custom_text: bool | None = None) -> dict:
    """fastclip names -> open_clip names. Vision towers without a class token or with an attention-pool
    head are written as open_clip's timm tower (``visual.trunk.*``, as its SigLIP models); the text
    tower goes under ``text.`` (CustomTextCLIP) when ``custom_text`` (default: for SigLIP-style models,
    i.e. a timm vision tower or a text projection with bias)."""
    timm = "visual.attn_pool.probe" in sd or "visual.cls_token" not in sd
    if custom_text is None:
        custom_text = timm or "text.proj.bias" in sd
    tp = "text." if custom_text else ""
    inv_block = {v: k for k, v in _OC_BLOCK.items()}
    out = {}
    for k, v in sd.items():
        if timm and k.startswith("visual."):
            out.update(_to_timm_trunk(k, v))
            continue
        m = re.fullmatch(r"(visual|text)\.transformer\.blocks\.(\d+)\.(.+)", k)
        if m:
            prefix = "visual." if m.group(1) == "visual" else tp
            out[f"{prefix}transformer.resblocks.{m.group(2)}.{_rename_block(m.group(3), inv_block)}"] = v
            continue
        simple = {
            "visual.patch_embed.weight": "visual.conv1.weight",
            "visual.cls_token": "visual.class_embedding",
            "visual.pos_embed": "visual.positional_embedding",
            "text.token_embed.weight": f"{tp}token_embedding.weight",
            "text.pos_embed": f"{tp}positional_embedding",
            "text.proj.bias": f"{tp}text_projection.bias",
            "logit_scale": "logit_scale",
            "logit_bias": "logit_bias",
        }
        if k in simple:
            out[simple[k]] = v
        elif k == "visual.proj.weight":
            out["visual.proj"] = v.t().contiguous()
        elif k == "text.proj.weight":
            if "text.proj.bias" in sd:
                out[f"{tp}text_projection.weight"] = v
            else:
                out[f"{tp}text_projection"] = v.t().contiguous()
        elif k.startswith(("visual.norm_pre.", "visual.norm.", "text.norm.")):
            head, leaf = k.rsplit(".", 1)
            name = {
                "visual.norm_pre": "visual.ln_pre",
                "visual.norm": "visual.ln_post",
                "text.norm": f"{tp}ln_final",
            }
            out[f"{name[head]}.{leaf}"] = v
        else:
            raise ValueError(
                f"state_dict: {k!r} has no open_clip equivalent (e.g. a SigLIP attention-pool head)"
            )
    return out


_HF_BLOCK = {
    "layer_norm1": "norm1",
    "layer_norm2": "norm2",
    "self_attn.out_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def from_hf(sd: dict) -> tuple[dict, list]:
    """Hugging Face CLIPModel / SiglipModel names -> fastclip names. Returns (converted, unconverted keys)."""
    out, left, qkv = {}, [], {}
    simple = {
        "vision_model.embeddings.patch_embedding.weight": "visual.patch_embed.weight",
        "vision_model.embeddings.patch_embedding.bias": "visual.patch_embed.bias",
        "vision_model.embeddings.class_embedding": "visual.cls_token",
        "vision_model.embeddings.position_embedding.weight": "visual.pos_embed",
        "visual_projection.weight": "visual.proj.weight",
        "text_model.embeddings.token_embedding.weight": "text.token_embed.weight",
        "text_model.embeddings.position_embedding.weight": "text.pos_embed",
        "text_projection.weight": "text.proj.weight",
        "text_model.head.weight": "text.proj.weight",
        "text_model.head.bias": "text.proj.bias",
        "vision_model.head.probe": "visual.attn_pool.probe",
        "logit_scale": "logit_scale",
        "logit_bias": "logit_bias",
    }
    norms = {
        "vision_model.pre_layrnorm": "visual.norm_pre",
        "vision_model.post_layernorm": "visual.norm",
        "text_model.final_layer_norm": "text.norm",
        "vision_model.head.layernorm": "visual.attn_pool.norm",
        "vision_model.head.attention.out_proj": "visual.attn_pool.proj",
        "vision_model.head.mlp.fc1": "visual.attn_pool.mlp.fc1",
        "vision_model.head.mlp.fc2": "visual.attn_pool.mlp.fc2",
    }
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v.reshape(1, -1) if k == "vision_model.head.probe" else v
            continue
        head, _, leaf = k.rpartition(".")
        if head in norms:
            out[f"{norms[head]}.{leaf}"] = v
            continue
        if head == "vision_model.head.attention":  # nn.MultiheadAttention in_proj: rows [q; k; v]
            if leaf in ("in_proj_weight", "in_proj_bias"):
                w = v.shape[0] // 3
                kind = leaf.rsplit("_", 1)[1]
                out[f"visual.attn_pool.q.{kind}"] = v[:w]
                out[f"visual.attn_pool.kv.{kind}"] = v[w:]
                continue
        m = re.fullmatch(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)", k)
        if m:
            tower = "visual" if m.group(1) == "vision" else "text"
            base = f"{tower}.transformer.blocks.{m.group(2)}"
            qm = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m.group(3))
            if qm:
                qkv.setdefault((base, qm.group(2)), {})[qm.group(1)] = v
                continue
            new = _rename_block(m.group(3), _HF_BLOCK)
            if new is not None:
                out[f"{base}.{new}"] = v
                continue
        if k.endswith("position_ids"):
            continue  # buffer written by older transformers versions
        left.append(k)
    for (base, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            left.extend(f"{base}: self_attn.{p}_proj.{kind} without its q/k/v siblings" for p in parts)
            continue
        out[f"{base}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out, left


# ----------------------------------------------------------------------------------------------- configs

_HF_ACTS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}


def _hf_act(name: str) -> str:
    if name not in _HF_ACTS:
        raise ValueError(f"config.json: hidden_act {name!r} is not supported (supported: {sorted(_HF_ACTS)})")
    return _HF_ACTS[name]


def _square(name: str, value) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"config.json: {name} must be square, got {value}")
        value = value[0]
    return int(value)


def config_from_hf(cfg: dict) -> ModelConfig:
    """ModelConfig of a Hugging Face CLIPConfig / SiglipConfig dict (config.json)."""
    kind = cfg.get("model_type")
    if kind not in ("clip", "siglip"):
        raise ValueError(f"config.json: expected model_type 'clip' or 'siglip', got {kind!r}")
    siglip = kind == "siglip"
    v, t = dict(cfg.get("vision_config") or {}), dict(cfg.get("text_config") or {})
    act_default = "gelu_pytorch_tanh" if siglip else "quick_gelu"
    eps_default = 1e-6 if siglip else 1e-5
    vw = v.get("hidden_size", 768)
    vision = VisionConfig(
        image_size=_square("vision_config.image_size", v.get("image_size", 224)),
        patch_size=_square("vision_config.patch_size", v.get("patch_size", 16 if siglip else 32)),
        width=vw,
        depth=v.get("num_hidden_layers", 12),
        heads=v.get("num_attention_heads", 12),
        mlp_dim=v.get("intermediate_size", 3072),
        act=_hf_act(v.get("hidden_act", act_default)),
        norm_eps=float(v.get("layer_norm_eps", eps_default)),
        in_channels=v.get("num_channels", 3),
        class_token=not siglip,
        pre_norm=not siglip,
        patch_bias=siglip,
        pool="map" if siglip else "tok",
        proj=not siglip,
        mean=SIGLIP_MEAN if siglip else CLIP_MEAN,
        std=SIGLIP_STD if siglip else CLIP_STD,
        resize_mode="squash" if siglip else "shortest",  # SiglipImageProcessor resizes to the square size
    )
    if siglip and not v.get("vision_use_head", True):
        raise ValueError(
            "config.json: SigLIP vision towers without the attention-pool head are not supported"
        )
    tw = t.get("hidden_size", 768 if siglip else 512)
    eos = t.get("eos_token_id", 49407)
    if isinstance(eos, list):
        eos = eos[0]
    text = TextConfig(
        context_length=t.get("max_position_embeddings", 64 if siglip else 77),
        vocab_size=t.get("vocab_size", 32000 if siglip else 49408),
        width=tw,
        depth=t.get("num_hidden_layers", 12),
        heads=t.get("num_attention_heads", 12 if siglip else 8),
        mlp_dim=t.get("intermediate_size", 3072 if siglip else 2048),
        act=_hf_act(t.get("hidden_act", act_default)),
        norm_eps=float(t.get("layer_norm_eps", eps_default)),
        causal=not siglip,
        # transformers pools CLIP text at the first eos_token_id, or at the argmax id for legacy eos id 2
        pool="last" if siglip else ("argmax" if eos == 2 else "eos"),
        eos_id=None if siglip else eos,
        proj=True,
        proj_bias=siglip,
    )
    embed = vw if siglip else cfg.get("projection_dim", 512)
    if siglip and t.get("projection_size", tw) != vw:
        raise ValueError(
            f"config.json: text projection_size {t.get('projection_size')} must equal the vision width {vw}"
        )
    return ModelConfig(embed_dim=embed, vision=vision, text=text, siglip=siglip)


# PIL resampling codes as preprocessor_config.json stores them ("resample")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}


def preprocess_from_hf(proc: dict) -> dict:
    """VisionConfig fields (mean, std, resize_mode, interpolation) of a Hugging Face image processor
    config: ``size: {"shortest_edge"}`` resizes the shorter side (then centre-crops), ``size:
    {"height", "width"}`` squashes to the size."""
    out: dict = {}
    if "image_mean" in proc and "image_std" in proc:
        out["mean"], out["std"] = tuple(proc["image_mean"]), tuple(proc["image_std"])
    size = proc.get("size")
    if isinstance(size, dict):
        if "shortest_edge" in size:
            out["resize_mode"] = "shortest"
        elif "height" in size and "width" in size:
            out["resize_mode"] = "squash"
    elif isinstance(size, int) and not isinstance(size, bool):  # older feature extractors: one int
        out["resize_mode"] = "shortest" if proc.get("do_center_crop", False) else "squash"
    if proc.get("resample") in _PIL_RESAMPLE:
        out["interpolation"] = _PIL_RESAMPLE[proc["resample"]]
    return out


def infer_open_clip_config(sd: dict) -> ModelConfig:
    """A ModelConfig from open_clip tensor shapes. Heads are assumed to be width / 64 (as open_clip
    assumes) and the activation GELU: pass ``model_name`` or overrides when that is wrong (OpenAI
    weights use QuickGELU). Files with a ``logit_bias`` get SigLIP's text tower (bidirectional, last-token
    pooling, eps 1e-6); timm vision towers (``visual.trunk.*``) SigLIP's vision settings."""
    tp = "text." if "text.token_embedding.weight" in sd else ""
    siglip = "logit_bias" in sd
    try:
        vocab, tw = sd[f"{tp}token_embedding.weight"].shape
        ctx = sd[f"{tp}positional_embedding"].shape[0]
        tdepth = 1 + max(
            int(k[len(f"{tp}transformer.resblocks.") :].split(".")[0])
            for k in sd
            if k.startswith(f"{tp}transformer.resblocks.")
        )
        tmlp = sd[f"{tp}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        if "visual.trunk.patch_embed.proj.weight" in sd:
            vision, embed = _infer_timm_vision(sd)
        else:
            conv = sd["visual.conv1.weight"]
            vw, patch = conv.shape[0], conv.shape[-1]
            grid = int(round(math.sqrt(sd["visual.positional_embedding"].shape[0] - 1)))
            vdepth = 1 + max(
                int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks.")
            )
            vision = VisionConfig(
                image_size=grid * patch,
                patch_size=patch,
                width=vw,
                depth=vdepth,
                heads=max(1, vw // 64),
                mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                ls_init=1e-5 if "visual.transformer.resblocks.0.ls_1.gamma" in sd else None,
            )
            embed = sd["visual.proj"].shape[1]
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"state_dict: cannot infer an open_clip config ({type(exc).__name__}: {exc}); pass model_name"
        ) from exc
    text = TextConfig(
        context_length=ctx,
        vocab_size=vocab,
        width=tw,
        depth=tdepth,
        heads=max(1, tw // 64),
        mlp_dim=tmlp,
        norm_eps=1e-6 if siglip else 1e-5,
        causal=not siglip,
        pool="last" if siglip else "argmax",
        proj_bias=f"{tp}text_projection.bias" in sd,
        ls_init=1e-5 if f"{tp}transformer.resblocks.0.ls_1.gamma" in sd else None,
    )
    return ModelConfig(embed_dim=embed, vision=vision, text=text, siglip=siglip)


def _infer_timm_vision(sd: dict) -> tuple[VisionConfig, int]:
    conv = sd["visual.trunk.patch_embed.proj.weight"]
    vw, patch = conv.shape[0], conv.shape[-1]
    cls = "visual.trunk.cls_token" in sd
    n = sd["visual.trunk.pos_embed"].shape[1] - int(cls)
    grid = int(round(math.sqrt(n)))
    if grid * grid != n:
        raise ValueError(f"visual.trunk.pos_embed: expected a square grid, got {n} positions")
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.trunk.blocks."))
    pool = "map" if "visual.trunk.attn_pool.latent" in sd else ("tok" if cls else "mean")
    proj = "visual.head.proj.weight" in sd
    vision = VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=vw,
        depth=depth,
        heads=max(1, vw // 64),
        mlp_dim=sd["visual.trunk.blocks.0.mlp.fc1.weight"].shape[0],
        act="gelu_tanh",
        norm_eps=1e-6,
        class_token=cls,
        pre_norm="visual.trunk.norm_pre.weight" in sd,
        patch_bias="visual.trunk.patch_embed.proj.bias" in sd,
        pool=pool,
        proj=proj,
        ls_init=1e-5 if "visual.trunk.blocks.0.ls1.gamma" in sd else None,
        mean=SIGLIP_MEAN,
        std=SIGLIP_STD,
    )
    return vision, (sd["visual.head.proj.weight"].shape[0] if proj else vw)
