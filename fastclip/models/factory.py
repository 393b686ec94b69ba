"""open_clip-style entry points: model + preprocessing, tokenizers, what is available locally.

    model, preprocess_train, preprocess_val = create_model_and_transforms("hf-hub:org/name")
    model, preprocess = create_model_from_pretrained("ViT-B-32-quickgelu", pretrained="b32.safetensors")
    tokenizer = get_tokenizer("hf-hub:org/name")          # list[str] -> LongTensor (n, context_length)
    list_pretrained()                                      # cached hub models, then the named configs

``name_or_id`` is a named config (``list_models()``), a hub id (``"hf-hub:org/name[@rev]"``, or a plain
``"org/name"`` that is not a local path) or a local path (anything ``load_pretrained`` reads).
Preprocessing comes from the model config (``config.vision``: image size, mean/std, resize mode,
interpolation) through :func:`fastclip.transforms.image_transform`, the transform the trainer uses.
"""

from __future__ import annotations

import difflib
import os

import torch

from fastclip.models.configs import MODEL_CONFIGS, ModelConfig, get_config, list_models
from fastclip.models.hub import (
    HF_CONFIG,
    OPEN_CLIP_CONFIG,
    HubError,
    HubId,
    list_cached_models,
    parse_hub_id,
    resolve_repo,
    resolve_tokenizer_repo,
)
from fastclip.models.model import CLIP
from fastclip.models.tokenizer import HFTokenizer, has_word_vocab, load_word_tokenizer

# open_clip's precision names -> the dtype of the weights ("amp*" keep float32 weights for autocast)
PRECISIONS = {
    "fp32": torch.float32,
    "amp": torch.float32,
    "amp_bf16": torch.float32,
    "amp_bfloat16": torch.float32,
    "bf16": torch.bfloat16,
    "pure_bf16": torch.bfloat16,
    "fp16": torch.float16,
    "pure_fp16": torch.float16,
}


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(
        f"name_or_id: expected a model name ({', '.join(list_models())}), a hub id 'hf-hub:org/name' or an "
        f"existing local path, got {name!r}{hint}"
    )


def _build(name_or_id, pretrained, precision, device, attn_impl, overrides) -> CLIP:
    if not isinstance(name_or_id, (str, os.PathLike)):
        raise TypeError(
            f"name_or_id: expected a model name, hub id or path (str), got {type(name_or_id).__name__}"
        )
    name = os.fspath(name_or_id)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {tuple(PRECISIONS)}, got {precision!r}")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device: expected a str or torch.device, got {type(device).__name__}")
    if pretrained is not None and not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(
            f"pretrained: expected a path or hub id (str) or None, got {type(pretrained).__name__}"
        )
    from fastclip.models.pretrained import load_pretrained

    overrides = {"attn_impl": attn_impl, **overrides}
    if name in MODEL_CONFIGS:
        if pretrained is None:
            model = CLIP(get_config(name, **overrides))
        else:
            pre = os.fspath(pretrained)
            if parse_hub_id(pre) is None and not os.path.exists(pre):
                raise ValueError(
                    "pretrained: expected a local weights file or directory or a hub id 'hf-hub:org/name', got "
                    f"{pre!r} (fastclip has no table of open_clip's pretrained tags: name the hub repo instead)"
                )
            model = load_pretrained(pre, name, **overrides)
    else:
        if parse_hub_id(name) is None and not os.path.exists(name):
            raise _unknown(name)
        if pretrained is not None:
            raise ValueError(
                f"pretrained: {name!r} carries its own weights; expected pretrained=None, got {pretrained!r}"
            )
        model = load_pretrained(name, **overrides)
    return model.to(device=device, dtype=PRECISIONS[precision])


def image_transforms(config: ModelConfig):
    """(train, val) image transforms of a model config: random resized crop for training; the
    config's resize mode for evaluation; the config's mean/std and interpolation for both."""
    from fastclip.transforms import image_transform

    if not isinstance(config, ModelConfig):
        raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
    v = config.vision
    kw = dict(mean=v.mean, std=v.std, interpolation=v.interpolation)
    train = image_transform(v.image_size, is_train=True, **kw)
    val = image_transform(v.image_size, is_train=False, resize_mode=v.resize_mode, **kw)
    return train, val


def create_model_and_transforms(
    name_or_id,
    pretrained=None,
    *,
    precision: str = "fp32",
    device="cpu",
    attn_impl: str = "auto",
    **overrides,
):
    """``(model, preprocess_train, preprocess_val)``, as open_clip's function of the same name.

    ``name_or_id``: a named config (random init unless ``pretrained`` is given: a local weights
    file/directory or a hub id loaded into that config), a hub id ``"hf-hub:org/name"`` (open_clip or
    transformers CLIP/SigLIP repo; its config, weights and preprocessing) or a local path.
    ``precision``: "fp32", "amp", "amp_bf16" (float32 weights), "bf16"/"pure_bf16", "fp16"/"pure_fp16"
    (weights cast). ``overrides``: config overrides as in ``create_model`` (e.g. ``grad_checkpointing=True``).
    The preprocess callables map a PIL image to a normalized ``(3, S, S)`` float32 tensor.
    """
    model = _build(name_or_id, pretrained, precision, device, attn_impl, overrides)
    train, val = image_transforms(model.config)
    return model, train, val


def create_model_from_pretrained(
    name_or_id,
    pretrained=None,
    *,
    precision: str = "fp32",
    device="cpu",
    attn_impl: str = "auto",
    **overrides,
):
    """``(model, preprocess_val)`` of pretrained weights: a hub id or local path, or a named config
    with ``pretrained=`` weights (a named config alone has no weights and is refused)."""
    if isinstance(name_or_id, str) and name_or_id in MODEL_CONFIGS and pretrained is None:
        raise ValueError(
            f"pretrained: {name_or_id!r} is a config without weights; pass pretrained= (a weights path or hub id) "
            "or use create_model_and_transforms for a randomly initialized model"
        )
    model = _build(name_or_id, pretrained, precision, device, attn_impl, overrides)
    return model, image_transforms(model.config)[1]


def _has_tokenizer_files(directory: str) -> bool:
    names = set(os.listdir(directory))
    return bool({"tokenizer.json", "spiece.model"} & names) or {"vocab.json", "merges.txt"} <= names


def _text_settings(directory: str) -> dict:
    """context_length, tokenizer (another repo holding the files) and clean mode of a model directory."""
    from fastclip.models.jsonfile import read_json_object
    from fastclip.models.layouts import config_from_hf
    from fastclip.models.openclip_format import read_open_clip_json, text_settings

    if os.path.isfile(os.path.join(directory, OPEN_CLIP_CONFIG)):
        return text_settings(read_open_clip_json(os.path.join(directory, OPEN_CLIP_CONFIG)))
    if os.path.isfile(os.path.join(directory, HF_CONFIG)):
        cfg_file = os.path.join(directory, HF_CONFIG)
        try:
            text = config_from_hf(read_json_object(cfg_file, "a Hugging Face model config")).text
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{cfg_file}: not a CLIP/SigLIP config ({type(exc).__name__}: {exc})") from exc
        return {"context_length": text.context_length, "tokenizer": None, "tokenizer_clean": "none"}
    return {"context_length": 77, "tokenizer": None, "tokenizer_clean": "none"}


def get_tokenizer(name_or_id, context_length: int | None = None) -> HFTokenizer:
    """A callable ``list[str] -> LongTensor (n, context_length)`` matching the model's text tower:
    the repo's (or the named config's) tokenizer, padded to the context length with its pad id and
    truncated with the end token kept last; ``context_length`` defaults to the model's.

    Named configs take their tokenizer files from the hub repo in ``config.text.tokenizer`` (through
    the local Hugging Face cache); hub ids and local directories use their own tokenizer files, or the
    repo open_clip's ``hf_tokenizer_name`` names. Text is cleaned first as open_clip does for that
    model (``config.text.tokenizer_clean``); transformers repos get exactly their tokenizer's ids.
    The output directory of a ``fastclip train`` run with a word vocabulary (``vocab.txt``, synthetic or
    CSV data) gives that run's :class:`~fastclip.models.WordTokenizer`.
    """
    if not isinstance(name_or_id, (str, os.PathLike)):
        raise TypeError(
            f"name_or_id: expected a model name, hub id or path (str), got {type(name_or_id).__name__}"
        )
    if context_length is not None and (
        isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1
    ):
        raise ValueError(f"context_length: expected a positive int or None, got {context_length!r}")
    name = os.fspath(name_or_id)
    if name in MODEL_CONFIGS:
        text = get_config(name).text
        if text.tokenizer is None:
            raise ValueError(
                f"name_or_id: {name!r} has no tokenizer files (it is made for synthetic captions); use "
                f"fastclip.models.WordTokenizer(words, context_length={text.context_length})"
            )
        try:
            directory = resolve_tokenizer_repo(HubId(text.tokenizer, None))
        except HubError as exc:
            raise HubError(
                f"get_tokenizer({name!r}): {name}'s tokenizer files come from the hub repo {text.tokenizer} and are "
                f"not available here. {exc} Or save them in a directory and call "
                f"fastclip.models.load_tokenizer(directory, context_length={text.context_length})."
            ) from exc
        return HFTokenizer(directory, context_length or text.context_length, clean=text.tokenizer_clean)
    hub = parse_hub_id(name)
    if hub is not None:
        directory = resolve_repo(hub, weights=False, tokenizer=True)
    elif os.path.isdir(name):
        directory = name
    else:
        raise _unknown(name)
    if not _has_tokenizer_files(directory) and has_word_vocab(directory):  # a fastclip train run (vocab.txt)
        return load_word_tokenizer(directory, context_length)
    settings = _text_settings(directory)
    if not _has_tokenizer_files(directory):
        other = parse_hub_id(f"hf-hub:{settings['tokenizer']}") if settings["tokenizer"] else None
        if other is None:
            raise ValueError(
                f"name_or_id: {name!r} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt, or "
                f"spiece.model) in {directory} and its config names no tokenizer repo"
            )
        directory = resolve_tokenizer_repo(other)
    return HFTokenizer(
        directory, context_length or settings["context_length"], clean=settings["tokenizer_clean"]
    )


def list_pretrained() -> list[str]:
    """What resolves without a download: ``"hf-hub:org/name"`` of the CLIP/SigLIP model repos in the local
    Hugging Face cache (config and weights present), then the named configs (``list_models()``; these
    are randomly initialized unless given ``pretrained=`` weights)."""
    return [*list_cached_models(), *list_models()]
