"""The model, its tokenizer and the loss, from the run's config.

tokenizer, model = build_model(cfg, out_dir, rank)          # or the caller's model/tokenizer
loss_fn = build_loss(cfg, model, rank, world)              # fastclip.ClipLoss / SigLipLoss / FamilyLoss
"""

from __future__ import annotations

import difflib
import os
import re

from fastclip.data.table import read_extra_columns
from fastclip.train import data as data_lib
from fastclip.train.config import ConfigError, check_dist_impl


def resolved_overrides(mc) -> dict:
    """``model.overrides``, with None resolved: the demo's patch size for the tiny models, else nothing."""
    if mc.overrides is not None:
        return mc.overrides
    return {"patch_size": 8} if mc.name in ("tiny", "tiny-siglip") else {}


def check_model_name(name: str) -> None:
    from fastclip.models import list_models

    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(
            f"model.name: unknown model {name!r}{hint}; fastclip.models.list_models() has {len(names)} names"
        )


def build_model(cfg, out_dir: str, rank: int, model=None, tokenizer=None):
    """(tokenizer, model). The model's vocab_size follows the tokenizer unless overridden."""
    from fastclip.models import WordTokenizer, create_model, get_config

    mc, dc = cfg.model, cfg.data
    overrides = dict(resolved_overrides(mc))
    if model is not None:
        context = model.config.text.context_length
    else:
        check_model_name(mc.name)
        context = _model_call("model.overrides", get_config, mc.name, **overrides).text.context_length
    if tokenizer is None:
        if dc.tokenizer not in ("auto", "words"):
            tokenizer = _load_tokenizer(dc.tokenizer, context)
        elif dc.kind == "synthetic":
            tokenizer = WordTokenizer(data_lib.SyntheticShapes(8).vocabulary(), context_length=context)
        elif dc.kind == "csv":
            _, captions, _ = data_lib.read_table(
                dc.train, dc.image_key, dc.caption_key, None, dc.delimiter, dc.root
            )
            extra = " ".join(
                (cfg.eval.templates or []) + (data_lib.read_classnames(cfg.eval.classnames) or [])
            )
            negatives, _ = read_extra_columns(dc.train, dc.negative_keys, None, dc.delimiter)
            negative_texts = [t for row in negatives or [] for t in row]
            tokenizer = WordTokenizer(_words(captions + negative_texts + [extra]), context_length=context)
        else:
            raise ConfigError(
                "data.tokenizer: webdataset data needs a tokenizer: expected the path of a Hugging Face "
                "tokenizer directory or tokenizer.json, a hub id (hf-hub:org/name) or a model name with "
                f"tokenizer files, got {dc.tokenizer!r}"
            )
    vocab = getattr(tokenizer, "vocab_size", None)
    if model is None:
        if vocab is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = int(vocab)
        model = _model_call("model.overrides", create_model, mc.name, **overrides)
    if vocab is not None and vocab > model.config.text.vocab_size:
        raise ConfigError(
            f"model.overrides.vocab_size: expected >= the tokenizer's {vocab} tokens, "
            f"got {model.config.text.vocab_size}"
        )
    return tokenizer, model  # a word tokenizer's vocab.txt is written with the run files (rundir)


def _model_call(key: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as exc:  # fastclip.models validates names and override keys with ValueError
        raise ConfigError(f"{key}: {exc}") from None


class FamilyLoss:
    """model.loss "info_nce": CLIP's symmetric softmax on the contrastive family's core (NegCLIP with
    hard negatives): ``fastclip.info_nce_loss(image_features, text_features, negative_features,
    similarity="dot", scale=logit_scale, directions=("query_to_doc", "doc_to_query"),
    partition="per_direction")``, with ids the duplicate mask of ``model.duplicates``. Without negatives
    or ids it equals ``fastclip.clip_loss``. Several ranks: ``info_nce_loss_distributed`` with
    ``model.dist_impl`` ("gather" by default, or "ring"), this rank's rows against every rank's columns.

    ``loss(image_features, text_features, logit_scale, negative_features=None, ids=None)``: ``ids`` is
    (b,) (the samples' ids) or (b, 1 + K) (column 0 the sample's, then its negatives' ids)."""

    def __init__(self, cfg, world: int):
        from fastclip import InfoNCELoss

        mc = cfg.model
        self.k, self.duplicates = int(mc.hard_negatives), mc.duplicates
        try:
            self.loss = InfoNCELoss(
                similarity="dot", directions=("query_to_doc", "doc_to_query"), partition="per_direction",
                hardness=mc.hardness, hardness_strength=float(mc.hardness_strength),
                duplicates=mc.duplicates or "ignore", distributed=world > 1, dist_impl=mc.dist_impl or "gather",
                impl=mc.loss_impl,
            )  # fmt: skip
        except ValueError as exc:  # e.g. loss_impl "reference" across ranks
            where = f" with {world} processes" if world > 1 else ""
            raise ConfigError(f"model.loss_impl: {exc}{where}") from None

    def __call__(self, image_features, text_features, logit_scale, negative_features=None, ids=None):
        if (negative_features is None) != (self.k == 0) or (
            negative_features is not None and negative_features.shape[1] != self.k
        ):
            got = None if negative_features is None else tuple(negative_features.shape)
            raise ValueError(
                f"negative_features: expected (B, {self.k}, D) for model.hard_negatives {self.k}, got {got}"
            )
        kw = {}
        if self.duplicates is not None:
            if ids is None:
                raise ValueError(f"ids: model.duplicates {self.duplicates!r} needs the batch's ids, got None")
            if ids.dim() == 2:
                kw["query_ids"] = ids[:, 0]
                if self.k and ids.shape[1] == 1 + self.k:
                    kw["negative_ids"] = ids[:, 1:]
            else:
                kw["query_ids"] = ids
        return self.loss(image_features, text_features, negative_features, scale=logit_scale, **kw)


def build_loss(cfg, model, rank: int, world: int):
    """(loss, kind): ``fastclip.ClipLoss``/``SigLipLoss``, or :class:`FamilyLoss` for "info_nce";
    across ranks with ``model.dist_impl``."""
    from fastclip import ClipLoss, SigLipLoss

    kind = cfg.model.loss
    siglip = getattr(model, "logit_bias", None) is not None
    if kind == "auto":
        kind = "siglip" if siglip else "clip"
    if kind in ("clip", "info_nce") and siglip:  # one rule for both softmax losses
        raise ConfigError(
            f"model.loss: {kind!r} is a softmax loss and would leave the logit_bias of "
            f"{cfg.model.name!r} untrained; use model.loss 'siglip' (or 'auto') with it, or a CLIP model"
        )
    if kind == "info_nce":
        if cfg.model.dist_impl is not None:
            check_dist_impl(kind, cfg.model.dist_impl)
        return FamilyLoss(cfg, world), kind
    if kind == "siglip" and not siglip:
        raise ConfigError(
            f"model.loss: 'siglip' needs a model with a logit_bias ({cfg.model.name!r} has none)"
        )
    impl, dist_impl = cfg.model.loss_impl, cfg.model.dist_impl
    if dist_impl is not None:
        check_dist_impl(kind, dist_impl)  # also with one process, where no strategy is used
    if world == 1:
        return (ClipLoss(impl=impl) if kind == "clip" else SigLipLoss(impl=impl)), kind
    kw = {"dist_impl": dist_impl} if dist_impl else {}
    if kind == "clip":
        loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world, impl=impl, **kw)
    else:
        loss = SigLipLoss(rank=rank, world_size=world, impl=impl, **kw)
    return loss, kind


def _words(texts) -> list[str]:
    seen = {}
    for t in texts:
        for w in re.findall(r"[a-z0-9']+|[^\sa-z0-9']", t.lower()):
            seen[w] = seen.get(w, 0) + 1
    return sorted(seen, key=lambda w: (-seen[w], w))


def _load_tokenizer(spec: str, context: int):
    """``data.tokenizer``: a local tokenizer directory / tokenizer.json, else a hub id or a named config
    resolved by ``fastclip.get_tokenizer`` (through the local Hugging Face cache)."""
    from fastclip.models import get_tokenizer, load_tokenizer

    try:
        if os.path.exists(spec):
            return load_tokenizer(spec, context_length=context)
        return get_tokenizer(spec, context_length=context)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
