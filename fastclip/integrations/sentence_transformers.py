"""sentence-transformers' in-batch-negatives losses with fastclip's fused loss stage: one import line.

    # from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from fastclip.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss

Classes (sentence-transformers' names, constructor signatures, defaults, validation and meanings):
``MultipleNegativesRankingLoss``, ``MultipleNegativesSymmetricRankingLoss``,
``CachedMultipleNegativesRankingLoss``, ``CachedMultipleNegativesSymmetricRankingLoss``,
``GISTEmbedLoss`` and ``CachedGISTEmbedLoss``.

How: each class subclasses sentence-transformers' own class, so the embedding passes (merged column
forwards, the cached losses' mini-batches, RNG replay of dropout, the backward hook, DDP handling),
``get_config_dict``, ``citation``, ``temperature``, the model card and the ``MatryoshkaLoss`` /
``AdaptiveLayerLoss`` wrappers all run sentence-transformers' code. Only the loss maths is replaced:

* ``compute_loss_from_embeddings`` (MNRL) and ``calculate_loss`` (the cached losses: the whole cached
  batch in ONE fused call instead of ``mini_batch_size`` row chunks of a materialized
  mini_batch x N score matrix, a second chunk loop and a backward per chunk) call
  :func:`fastclip.info_nce_loss` / :func:`fastclip.gist_loss`, which never build the n x N scores.
* ``MatryoshkaLoss`` decorates the model's forward (uncached losses) or ``calculate_loss`` (cached
  ones); both land in the fused call at every dimension.
* ``similarity_fct``: sentence-transformers' ``cos_sim`` -> ``similarity="cos"``, ``dot_score`` ->
  ``"dot"``; any other callable runs sentence-transformers' own (materialized) computation, with a
  warning once per class and function.
* ``gather_across_devices=True`` with an initialized process group ->
  :mod:`fastclip.distributed` (each rank's rows against every rank's columns, in
  sentence-transformers' column order and rank offset; gradients flow back to each rank). The
  attribute ``dist_impl`` (default ``"gather"``) passes the core's ``dist_impl`` on: ``"ring"``
  passes the columns around a ring, never all ranks' embeddings at once. ``impl`` chooses the
  core's implementation (``"auto"``, ``"torch"``, ``"triton"``).
* GIST's self columns (an anchor against itself in the anchor->anchor block, a positive against itself
  in the positive->positive block) are always removed, as sentence-transformers 6.x does; 5.7 removed
  them only where the guide's threshold did (they differ when an anchor's text is its positive's or
  ``margin < 0``): the fused loss follows 6.x whichever version is installed.
* The cached classes check ``mini_batch_size`` when it is set (at construction): a positive int, else
  one ``ValueError`` naming it (sentence-transformers' own classes take 0, -1, 2.5 or None and fail
  at the first forward inside Python). ``contrast_anchors`` / ``contrast_positives`` are read by
  truthiness and a repeated direction counts once, as sentence-transformers does.
* Under DeepSpeed (the loss's model a ``DeepSpeedEngine``, as ``SentenceTransformerTrainer`` with
  ``deepspeed=`` makes it), the cached classes hand their gradient to the model in the trainer's one
  backward instead of sentence-transformers' hook, which back-propagates once per mini-batch and stops
  ZeRO-2/3 at the first step ("Gradient computed twice"): attribute ``gradcache_backward``,
  :mod:`fastclip.integrations._st_gradcache`, docs/sentence_transformers_deepspeed.md.
* ``MultipleNegativesSymmetricRankingLoss`` and its cached form are deprecated in
  sentence-transformers 6 (``MultipleNegativesRankingLoss(directions=("query_to_doc",
  "doc_to_query"), partition_mode="per_direction")`` instead); here they are kept without the
  deprecation warning, as the same MNRL configuration.

Requires sentence-transformers >= 5.7 (``pip install 'fastclip-contrastive[st]'``); ``import fastclip`` never
imports it, importing this module without it raises one ImportError saying so.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from fastclip.integrations import _st_gradcache as _gradcache

try:
    from sentence_transformers import util as _st_util
    from sentence_transformers.sentence_transformer.losses import (
        CachedGISTEmbedLoss as _STCachedGISTEmbedLoss,
    )
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss as _STCachedMNRL,
    )
    from sentence_transformers.sentence_transformer.losses import GISTEmbedLoss as _STGISTEmbedLoss
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss as _STMNRL,
    )
except ImportError as _exc:  # pragma: no cover - exercised by a subprocess test
    if (getattr(_exc, "name", None) or "").split(".")[0] == "sentence_transformers":
        raise ImportError(
            "fastclip.integrations.sentence_transformers needs sentence-transformers >= 5.7 "
            f"(import failed: {_exc}); install it with: pip install 'fastclip-contrastive[st]'"
        ) from _exc
    # sentence-transformers is there but one of its own imports failed: say that, not "missing".
    raise ImportError(
        f"fastclip.integrations.sentence_transformers: sentence-transformers is installed but failed to "
        f"import: {type(_exc).__name__}: {_exc}"
    ) from _exc

try:  # sentence-transformers >= 6: the columns share one merged forward where they can
    from sentence_transformers.base.losses.merged_forward import embed_columns as _embed_columns
except ImportError:  # 5.7: one forward per column

    def _embed_columns(model, features_list):
        return [model(features)["sentence_embedding"] for features in features_list]


__all__ = [
    "CachedGISTEmbedLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]

_FUSED_SIMILARITIES = {_st_util.cos_sim: "cos", _st_util.dot_score: "dot"}
_WARNED: set[tuple[str, str]] = set()


def _similarity_name(fn) -> str | None:
    """``"cos"`` / ``"dot"`` for sentence-transformers' ``cos_sim`` / ``dot_score``, else None."""
    try:
        return _FUSED_SIMILARITIES.get(fn)
    except TypeError:  # an unhashable callable
        return None


def _fct_name(fn) -> str:
    """sentence-transformers 6's ``util.similarity_fct_name`` (5.7 has none: the callable's name)."""
    named = getattr(_st_util, "similarity_fct_name", None)
    if named is not None:
        return named(fn)
    return getattr(fn, "__name__", type(fn).__name__)


def _warn_fallback(loss: Any, fn) -> None:
    key = (type(loss).__name__, _fct_name(fn))
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"{key[0]}: similarity_fct={key[1]} is neither sentence_transformers.util.cos_sim nor dot_score, so "
        "the loss runs sentence-transformers' own materialized computation (no fused loss stage). "
        "Use cos_sim or dot_score for fastclip's fused path.",
        UserWarning,
        stacklevel=3,
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class _FusedOptions:
    """fastclip-only settings, as class attributes so that constructor signatures stay ST's own.

    ``impl``: the core's implementation (``"auto"``, ``"torch"``, ``"triton"``, ``"reference"``);
    ``dist_impl``: with ``gather_across_devices=True``, one of ``fastclip.distributed``'s
    ``FAMILY_DIST_IMPLS`` (``"gather"``: all-gather, as sentence-transformers; ``"ring"``).
    """

    impl: str = "auto"
    dist_impl: str = "gather"


def _check_renamed(loss: Any) -> None:
    """The attributes whose fastclip argument has another name (``partition``, ``hardness``), checked
    under sentence-transformers' names when they were changed after construction (its constructor
    checks them, in these words)."""
    if loss.partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', got {loss.partition_mode}")
    if loss.partition_mode == "per_direction" and set(loss.directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError(
            "partition_mode='per_direction' requires every direction's candidate pool to include the positive "
            "pair; 'query_to_query' and 'doc_to_doc' never include it. Use partition_mode='joint' instead."
        )
    valid = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
    if loss.hardness_mode not in valid:
        raise ValueError(f"hardness_mode must be one of {set(valid)}, got {loss.hardness_mode!r}")


def _info_nce(loss: Any, embeddings: list[Tensor]) -> Tensor:
    """The fused MNRL over whole-batch ``embeddings`` ([queries, positives, negatives_1, ...]),
    with ``loss``'s hyperparameters (sentence-transformers' attribute names)."""
    if len(embeddings) < 2:
        raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
    _check_renamed(loss)
    query, positive, *negatives = embeddings
    hardness = loss.hardness_mode if loss.hardness_strength > 0.0 else None
    if hardness == "hard_negatives" and not negatives:
        hardness = None  # sentence-transformers: no explicit negatives, nothing to penalize
    kwargs = dict(
        negatives=negatives or None,
        scale=loss.scale,
        similarity=_similarity_name(loss.similarity_fct),
        directions=tuple(dict.fromkeys(loss.directions)),  # sentence-transformers tests membership
        partition=loss.partition_mode,
        hardness=hardness,
        hardness_strength=float(loss.hardness_strength) if hardness else 0.0,
        impl=loss.impl,
    )
    if loss.gather_across_devices and _distributed():
        from fastclip.distributed import info_nce_loss_distributed

        return info_nce_loss_distributed(query, positive, dist_impl=loss.dist_impl, **kwargs)
    import fastclip

    return fastclip.info_nce_loss(query, positive, **kwargs)


def _gist(loss: Any, embeddings: list[Tensor], guide_embeddings: list[Tensor]) -> Tensor:
    """The fused GISTEmbed loss over whole-batch model and guide embeddings (2 or 3 columns)."""
    if len(embeddings) != len(guide_embeddings):
        raise ValueError(
            f"guide_embeddings: expected one per column of embeddings ({len(embeddings)}), "
            f"got {len(guide_embeddings)}"
        )
    if len(embeddings) not in (2, 3):
        raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
    kwargs = dict(
        guide_query=guide_embeddings[0],
        guide_positive=guide_embeddings[1],
        guide_negative=guide_embeddings[2] if len(embeddings) == 3 else None,
        temperature=loss.temperature,
        margin_strategy=loss.margin_strategy,
        margin=loss.margin,
        contrast_anchors=bool(loss.contrast_anchors),  # sentence-transformers tests truthiness
        contrast_positives=bool(loss.contrast_positives),
        impl=loss.impl,
    )
    negative = embeddings[2] if len(embeddings) == 3 else None
    if loss.gather_across_devices and _distributed():
        from fastclip.distributed import gist_loss_distributed

        return gist_loss_distributed(embeddings[0], embeddings[1], negative, **kwargs)
    import fastclip

    return fastclip.gist_loss(embeddings[0], embeddings[1], negative, **kwargs)


class _CheckedMiniBatchSize:
    """``mini_batch_size`` checked when set (sentence-transformers' constructor sets it, so a bad value is
    one ValueError at construction, not ``range() arg 3 must not be zero`` or ``torch.cat(): expected a
    non-empty list`` at the first forward, as sentence-transformers' own class gives)."""

    @property
    def mini_batch_size(self) -> int:
        return self.__dict__["_fastclip_mini_batch_size"]

    @mini_batch_size.setter
    def mini_batch_size(self, value) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"mini_batch_size: expected a positive int, got {value!r}")
        self.__dict__["_fastclip_mini_batch_size"] = int(value)


class _OneBackward:
    """The cached losses' ``gradcache_backward`` (a class attribute, so that constructor signatures stay
    sentence-transformers' own): how the cached embedding gradients reach the model.

    ``"hook"``: sentence-transformers' backward hook, one ``backward()`` per mini-batch inside the
    trainer's backward; ``"graph"``: the mini-batches join the trainer's ONE backward (checkpointed
    mini-batches, :mod:`fastclip.integrations._st_gradcache`), one gradient per parameter per step, as
    DeepSpeed ZeRO-2/3 require; ``"auto"`` (default): ``"graph"`` when the loss's model is a DeepSpeed
    engine (inside ``SentenceTransformerTrainer`` with ``deepspeed=``), else ``"hook"``.
    """

    gradcache_backward: str = "auto"

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        if not (_gradcache.use_graph(self) and torch.is_grad_enabled()):
            return super().forward(sentence_features, labels)
        sentence_features = list(sentence_features)
        guide = isinstance(self, _STCachedGISTEmbedLoss)
        if not guide and len(sentence_features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        return _gradcache.forward_graph(self, sentence_features, labels, guide=guide)


def _finish(loss: Tensor, with_backward: bool) -> Tensor:
    """The cached losses' contract: with ``with_backward``, back-propagate to the cached embeddings
    and return the detached value."""
    if with_backward:
        loss.backward()
        return loss.detach()
    return loss


# ----------------------------------------------------------------------------------------------------
# MultipleNegativesRankingLoss and its symmetric form


class MultipleNegativesRankingLoss(_FusedOptions, _STMNRL):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (same constructor, defaults, meanings),
    its loss stage fused: :func:`fastclip.info_nce_loss` on the embeddings, never the
    B x W·B·(1+K) score matrix (nor the extra B x W·B blocks of the GTE directions).

    Equivalent plain PyTorch: sentence-transformers' ``compute_loss_from_embeddings``.
    """

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if _similarity_name(self.similarity_fct) is None:
            _warn_fallback(self, self.similarity_fct)
            return super().compute_loss_from_embeddings(embeddings, labels)
        return _info_nce(self, list(embeddings))


class MultipleNegativesSymmetricRankingLoss(MultipleNegativesRankingLoss):
    """sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``: MNRL with
    ``directions=("query_to_doc", "doc_to_query")`` and ``partition_mode="per_direction"``, fused.
    (Deprecated in sentence-transformers 6; kept here without the warning.)"""

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct=_st_util.cos_sim,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(
            model=model,
            scale=scale,
            similarity_fct=similarity_fct,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        )


# ----------------------------------------------------------------------------------------------------
# the cached (GradCache) forms


class CachedMultipleNegativesRankingLoss(_OneBackward, _CheckedMiniBatchSize, _FusedOptions, _STCachedMNRL):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss``: its embedding passes (mini-batches
    without then with gradients, RNG replay, the backward hook), with the loss stage over the whole
    cached batch in ONE fused call (:func:`fastclip.info_nce_loss`): no ``mini_batch_size`` x N score
    chunks, no loop over them.

    Equivalent plain PyTorch: sentence-transformers' ``calculate_loss``.
    """

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        if _similarity_name(self.similarity_fct) is None:
            _warn_fallback(self, self.similarity_fct)
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        embeddings = [torch.cat(list(column)) for column in reps]  # one (B, D) tensor per column
        return _finish(_info_nce(self, embeddings), with_backward)


class CachedMultipleNegativesSymmetricRankingLoss(CachedMultipleNegativesRankingLoss):
    """sentence-transformers' ``CachedMultipleNegativesSymmetricRankingLoss``: the cached MNRL with
    ``directions=("query_to_doc", "doc_to_query")`` and ``partition_mode="per_direction"``, fused.
    (Deprecated in sentence-transformers 6; kept here without the warning.)"""

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct=_st_util.cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(
            model=model,
            scale=scale,
            similarity_fct=similarity_fct,
            mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens,
            gather_across_devices=gather_across_devices,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
            show_progress_bar=show_progress_bar,
        )


# ----------------------------------------------------------------------------------------------------
# GISTEmbed


def _guide_features(loss: Any, feature: dict[str, Any]) -> dict[str, Any]:
    """Re-tokenize one column for a guide whose tokenizer differs from the model's: decode the
    model's token ids, then preprocess the texts with the guide (sentence-transformers' behaviour)."""
    ids = feature["input_ids"]
    if "cu_seq_lens_q" in feature:  # a flattened batch: one row holding every sequence back to back
        flat, bounds = ids[0].tolist(), feature["cu_seq_lens_q"].tolist()
        ids = [flat[begin:end] for begin, end in zip(bounds[:-1], bounds[1:])]
    texts = loss.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return _st_util.batch_to_device(loss.guide.preprocess(texts), loss.guide.device)


class GISTEmbedLoss(_FusedOptions, _STGISTEmbedLoss):
    """sentence-transformers' ``GISTEmbedLoss`` (same constructor, defaults, meanings), fused:
    :func:`fastclip.gist_loss` applies the guide's false-negative mask inside each tile (a column is
    removed where the guide scores it above the guide's positive score minus the margin), so neither
    the B x N scores nor the B x N guide matrix (nor sentence-transformers' B x N x D intermediate
    of ``nn.CosineSimilarity`` on broadcast shapes) is ever in memory.

    ``compute_loss_from_embeddings(embeddings, guide_embeddings)`` is the loss stage alone.
    """

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        sentence_features = list(sentence_features)
        # The guide reads shallow copies: the model writes its outputs into the dicts it is given,
        # and wrappers such as MatryoshkaLoss pass those same dicts again.
        guide_features = [dict(feature) for feature in sentence_features]
        embeddings = _embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = [_guide_features(self, feature) for feature in sentence_features]
            guide_embeddings = _embed_columns(self.guide, guide_features)
        return self.compute_loss_from_embeddings(embeddings, guide_embeddings)

    def compute_loss_from_embeddings(
        self, embeddings: list[Tensor], guide_embeddings: list[Tensor]
    ) -> Tensor:
        return _gist(self, list(embeddings), [g.detach() for g in guide_embeddings])


class CachedGISTEmbedLoss(_OneBackward, _CheckedMiniBatchSize, _FusedOptions, _STCachedGISTEmbedLoss):
    """sentence-transformers' ``CachedGISTEmbedLoss``: its embedding passes (model and guide per
    mini-batch, RNG replay, the backward hook), the loss stage over the whole cached batch in ONE
    fused call (:func:`fastclip.gist_loss`, the guide mask applied in-tile).

    With more than one negative column (sentence-transformers' cached form accepts several), the
    loss stage is sentence-transformers' own (a warning says so once).
    """

    def calculate_loss(
        self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *, with_backward: bool = False
    ) -> Tensor:
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        if len(reps) > 3:
            key = (type(self).__name__, f"{len(reps) - 2} negative columns")
            if key not in _WARNED:
                _WARNED.add(key)
                warnings.warn(
                    f"{key[0]}: {key[1]}: the fused GIST loss takes at most one negative column, so this "
                    "batch runs sentence-transformers' own loss stage.",
                    UserWarning,
                    stacklevel=2,
                )
            return super().calculate_loss(reps, reps_guided, with_backward=with_backward)
        embeddings = [torch.cat(list(column)) for column in reps]
        guide = [torch.cat(list(column)).detach() for column in reps_guided]
        return _finish(_gist(self, embeddings, guide), with_backward)
