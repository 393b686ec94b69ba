"""The boundary of the contrastive family: every argument checked once, into frozen options and
checked tensors. Messages name the argument, the expected and the received value. Nothing here reads
a tensor's values unless ``check_finite=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastclip import _checks
from fastclip.ops.amp import autocast_active, compute_dtype
from fastclip.ops.dispatch import resolve_impl
from fastclip.ops.family_variants import GistOptions, InfoNCEOptions
from fastclip.ops.inputs import Common


def negatives_list(
    negatives, n: int, dim: int, name: str = "negatives", rows_name: str = "query"
) -> list[torch.Tensor]:
    """Hard negatives as K tensors of (n, D): from None, a list/tuple of (n, D) or one (n, K, D).
    ``rows_name``: the caller's name of the (n, D) rows they pair with, for the messages."""
    if negatives is None:
        return []
    if isinstance(negatives, torch.Tensor):
        _checks.check_tensor(name, negatives)
        if negatives.dim() != 3:
            raise ValueError(
                f"{name}: expected a (n, K, D) tensor or a list of K (n, D) tensors, got shape {tuple(negatives.shape)}"
            )
        if negatives.shape[0] != n or negatives.shape[2] != dim:
            raise ValueError(
                f"{name}: expected shape ({n}, K, {dim}) (as {rows_name}), got {tuple(negatives.shape)}"
            )
        return list(negatives.unbind(1))
    if not isinstance(negatives, (list, tuple)):
        raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(negatives).__name__}")
    out = []
    for k, t in enumerate(negatives):
        _checks.check_tensor(f"{name}[{k}]", t, ndim=2)
        if tuple(t.shape) != (n, dim):
            raise ValueError(
                f"{name}[{k}]: expected shape ({n}, {dim}) (as {rows_name}), got {tuple(t.shape)}"
            )
        out.append(t)
    return out


def check_ids(name: str, ids, n: int, device) -> torch.Tensor | None:
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name}: expected an integer tensor of shape ({n},), got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (e.g. int64), got {ids.dtype}")
    if tuple(ids.shape) != (n,):
        raise ValueError(f"{name}: expected shape ({n},), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name}: expected device {device} (as the features), got {ids.device}")
    return ids.to(torch.int64)


def negative_ids_list(negative_ids, n: int, k: int, device) -> list[torch.Tensor | None]:
    if negative_ids is None:
        return [None] * k
    if k == 0:
        raise ValueError("negative_ids: given without negatives")
    if isinstance(negative_ids, torch.Tensor) and negative_ids.dim() == 2:
        if tuple(negative_ids.shape) != (n, k):
            raise ValueError(f"negative_ids: expected shape ({n}, {k}), got {tuple(negative_ids.shape)}")
        negative_ids = list(negative_ids.unbind(1))
    if not isinstance(negative_ids, (list, tuple)) or len(negative_ids) != k:
        raise ValueError(f"negative_ids: expected a ({n}, {k}) integer tensor or {k} tensors of shape ({n},)")
    return [check_ids(f"negative_ids[{j}]", t, n, device) for j, t in enumerate(negative_ids)]


def settle(named: list[tuple[str, torch.Tensor]], *, matmul: bool = True) -> list[torch.Tensor]:
    """Feature tensors of one dtype and device. Under autocast they are cast as the materialized loss
    would compute them (:func:`fastclip.ops.amp.compute_dtype`): ``matmul`` — sentence-transformers'
    ``cos_sim``/``dot_score`` are matmuls, autocast runs them in its dtype, fp32 features included;
    not ``matmul`` — GIST's similarities are elementwise (``nn.CosineSimilarity``), in the features'
    own dtype, so only mixed dtypes are cast. Mixed dtypes outside autocast raise."""
    (name0, t0), rest = named[0], named[1:]
    _checks.check_tensor(name0, t0, ndim=2)
    if t0.shape[0] == 0 or t0.shape[1] == 0:
        raise ValueError(f"{name0}: expected a non-empty (batch, dim) tensor, got shape {tuple(t0.shape)}")
    if t0.device.type == "meta":
        raise ValueError(
            f"{name0}: expected a tensor holding data (e.g. on cpu or cuda), got one on the meta device"
        )
    dtypes = {t0.dtype}
    for name, t in rest:
        _checks.check_tensor(name, t, ndim=2)
        if t.shape[1] != t0.shape[1]:
            raise ValueError(f"{name}: expected feature dim {t0.shape[1]} (as {name0}), got {t.shape[1]}")
        if t.shape[0] == 0:
            raise ValueError(f"{name}: expected a non-empty (batch, dim) tensor, got shape {tuple(t.shape)}")
        if t.device != t0.device:
            raise ValueError(f"{name}: expected device {t0.device} (as {name0}), got {t.device}")
        if t.dtype != t0.dtype and not autocast_active(t0.device):
            raise TypeError(
                f"{name}: expected dtype {t0.dtype} (as {name0}), got {t.dtype} "
                "(mixed dtypes are accepted under torch.autocast only)"
            )
        dtypes.add(t.dtype)
    if len(dtypes) == 1 and not matmul:
        return [t for _, t in named]
    dtype = compute_dtype(sorted(dtypes, key=str), t0.device)
    return [t if t.dtype == dtype else t.to(dtype) for _, t in named]


def scalar_dtype(features_dtype: torch.dtype) -> torch.dtype:
    """The dtype a Python-float scale becomes: float64 beside float64 features (a float32 copy would
    round 0.7 or 1 / 0.07 at 1e-8, far above float64's precision), float32 otherwise."""
    return torch.float64 if features_dtype == torch.float64 else torch.float32


def scale_tensor(name: str, scale, device, *, positive=True, dtype=torch.float32) -> torch.Tensor:
    if isinstance(scale, bool):
        raise TypeError(f"{name}: expected a float or a 0-dim/1-element tensor, got bool")
    if isinstance(scale, (int, float)):
        value = _checks.check_real(name, scale, lo=0.0 if positive else None, lo_open=positive)
        return torch.full((), value, device=device, dtype=dtype)  # a fill, not a blocking host copy
    return _checks.check_scalar(name, scale, device=device)


def normalize(t: torch.Tensor) -> torch.Tensor:
    """Unit rows, as sentence-transformers' ``cos_sim`` (``F.normalize``), computed in float32 for 16-bit
    inputs and returned in the input dtype. Differentiable: autograd carries the gradient through."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(t.float(), p=2, dim=-1).to(t.dtype)
    return F.normalize(t, p=2, dim=-1)


def check_finite_all(named) -> None:
    for name, t in named:
        if t is not None:
            _checks.check_all_finite(name, t)


@dataclass
class InfoNCEInputs:
    """Checked tensors of an InfoNCE call: features of one dtype, as given (``"cos"`` normalizes later)."""

    q: torch.Tensor
    p: torch.Tensor
    negs: list[torch.Tensor]
    bank: torch.Tensor | None
    scale: torch.Tensor
    q_ids: torch.Tensor | None
    p_ids: torch.Tensor | None
    neg_ids: list[torch.Tensor | None]
    impl: str


def prepare_info_nce(
    query, positive, negatives, bank, scale, query_ids, doc_ids, negative_ids, o: InfoNCEOptions, c: Common
) -> InfoNCEInputs:
    _checks.check_tensor("query", query, ndim=2)
    _checks.check_tensor("positive", positive, ndim=2)
    n, dim = query.shape
    if tuple(positive.shape) != (n, dim):
        raise ValueError(f"positive: expected shape ({n}, {dim}) (as query), got {tuple(positive.shape)}")
    negs = negatives_list(negatives, n, dim)
    named = [("query", query), ("positive", positive)] + [(f"negatives[{k}]", t) for k, t in enumerate(negs)]
    if bank is not None:
        _checks.check_tensor("bank", bank, ndim=2)
        named.append(("bank", bank.detach()))
    feats = settle(named)
    device = feats[0].device
    s = scale_tensor("scale", scale, device, dtype=scalar_dtype(feats[0].dtype))
    q_ids = check_ids("query_ids", query_ids, n, device)
    p_ids = check_ids("doc_ids", doc_ids, n, device)
    if p_ids is None and q_ids is not None:
        p_ids = q_ids  # pair ids: a document shares its query's id
    if q_ids is None and p_ids is not None:
        raise ValueError("query_ids: expected an integer tensor when doc_ids is given, got None")
    neg_ids = negative_ids_list(negative_ids, n, len(negs), device)
    if q_ids is None and any(t is not None for t in neg_ids):
        raise ValueError(
            "query_ids: expected an integer tensor when negative_ids is given, got None (a column's id is "
            "compared with its row's query id)"
        )
    if q_ids is None and o.duplicates == "positive":
        raise ValueError(
            "query_ids: expected an integer tensor with duplicates='positive' (same-id columns become "
            "positives), got None; without ids there are no duplicates: drop duplicates='positive'"
        )
    if c.check_finite:
        check_finite_all(named + [("scale", s)])
    # "cos": the features stay raw here; the fused Function normalizes them inside (its gradients go
    # through the normalization), the reference and the ring normalize with autograd.
    q, p, *rest = feats
    bank_t = rest.pop() if bank is not None else None
    impl = resolve_impl(c.impl, device, dtype=q.dtype)
    return InfoNCEInputs(q, p, rest, bank_t, s, q_ids, p_ids, neg_ids, impl)


@dataclass
class GistInputs:
    q: torch.Tensor
    p: torch.Tensor
    negs: list[torch.Tensor]
    gq: torch.Tensor
    gp: torch.Tensor
    gnegs: list[torch.Tensor]
    scale: torch.Tensor
    impl: str


def prepare_gist(
    query, positive, negative, guide_query, guide_positive, guide_negative, temperature, c: Common
) -> GistInputs:
    _checks.check_tensor("query", query, ndim=2)
    n, dim = query.shape
    named = [("query", query), ("positive", positive)]
    if negative is not None:
        named.append(("negative", negative))
    for name, t in named[1:]:
        _checks.check_tensor(name, t, ndim=2)
        if tuple(t.shape) != (n, dim):
            raise ValueError(f"{name}: expected shape ({n}, {dim}) (as query), got {tuple(t.shape)}")
    if guide_query is None or guide_positive is None:
        raise ValueError(
            "guide_query, guide_positive: expected the guide model's (n, Dg) embeddings, got None"
        )
    if (negative is None) != (guide_negative is None):
        raise ValueError("guide_negative: expected exactly when negative is given")
    gnamed = [("guide_query", guide_query), ("guide_positive", guide_positive)]
    if guide_negative is not None:
        gnamed.append(("guide_negative", guide_negative))
    for name, t in gnamed:
        _checks.check_tensor(name, t, ndim=2)
        if t.shape[0] != n:
            raise ValueError(f"{name}: expected {n} rows (as query), got {t.shape[0]}")
    temperature = _checks.check_real("temperature", temperature, lo=0.0, lo_open=True)
    feats = settle(named, matmul=False)
    guides = settle([(k, t.detach()) for k, t in gnamed], matmul=False)
    if guides[0].device != feats[0].device:
        raise ValueError(f"guide_query: expected device {feats[0].device} (as query), got {guides[0].device}")
    if c.check_finite:
        check_finite_all(named + gnamed)
    # The model's features stay raw: the fused Function normalizes them inside (as for InfoNCE "cos").
    # The guide's cosine, in float32 at least: its comparisons decide the masks.
    guides = [F.normalize(g.to(torch.promote_types(g.dtype, torch.float32)), p=2, dim=-1) for g in guides]
    s = torch.full((), 1.0 / temperature, device=feats[0].device, dtype=scalar_dtype(feats[0].dtype))
    impl = resolve_impl(c.impl, feats[0].device, dtype=feats[0].dtype)
    q, p, *negs = feats
    gq, gp, *gnegs = guides
    return GistInputs(q, p, negs, gq, gp, gnegs, s, impl)


def gist_margins(gq: torch.Tensor, gp_own: torch.Tensor, o: GistOptions) -> torch.Tensor:
    """Per anchor, the margin below its positive's guide similarity above which a column is a false
    negative: ``margin`` ("absolute") or ``|g(anchor, positive)| * margin`` ("relative"). O(n·Dg). The
    threshold ``g(anchor, positive) - margin`` is formed inside the implementations from the guide
    tile's own cell, so that a duplicate of the positive ties with it exactly (and stays)."""
    if o.margin_strategy == "absolute":
        return torch.full((gq.shape[0],), o.margin, dtype=gq.dtype, device=gq.device)
    return (gq * gp_own).sum(-1).abs() * o.margin
