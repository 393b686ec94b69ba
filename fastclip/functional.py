"""The functional loss API of one process: ``clip_loss``, ``siglip_loss``, ``distill_clip_loss``.

This layer offers every ``impl``: the fused ones (``fastclip.ops``) and the materialized
``"reference"`` (``fastclip.reference``), behind the one input-validation path
(``fastclip.ops.inputs``). Under ``torch.autocast`` the losses compute on their own terms
(autocast off inside, float32 accumulation) and accept the mixed feature dtypes autocast produces.
"""

from __future__ import annotations

import dataclasses

import torch

from fastclip import _checks
from fastclip.ops.amp import no_autocast
from fastclip.ops.clip import clip_loss_fused
from fastclip.ops.distill import distill_block_loss
from fastclip.ops.family import gist_fused, info_nce_fused
from fastclip.ops.family_inputs import negatives_list, prepare_gist, prepare_info_nce, settle
from fastclip.ops.family_variants import GistOptions, InfoNCEOptions
from fastclip.ops.inputs import Common, loss_options, nan_if_not_finite, prepare_distill, prepare_with_options
from fastclip.ops.siglip import siglip_loss_fused
from fastclip.ops.signatures import split_options, takes_options
from fastclip.reference import clip_loss_reference, distill_clip_loss_reference, siglip_loss_reference
from fastclip.reference_family import gist_reference, info_nce_reference, siglip_negatives_reference

__all__ = ["clip_loss", "distill_clip_loss", "gist_loss", "info_nce_loss", "siglip_loss"]


def _run(a, fused, reference) -> torch.Tensor:
    """The fused loss of checked inputs, or the materialized one (autocast off, NaN for non-finite
    inputs, as the fused paths give)."""
    if a.impl != "reference":
        return fused(a)
    with no_autocast(a.x.device):
        return nan_if_not_finite(reference(a.x, a.y, a.scale, a.bias), a.x, a.y, a.scale, a.bias)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """CLIP softmax loss of one process's batch, without building the B×B logit matrix.

    Shapes: ``image_features (B, D)``, ``text_features (B, D)``, ``logit_scale`` 0-dim or 1-element
    (already exponentiated, as open_clip passes it), optional ``logit_bias`` likewise. Returns a 0-dim
    float32 tensor (float64 for float64 inputs). Equivalent to::

        logits = logit_scale * image_features @ text_features.T
        loss = (F.cross_entropy(logits, arange(B)) + F.cross_entropy(logits.T, arange(B))) / 2

    ``impl``: "auto" (Triton on CUDA, else "torch"), "triton", "torch" (chunked PyTorch, ``chunk_size``
    rows at a time) or "reference" (materialized). NaN/Inf in the features, scale or bias give a NaN
    loss; ``check_finite=True`` raises a ``ValueError`` instead (one reduction and host sync).
    """
    options = loss_options(impl=impl, chunk_size=chunk_size, check_finite=check_finite)
    return clip_loss_with_options(image_features, text_features, logit_scale, logit_bias, options=options)


def clip_loss_with_options(image_features, text_features, logit_scale, logit_bias=None, *, options: Common):
    """:func:`clip_loss` with options checked once (:func:`fastclip.ops.inputs.loss_options`; the
    modules' entry: no re-validation)."""
    a = prepare_with_options(image_features, text_features, logit_scale, logit_bias, options)
    return _run(a, clip_loss_fused, clip_loss_reference)


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    negatives=None,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """SigLIP sigmoid loss of one process's batch, without building the B×B logit matrix.

    Shapes: ``image_features (B, D)``, ``text_features (B, D)``; ``logit_scale`` and ``logit_bias``
    0-dim or 1-element tensors (scale already exponentiated; ``logit_bias=None``: no bias, as
    open_clip computes it). Returns a 0-dim float32 tensor (float64 for float64 inputs). Equivalent to::

        logits = logit_scale * image_features @ text_features.T + logit_bias
        labels = 2 * torch.eye(B) - 1
        loss = -F.logsigmoid(labels * logits).sum() / B

    ``impl`` and ``check_finite`` as in :func:`clip_loss`. ``negatives``: extra negative captions (hard
    negatives), K per row as a list of K ``(B, D)`` tensors or one ``(B, K, D)``: every image is paired
    with every one of them as a negative term, ``loss += sum softplus(s x n^T + b) / B`` (gradients
    reach them too).
    """
    options = loss_options(impl=impl, chunk_size=chunk_size, check_finite=check_finite)
    return siglip_loss_with_options(
        image_features, text_features, logit_scale, logit_bias, negatives=negatives, options=options
    )


def siglip_loss_with_options(
    image_features, text_features, logit_scale, logit_bias=None, *, negatives=None, options: Common
):
    """:func:`siglip_loss` with options checked once (the modules' entry: no re-validation)."""
    a = prepare_with_options(image_features, text_features, logit_scale, logit_bias, options)
    if negatives is None:
        return _run(a, siglip_loss_fused, siglip_loss_reference)
    negs = negatives_list(negatives, a.x.shape[0], a.x.shape[1], rows_name="image_features")
    negs = settle([("image_features", a.x)] + [(f"negatives[{k}]", t) for k, t in enumerate(negs)])[1:]
    negs = [t if t.dtype == a.x.dtype else t.to(a.x.dtype) for t in negs]
    if options.check_finite:
        for k, t in enumerate(negs):
            _checks.check_all_finite(f"negatives[{k}]", t)
    if a.impl == "reference":
        with no_autocast(a.x.device):
            ref = siglip_negatives_reference(a.x, a.y, negs, a.scale, a.bias)
            return nan_if_not_finite(ref, a.x, a.y, a.scale, a.bias, *negs)
    return siglip_loss_fused(a, negs)


def distill_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    dist_image_features: torch.Tensor,
    dist_text_features: torch.Tensor,
    dist_logit_scale,
    *,
    impl: str = "auto",
    chunk_size: int | None = None,
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``DistillClipLoss`` of one process's batch, without any B×B matrix.

    Shapes: student ``image_features, text_features (B, D)``, teacher ``dist_image_features,
    dist_text_features (B, Dt)`` (``Dt`` may differ from ``D``), scales 0-dim or 1-element (already
    exponentiated). Returns ``(contrastive_loss, distill_loss)``, 0-dim float32 (float64 for float64
    inputs). Equivalent to::

        ls, lt = logit_scale * x @ y.T, dist_logit_scale * xt @ yt.T
        contrastive = (F.cross_entropy(ls, arange(B)) + F.cross_entropy(ls.T, arange(B))) / 2
        kl = lambda a, b: -(a.softmax(1) * b.log_softmax(1)).sum(1).mean()
        distill = (kl(lt, ls) + kl(lt.T, ls.T)) / 2

    Gradients reach every input that requires grad, the teacher's included (as open_clip's autograd
    gives them; detach the teacher to skip that work). ``impl``, ``chunk_size`` and ``check_finite``
    as :func:`fastclip.clip_loss`. Works under ``torch.autocast`` (computed with autocast off, fp32
    accumulation; mixed feature dtypes, accepted under autocast only, are cast as the
    materialized loss's matmul would cast them).
    """
    options = loss_options(impl=impl, chunk_size=chunk_size, check_finite=check_finite)
    return distill_clip_loss_with_options(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
        options=options,
    )  # fmt: skip


def distill_clip_loss_with_options(
    image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
    *, options: Common,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`distill_clip_loss` with options checked once (the modules' entry: no re-validation)."""
    a = prepare_distill(
        image_features, text_features, logit_scale, dist_image_features, dist_text_features, dist_logit_scale,
        options,
    )  # fmt: skip
    if a.impl == "reference":
        with no_autocast(a.x.device):
            return distill_clip_loss_reference(*a.tensors)
    return distill_block_loss(*a.tensors, offset=0, both=True, impl=a.impl, chunk_size=a.chunk_size)


@takes_options(InfoNCEOptions, Common)
def info_nce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives=None,
    *,
    scale=20.0,
    query_ids: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
    negative_ids=None,
    bank: torch.Tensor | None = None,
    **options,
) -> torch.Tensor:
    """InfoNCE / multiple-negatives ranking loss of one process's batch, without any n x N matrix.

    Shapes: ``query``, ``positive`` ``(n, D)`` (row i's positive is ``positive[i]``); ``negatives``: K hard
    negatives per row, a list of K ``(n, D)`` tensors or one ``(n, K, D)``; ``bank``: ``(M, D)`` extra
    negatives without gradient (a queue, cached embeddings); ``scale``: float or 0-dim/1-element tensor
    (learnable), logits = scale * similarity. Returns a 0-dim float32 tensor (float64 for float64).
    With the defaults it equals sentence-transformers' ``MultipleNegativesRankingLoss``::

        docs = torch.cat([positive, *negatives])                  # columns: positives, then negatives
        scores = scale * cos_sim(query, docs)                       # (n, n * (1 + K))
        loss = F.cross_entropy(scores, torch.arange(n))

    ``directions`` (query_to_doc required; query_to_query, doc_to_query, doc_to_doc) and ``partition``
    ("joint": one softmax over all directions' columns; "per_direction": the mean of the directions'
    log-sum-exps) as sentence-transformers' ``directions``/``partition_mode``. ``hardness``
    ("in_batch_negatives", "hard_negatives", "all_negatives") adds ``hardness_strength * sim.detach()``
    to those negatives' logits. ``query_ids``/``doc_ids``/``negative_ids`` (integer, ``(n,)``; ``(n, K)``):
    columns sharing the row's id, other than the row's own columns, are removed
    (``duplicates="ignore"``, the default: without ids it has nothing to remove) or all count as
    positives in the query->document columns (``duplicates="positive"``: uniform target over them).
    Ids are compared with the row's ``query_ids``: ``doc_ids``/``negative_ids`` without ``query_ids``,
    and ``duplicates="positive"`` without ``query_ids``, raise a ``ValueError`` (nothing would be
    masked). Negative groups without ``negative_ids`` carry no id (never a duplicate); any integer
    (negative ones included) is an id. ``label_smoothing`` eps spreads eps over the
    row's unmasked columns. ``impl``, ``chunk_size``, ``check_finite`` as :func:`fastclip.clip_loss`.
    The options (every keyword from ``similarity`` on) and their defaults are the fields of
    ``fastclip.ops.family_variants.InfoNCEOptions`` and ``fastclip.ops.inputs.Common``.
    """
    o, c = split_options("info_nce_loss", options, InfoNCEOptions, Common)
    return info_nce_with_options(
        query, positive, negatives, scale=scale, query_ids=query_ids, doc_ids=doc_ids,
        negative_ids=negative_ids, bank=bank, options=o, common=c,
    )  # fmt: skip


def info_nce_with_options(
    query, positive, negatives=None, *, scale, query_ids=None, doc_ids=None, negative_ids=None, bank=None,
    options: InfoNCEOptions, common: Common,
) -> torch.Tensor:  # fmt: skip
    """:func:`info_nce_loss` with options validated once (the modules' entry: no re-validation)."""
    o, c = options, common
    a = prepare_info_nce(query, positive, negatives, bank, scale, query_ids, doc_ids, negative_ids, o, c)
    if a.impl == "reference":
        with no_autocast(a.q.device):
            return info_nce_reference(
                a.q, a.p, a.negs, scale=a.scale, query_ids=a.q_ids, doc_ids=a.p_ids,
                negative_ids=a.neg_ids if a.q_ids is not None else None, bank=a.bank, **dataclasses.asdict(o),
            )  # fmt: skip
    return info_nce_fused(a, o, c.chunk_size)


@takes_options(GistOptions, Common)
def gist_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    *,
    guide_query: torch.Tensor,
    guide_positive: torch.Tensor,
    guide_negative: torch.Tensor | None = None,
    temperature: float = 0.01,
    **options,
) -> torch.Tensor:
    """GISTEmbed's guided in-batch-negatives loss of one process's batch, without any n x N matrix
    (neither the model's nor the guide's).

    Shapes: ``query``, ``positive``, optional ``negative`` ``(n, D)``; the guide model's embeddings of the
    same texts ``guide_query``, ``guide_positive``, ``guide_negative`` ``(n, Dg)`` (no gradient). Cosine
    scores of each anchor against all positives, anchors (``contrast_anchors``), positives from its
    positive (``contrast_positives``) and negatives; a column is removed where the guide scores it above
    ``g(anchor, positive) - margin`` ("absolute") or ``g - |g| * margin`` ("relative"), the positive never,
    the anchor's own column among the anchors and the positive's own among the positives always;
    cross-entropy of scores / ``temperature``, as sentence-transformers 6.x's ``GISTEmbedLoss`` (5.7 kept
    those two self columns unless the guide removed them).
    """
    o, c = split_options("gist_loss", options, GistOptions, Common)
    return gist_with_options(
        query, positive, negative, guide_query=guide_query, guide_positive=guide_positive,
        guide_negative=guide_negative, temperature=temperature, options=o, common=c,
    )  # fmt: skip


def gist_with_options(
    query, positive, negative=None, *, guide_query, guide_positive, guide_negative=None, temperature,
    options: GistOptions, common: Common,
) -> torch.Tensor:  # fmt: skip
    """:func:`gist_loss` with options validated once (the module's entry: no re-validation)."""
    o, c = options, common
    a = prepare_gist(query, positive, negative, guide_query, guide_positive, guide_negative, temperature, c)
    if a.impl == "reference":
        with no_autocast(a.q.device):
            return gist_reference(
                a.q, a.p, a.negs[0] if a.negs else None, guide_query=a.gq, guide_positive=a.gp,
                guide_negative=a.gnegs[0] if a.gnegs else None, temperature=float(1.0 / a.scale),
                **dataclasses.asdict(o),
            )  # fmt: skip
    return gist_fused(a, o, c.chunk_size)
