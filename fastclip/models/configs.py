"""Model configs: three dataclasses and one table of named variants.

    cfg = get_config("ViT-B-16-SigLIP")                 # a ModelConfig (deep copy of the table entry)
    model = create_model("tiny", vocab_size=1000)       # flat overrides of the common fields
    model = create_model("tiny", vision={"depth": 3})   # or nested overrides of any field

Flat override keys (``FLAT_OVERRIDES``): image_size, patch_size, patch_dropout, dynamic_size, in_channels,
context_length, vocab_size, causal, text_pool, eos_id, vision_width, vision_depth, vision_heads, text_width,
text_depth, text_heads, act (both towers), embed_dim, siglip, attn_impl, grad_checkpointing,
init_logit_scale, init_logit_bias.
``vision=`` and ``text=`` take dicts of :class:`VisionConfig` / :class:`TextConfig` fields, and any
:class:`ModelConfig` field name is accepted directly. Unknown keys raise ``ValueError`` with close matches.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from fastclip.models.jsonfile import json_kind

ACTS = ("gelu", "gelu_tanh", "quick_gelu")
ATTN_IMPLS = ("auto", "flash_attn", "xformers", "varlen", "sdpa", "math")
VISION_POOLS = ("tok", "mean", "map")
TEXT_POOLS = ("argmax", "eos", "last", "first")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
# The preprocessing choices of fastclip.transforms.image_transform (kept here so that configs do not import PIL).
RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box")
TOKENIZER_CLEAN = ("none", "whitespace", "lower", "canonicalize")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


# Upper bounds of the size fields: far above any published CLIP/SigLIP (widths up to 6144, 48 layers,
# vocabularies up to 256k), far below sizes whose tensors could not even be described (a width of 10**9
# asks for exabytes). A config from a file is checked against these before anything is allocated.
MAX_SIZES = {
    "width": 1 << 16,
    "mlp_dim": 1 << 18,
    "embed_dim": 1 << 16,
    "depth": 1 << 10,
    "heads": 1 << 12,
    "image_size": 1 << 16,
    "patch_size": 1 << 12,
    "in_channels": 1 << 10,
    "context_length": 1 << 16,
    "vocab_size": 1 << 24,
}


def _pos_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    bound = MAX_SIZES.get(name.rsplit(".", 1)[-1])
    if bound is not None and value > bound:
        raise ValueError(f"{name}: expected a positive int of at most {bound}, got {value!r}")


def _check_width_heads(prefix: str, width: int, heads: int) -> None:
    if width % heads:
        raise ValueError(f"{prefix}.heads: expected a divisor of {prefix}.width={width}, got {heads}")


@dataclass
class VisionConfig:
    """The image tower. ``pool``: "tok" (class token), "mean" (mean of patch tokens), "map" (SigLIP
    attention-pool head). ``mlp_dim`` None means 4·width. ``ls_init`` None disables LayerScale.
    ``dynamic_size``: accept other image sizes (multiples of the patch size) by interpolating the
    position embeddings; off by default so that a wrong size is an error."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int | None = None
    act: str = "gelu"
    norm_eps: float = 1e-5
    in_channels: int = 3
    class_token: bool = True
    pre_norm: bool = True
    patch_bias: bool = False
    qkv_bias: bool = True
    pool: str = "tok"
    proj: bool = True
    ls_init: float | None = None
    patch_dropout: float = 0.0
    dynamic_size: bool = False
    # Preprocessing the weights expect (applied by the data pipeline / fastclip.transforms, not by the
    # model): pixel statistics, eval-time resize ("shortest": resize + centre crop, "squash", "longest")
    # and the resampling filter.
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def __post_init__(self):
        for k in ("image_size", "patch_size", "width", "depth", "heads", "in_channels"):
            _pos_int(f"vision.{k}", getattr(self, k))
        if self.mlp_dim is None:
            self.mlp_dim = 4 * self.width
        _pos_int("vision.mlp_dim", self.mlp_dim)
        _check_width_heads("vision", self.width, self.heads)
        _choice("vision.act", self.act, ACTS)
        _choice("vision.pool", self.pool, VISION_POOLS)
        _choice("vision.resize_mode", self.resize_mode, RESIZE_MODES)
        _choice("vision.interpolation", self.interpolation, INTERPOLATIONS)
        if self.pool == "tok" and not self.class_token:
            raise ValueError("vision.pool: 'tok' needs class_token=True, got class_token=False")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size: expected a multiple of patch_size={self.patch_size}, got {self.image_size}"
            )
        self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels or min(self.std) <= 0:
            raise ValueError(
                f"vision.mean/std: expected {self.in_channels} values each (std > 0), got {self.mean} / {self.std}"
            )
        if not (0.0 <= float(self.patch_dropout) < 1.0):
            raise ValueError(f"vision.patch_dropout: expected a float in [0, 1), got {self.patch_dropout!r}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)


@dataclass
class TextConfig:
    """The text tower. ``pool``: "argmax" (position of the largest id: the end-of-text token, OpenAI
    CLIP), "eos" (first position of ``eos_id``, Hugging Face CLIP), "last", "first". ``causal``:
    causal attention (CLIP) or bidirectional (SigLIP)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_dim: int | None = None
    act: str = "gelu"
    norm_eps: float = 1e-5
    causal: bool = True
    pool: str = "argmax"
    eos_id: int | None = None
    qkv_bias: bool = True
    proj: bool = True
    proj_bias: bool = False
    ls_init: float | None = None
    # Where the tokenizer files live (a Hugging Face Hub repo id, resolved through the local cache) and
    # the text cleaning applied before tokenizing (open_clip's "clean" option); see get_tokenizer.
    tokenizer: str | None = None
    tokenizer_clean: str = "none"

    def __post_init__(self):
        for k in ("context_length", "vocab_size", "width", "depth", "heads"):
            _pos_int(f"text.{k}", getattr(self, k))
        if self.mlp_dim is None:
            self.mlp_dim = 4 * self.width
        _pos_int("text.mlp_dim", self.mlp_dim)
        _check_width_heads("text", self.width, self.heads)
        _choice("text.act", self.act, ACTS)
        _choice("text.pool", self.pool, TEXT_POOLS)
        _choice("text.tokenizer_clean", self.tokenizer_clean, TOKENIZER_CLEAN)
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise TypeError(f"text.tokenizer: expected a hub repo id (str) or None, got {self.tokenizer!r}")
        if self.pool == "eos" and self.eos_id is None:
            raise ValueError("text.eos_id: pool='eos' needs an eos_id, got None")


@dataclass
class ModelConfig:
    """Two towers and the contrastive head. ``siglip`` models have a ``logit_bias``. Defaults of the
    init values follow the papers: CLIP ln(1/0.07); SigLIP ln(10) and bias -10."""

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    siglip: bool = False
    init_logit_scale: float | None = None
    init_logit_bias: float | None = None
    attn_impl: str = "auto"
    grad_checkpointing: bool = False

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        _pos_int("embed_dim", self.embed_dim)
        _choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        if self.init_logit_scale is None:
            self.init_logit_scale = math.log(10.0) if self.siglip else math.log(1 / 0.07)
        if self.siglip and self.init_logit_bias is None:
            self.init_logit_bias = -10.0
        if not self.siglip and self.init_logit_bias is not None:
            raise ValueError(
                f"init_logit_bias: only SigLIP models (siglip=True) have a bias, got {self.init_logit_bias}"
            )
        if not self.vision.proj and self.vision.width != self.embed_dim:
            raise ValueError(
                f"vision.proj: without a projection the vision width must equal embed_dim={self.embed_dim}, "
                f"got width {self.vision.width}"
            )
        if not self.text.proj and self.text.width != self.embed_dim:
            raise ValueError(
                f"text.proj: without a projection the text width must equal embed_dim={self.embed_dim}, "
                f"got width {self.text.width}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise TypeError(f"config: expected a dict, got {type(d).__name__}")
        d = dict(d)
        _reject_unknown("config", d, {f.name for f in dataclasses.fields(cls)})
        for key, sub in (("vision", VisionConfig), ("text", TextConfig)):
            if key in d and isinstance(d[key], dict):
                _reject_unknown(key, d[key], {f.name for f in dataclasses.fields(sub)})
                d[key] = sub(**d[key])
        return cls(**d)


# The fields that decide a model's tensors and its computation: a fastclip config read from a file must
# carry every one of them (a default would build another model and blame the weights). The others
# (preprocessing, tokenizer, training switches) have defaults that older files rely on.
ARCHITECTURE_FIELDS = {
    "": ("embed_dim", "siglip", "vision", "text"),
    "vision": (
        "image_size", "patch_size", "width", "depth", "heads", "mlp_dim", "act", "norm_eps", "in_channels",
        "class_token", "pre_norm", "patch_bias", "qkv_bias", "pool", "proj", "ls_init",
    ),
    "text": (
        "context_length", "vocab_size", "width", "depth", "heads", "mlp_dim", "act", "norm_eps", "causal",
        "pool", "eos_id", "qkv_bias", "proj", "proj_bias", "ls_init",
    ),
}  # fmt: skip


def config_from_file_dict(d, where: str) -> ModelConfig:
    """A :class:`ModelConfig` from a fastclip config dict read from a file (``where`` names the file, or
    the file and its metadata key, in every error): every architecture field present, every value valid
    and within :data:`~fastclip.models.configs.MAX_SIZES`."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a fastclip model config (a JSON object), got {json_kind(d)}")
    missing = []
    for section, names in ARCHITECTURE_FIELDS.items():
        sub = d if not section else d.get(section)
        if section and not isinstance(sub, dict):
            continue  # reported as the missing (or wrong) section itself
        missing += [f"{section + '.' if section else ''}{n}" for n in names if n not in sub]
    for section in ("vision", "text"):
        if section in d and not isinstance(d[section], dict):
            raise ValueError(f"{where}: key {section!r}: expected an object, got {json_kind(d[section])}")
    if missing:
        raise ValueError(
            f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)} (a fastclip model "
            "config names every architecture field; save_fastclip and the trainer write them all)"
        )
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


def _reject_unknown(where: str, given: dict, known) -> None:
    known = sorted(known)
    for k in given:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"{where}: unknown key {k!r}{hint}")


# ----------------------------------------------------------------------------------------------- table


def _clip(embed, v_width, v_depth, v_heads, patch, t_width, t_depth, t_heads, image=224, act="gelu"):
    return ModelConfig(
        embed_dim=embed,
        vision=VisionConfig(
            image_size=image, patch_size=patch, width=v_width, depth=v_depth, heads=v_heads, act=act
        ),
        # Every OpenAI-vocabulary CLIP shares this BPE tokenizer (49408 tokens, context 77).
        text=TextConfig(
            width=t_width, depth=t_depth, heads=t_heads, act=act,
            tokenizer="openai/clip-vit-base-patch32", tokenizer_clean="whitespace",
        ),
    )  # fmt: skip


def _siglip_vision(image, patch, width, depth, heads, mlp_dim=None):
    return VisionConfig(
        image_size=image, patch_size=patch, width=width, depth=depth, heads=heads, mlp_dim=mlp_dim,
        act="gelu_tanh", norm_eps=1e-6, class_token=False, pre_norm=False, patch_bias=True, pool="map", proj=False,
        mean=SIGLIP_MEAN, std=SIGLIP_STD, resize_mode="squash",
    )  # fmt: skip


def _siglip_text(context, vocab, width, depth, heads, mlp_dim=None, tokenizer="timm/ViT-B-16-SigLIP"):
    # The tokenizer files as open_clip publishes them (SentencePiece vocabulary in tokenizer.json);
    # open_clip canonicalizes the text first (lower case, punctuation removed), as big_vision does.
    return TextConfig(
        context_length=context, vocab_size=vocab, width=width, depth=depth, heads=heads, mlp_dim=mlp_dim,
        act="gelu_tanh", norm_eps=1e-6, causal=False, pool="last", proj=True, proj_bias=True,
        tokenizer=tokenizer, tokenizer_clean="canonicalize",
    )  # fmt: skip


def _tiny(siglip: bool) -> ModelConfig:
    # Small enough to train a few hundred steps a minute on 2 CPU cores at 32x32 (65 tokens per image).
    if siglip:
        vision = _siglip_vision(32, 4, 96, 2, 4)
        text = _siglip_text(16, 512, 96, 2, 4, tokenizer=None)
        text.pool = "argmax"  # synthetic captions are padded; EOT pooling keeps padding out of the feature
        return ModelConfig(embed_dim=96, vision=vision, text=text, siglip=True)
    return ModelConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=4, width=96, depth=2, heads=4),
        text=TextConfig(context_length=16, vocab_size=512, width=96, depth=2, heads=4),
    )


def _quick(cfg: ModelConfig) -> ModelConfig:
    cfg.vision.act = cfg.text.act = "quick_gelu"
    return cfg


MODEL_CONFIGS: dict[str, Any] = {
    "tiny": lambda: _tiny(False),
    "tiny-siglip": lambda: _tiny(True),
    "ViT-B-32": lambda: _clip(512, 768, 12, 12, 32, 512, 12, 8),
    "ViT-B-16": lambda: _clip(512, 768, 12, 12, 16, 512, 12, 8),
    "ViT-L-14": lambda: _clip(768, 1024, 24, 16, 14, 768, 12, 12),
    "ViT-L-14-336": lambda: _clip(768, 1024, 24, 16, 14, 768, 12, 12, image=336),
    # OpenAI's released weights were trained with QuickGELU.
    "ViT-B-32-quickgelu": lambda: _quick(_clip(512, 768, 12, 12, 32, 512, 12, 8)),
    "ViT-B-16-quickgelu": lambda: _quick(_clip(512, 768, 12, 12, 16, 512, 12, 8)),
    "ViT-L-14-quickgelu": lambda: _quick(_clip(768, 1024, 24, 16, 14, 768, 12, 12)),
    "ViT-B-16-SigLIP": lambda: ModelConfig(
        embed_dim=768,
        vision=_siglip_vision(224, 16, 768, 12, 12),
        text=_siglip_text(64, 32000, 768, 12, 12),
        siglip=True,
    ),  # fmt: skip
    "ViT-B-16-SigLIP-384": lambda: ModelConfig(
        embed_dim=768,
        vision=_siglip_vision(384, 16, 768, 12, 12),
        text=_siglip_text(64, 32000, 768, 12, 12),
        siglip=True,
    ),  # fmt: skip
    "ViT-SO400M-14-SigLIP": lambda: ModelConfig(
        embed_dim=1152,
        vision=_siglip_vision(224, 14, 1152, 27, 16, mlp_dim=4304),
        text=_siglip_text(16, 32000, 1152, 27, 16, mlp_dim=4304, tokenizer="timm/ViT-SO400M-14-SigLIP"),
        siglip=True,
    ),
}

# flat override key -> (section, field); section None is the ModelConfig itself.
FLAT_OVERRIDES = {
    "image_size": ("vision", "image_size"),
    "patch_size": ("vision", "patch_size"),
    "patch_dropout": ("vision", "patch_dropout"),
    "dynamic_size": ("vision", "dynamic_size"),
    "in_channels": ("vision", "in_channels"),
    "vision_width": ("vision", "width"),
    "vision_depth": ("vision", "depth"),
    "vision_heads": ("vision", "heads"),
    "context_length": ("text", "context_length"),
    "vocab_size": ("text", "vocab_size"),
    "causal": ("text", "causal"),
    "text_pool": ("text", "pool"),
    "eos_id": ("text", "eos_id"),
    "text_width": ("text", "width"),
    "text_depth": ("text", "depth"),
    "text_heads": ("text", "heads"),
}
_TOP_FIELDS = (
    "embed_dim",
    "siglip",
    "init_logit_scale",
    "init_logit_bias",
    "attn_impl",
    "grad_checkpointing",
)


def list_models() -> list[str]:
    """Names of the built-in configs, sorted."""
    return sorted(MODEL_CONFIGS)


def get_config(name: str, **overrides) -> ModelConfig:
    """The named :class:`ModelConfig` with ``overrides`` applied (see the module docstring)."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model name (str), got {type(name).__name__}")
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, list(MODEL_CONFIGS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"name: unknown model {name!r}{hint} (available: {', '.join(list_models())})")
    return apply_overrides(MODEL_CONFIGS[name](), **overrides)


def apply_overrides(cfg: ModelConfig, **overrides) -> ModelConfig:
    """A copy of ``cfg`` with flat, nested (``vision=``/``text=`` dicts) or top-level overrides applied;
    the result is validated again."""
    d = copy.deepcopy(cfg.to_dict())
    known = sorted(set(FLAT_OVERRIDES) | set(_TOP_FIELDS) | {"vision", "text", "act"})
    for key, value in overrides.items():
        if key in ("vision", "text"):
            if not isinstance(value, dict):
                raise TypeError(f"{key}: expected a dict of {key} config fields, got {type(value).__name__}")
            _reject_unknown(key, value, d[key].keys())
            d[key].update(value)
        elif key in FLAT_OVERRIDES:
            section, fld = FLAT_OVERRIDES[key]
            d[section][fld] = value
        elif key in _TOP_FIELDS:
            d[key] = value
        elif key == "act":  # both towers
            d["vision"]["act"] = d["text"]["act"] = value
        else:
            _reject_unknown("create_model", {key: value}, known)
    vis = overrides.get("vision", {})
    n_ch = d["vision"]["in_channels"]
    if n_ch != len(d["vision"]["mean"]) and "mean" not in vis and "std" not in vis:
        d["vision"]["mean"], d["vision"]["std"] = (
            (0.5,) * n_ch,
            (0.5,) * n_ch,
        )  # neutral stats for other channel counts
    # A width change must not keep a stale 4·width MLP: recompute mlp_dim unless it was given.
    for section, sub in (("vision", overrides.get("vision", {})), ("text", overrides.get("text", {}))):
        width_changed = d[section]["width"] != getattr(cfg, section).width
        if (
            width_changed
            and "mlp_dim" not in sub
            and getattr(cfg, section).mlp_dim == 4 * getattr(cfg, section).width
        ):
            d[section]["mlp_dim"] = None
    if d["siglip"] is False and "siglip" in overrides:
        d["init_logit_bias"] = overrides.get("init_logit_bias")
    if "siglip" in overrides and "init_logit_scale" not in overrides:
        d["init_logit_scale"] = None
    return ModelConfig.from_dict(d)
