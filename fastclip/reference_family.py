"""Materialized references of the contrastive family: dense logits and dense masks, autograd for the
gradients. The ground truth of the family's tests and the baseline of its benchmarks.

Written from the maths in docs/design.md ("The contrastive family"), not from the fused code: column
ownership is ``column mod (number of queries)`` over the concatenated documents (all positives, then
all first negatives, ...), masks are dense boolean matrices. Every function takes this process's rows
(``query``, ``positive``) and the global columns (``all_queries``, ``all_positives``, ``all_negatives``;
by default the local tensors themselves) with the rank's row ``offset``, so the same code is the
single-process and the multi-process reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _sim(a, b, similarity):
    if similarity == "cos":
        a, b = F.normalize(a, p=2, dim=-1), F.normalize(b, p=2, dim=-1)
    return a @ b.T


def info_nce_reference(
    query,
    positive,
    negatives=(),
    *,
    scale=20.0,
    similarity="cos",
    directions=("query_to_doc",),
    partition="joint",
    hardness=None,
    hardness_strength=0.0,
    query_ids=None,
    doc_ids=None,
    negative_ids=None,
    duplicates="ignore",
    label_smoothing=0.0,
    bank=None,
    all_queries=None,
    all_positives=None,
    all_negatives=None,
    all_query_ids=None,
    all_doc_ids=None,
    all_negative_ids=None,
    offset=0,
):
    """Mean over this process's rows of ``sum_P w_P lse_P(i) - sum_j t_ij L'_ij`` (docs/design.md)."""
    negatives = list(negatives)
    Q = query if all_queries is None else all_queries
    P = positive if all_positives is None else all_positives
    N = negatives if all_negatives is None else list(all_negatives)
    n, nq = query.shape[0], Q.shape[0]
    docs = torch.cat([P, *N], 0)
    n_docs = docs.shape[0]
    dev = query.device
    g = offset + torch.arange(n, device=dev)  # global index of each local row
    col = torch.arange(n_docs, device=dev)
    own = (col[None, :] % nq) == g[:, None]  # (n, n_docs): the row's positive and own negatives
    pos = col[None, :] == g[:, None]  # the positive
    qcol = torch.arange(nq, device=dev)
    self_q = qcol[None, :] == g[:, None]

    # ids: a column without an id (a negative group without negative_ids) never matches: it carries
    # no id at all (a mask), never a placeholder value, which could equal a user's id.
    def ids_or_none(t, length):
        known = torch.full((length,), t is not None, dtype=torch.bool, device=dev)
        return (t if t is not None else torch.zeros(length, dtype=torch.int64, device=dev)), known

    use_ids = query_ids is not None
    if use_ids:
        d_ids = doc_ids if doc_ids is not None else query_ids
        A_q = all_query_ids if all_query_ids is not None else query_ids
        if all_doc_ids is not None:
            A_p = all_doc_ids
        else:  # pair ids: a document carries its query's id
            A_p = A_q if doc_ids is None else d_ids
        if isinstance(negative_ids, torch.Tensor):  # (n, K): one column per negative group
            negative_ids = negative_ids.unbind(1)
        neg_ids = list(negative_ids) if negative_ids is not None else [None] * len(negatives)
        A_n = list(all_negative_ids) if all_negative_ids is not None else neg_ids
        cols_ids = [ids_or_none(A_p, nq)] + [ids_or_none(t, nq) for t in A_n]
        A_docs = torch.cat([t for t, _ in cols_ids])
        has_id = torch.cat([h for _, h in cols_ids])
        same_qd = (query_ids[:, None] == A_docs[None, :]) & has_id[None, :]
        same_qq = query_ids[:, None] == A_q[None, :]
        same_dq = d_ids[:, None] == A_q[None, :]
        same_dd = (d_ids[:, None] == A_docs[None, :]) & has_id[None, :]
    else:
        same_qd = torch.zeros(n, n_docs, dtype=torch.bool, device=dev)
        same_qq = same_dq = torch.zeros(n, nq, dtype=torch.bool, device=dev)
        same_dd = same_qd
    # Blocks: (similarity, removed, positives, shifted)
    blocks, parts = [], []
    s_qd = _sim(query, docs, similarity)
    # ids never reclassify a row's own columns (its positive, its own negatives, its own query).
    if duplicates == "positive":
        positives_qd = pos | (same_qd & ~own)
        removed_qd = torch.zeros_like(pos)
    else:
        positives_qd = pos
        removed_qd = same_qd & ~own
    alpha = hardness_strength if hardness is not None else 0.0
    if hardness == "in_batch_negatives":
        shift_qd = ~own
    elif hardness == "hard_negatives":
        shift_qd = own & (col[None, :] >= nq)
    elif hardness == "all_negatives":
        shift_qd = ~pos
    else:
        shift_qd = torch.zeros_like(pos)
    blocks.append((s_qd, removed_qd, positives_qd, shift_qd & ~positives_qd))
    parts.append(0)
    if bank is not None:
        s_b = _sim(query, bank.detach(), similarity)
        z = torch.zeros(s_b.shape, dtype=torch.bool, device=dev)
        shift_b = ~z if hardness in ("in_batch_negatives", "all_negatives") else z
        blocks.append((s_b, z, z, shift_b))
        parts.append(0)
    per_dir = partition == "per_direction"
    if "query_to_query" in directions:
        z = torch.zeros(n, nq, dtype=torch.bool, device=dev)
        blocks.append((_sim(query, Q, similarity), self_q | (same_qq & ~self_q), z, z))
        parts.append(0)
    if "doc_to_query" in directions:
        z = torch.zeros(n, nq, dtype=torch.bool, device=dev)
        blocks.append((_sim(positive, Q, similarity), same_dq & ~self_q, z, z))
        parts.append(1 if per_dir else 0)
    if "doc_to_doc" in directions:
        z = torch.zeros(n, n_docs, dtype=torch.bool, device=dev)
        blocks.append((_sim(positive, docs, similarity), own | same_dd, z, z))
        parts.append(0)
    n_parts = max(parts) + 1
    logits, valids, targets = [], [], []
    for sim, removed, positives, shifted in blocks:
        L = scale * sim + alpha * torch.where(shifted, sim.detach(), torch.zeros_like(sim))
        L = L.masked_fill(removed, float("-inf"))
        logits.append(L)
        valids.append(~removed)
        targets.append(positives & ~removed)
    lse = []
    for part in range(n_parts):
        lse.append(torch.logsumexp(torch.cat([L for L, p in zip(logits, parts) if p == part], 1), 1))
    total = sum(lse) / n_parts
    L_all = torch.cat(logits, 1)
    valid = torch.cat(valids, 1)
    tgt = torch.cat(targets, 1).to(L_all.dtype)
    eps = label_smoothing
    t = (1 - eps) * tgt / tgt.sum(1, keepdim=True) + eps * valid.to(L_all.dtype) / valid.sum(1, keepdim=True)
    cross = (t * torch.where(valid, L_all, torch.zeros_like(L_all))).sum(1)
    return (total - cross).mean()


def gist_reference(
    query,
    positive,
    negative=None,
    *,
    guide_query,
    guide_positive,
    guide_negative=None,
    temperature=0.01,
    margin_strategy="absolute",
    margin=0.0,
    contrast_anchors=True,
    contrast_positives=True,
    all_positives=None,
    all_negatives=None,
    all_guide_positives=None,
    all_guide_negatives=None,
    offset=0,
):
    """GISTEmbed's loss from its definition: cosine scores of the anchor against positives, anchors,
    positives (from the positive's row) and negatives; columns the guide scores above its positive
    (minus the margin) are removed, the positive never, the anchor's own anchor column and the
    positive's own positive column always; cross-entropy of scores / temperature."""
    P = positive if all_positives is None else all_positives
    GP = guide_positive if all_guide_positives is None else all_guide_positives
    n = query.shape[0]
    dev = query.device
    g = offset + torch.arange(n, device=dev)

    def cos(a, b):
        return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T

    g_ap = cos(guide_query, GP)
    g_pos = g_ap[torch.arange(n, device=dev), g][:, None]
    thr = g_pos - margin if margin_strategy == "absolute" else g_pos - g_pos.abs() * margin
    pos = torch.arange(P.shape[0], device=dev)[None, :] == g[:, None]
    scores = [cos(query, P).masked_fill((g_ap > thr) & ~pos, float("-inf"))]
    if contrast_anchors:
        self_q = torch.eye(n, dtype=torch.bool, device=dev)
        removed = (cos(guide_query, guide_query) > thr) | self_q
        scores.append(cos(query, query).masked_fill(removed, float("-inf")))
    if contrast_positives:
        g_pp = cos(guide_positive, GP)
        scores.append(cos(positive, P).masked_fill((g_pp > thr) | pos, float("-inf")))
    if negative is not None:
        N = negative if all_negatives is None else all_negatives
        GN = guide_negative if all_guide_negatives is None else all_guide_negatives
        scores.append(cos(query, N).masked_fill(cos(guide_query, GN) > thr, float("-inf")))
    logits = torch.cat(scores, 1) / temperature
    return F.cross_entropy(logits, g)


def siglip_negatives_reference(image_features, text_features, negatives, logit_scale, logit_bias=None):
    """SigLIP's sigmoid loss with extra negative columns, materialized: labels +1 on the diagonal of the
    image-text block, -1 on every other pair, the negative columns included; summed, divided by B."""
    cols = torch.cat([text_features, *negatives], 0)
    logits = logit_scale.reshape(()) * image_features @ cols.T
    if logit_bias is not None:
        logits = logits + logit_bias.reshape(())
    n = image_features.shape[0]
    labels = -torch.ones_like(logits)
    labels[torch.arange(n), torch.arange(n)] = 1.0
    return -F.logsigmoid(labels * logits).sum() / n
