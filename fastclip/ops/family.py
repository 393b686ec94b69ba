"""The autograd Function of the contrastive family: one call of the fused block op, for any spec.

``family_loss(spec, operands, ...)`` is the single entry every family loss uses — single-process
functional forms, modules and the distributed gather strategy alike. Forward runs the op
(``torch.ops.fastclip.family`` under ``torch.compile``, its eager body otherwise), which returns the loss
*and* the gradients of every operand that needs one (``fastclip/ops/family_impl.py``: row-local
softmax, one pass); backward only scales them by the incoming gradient. Saved for backward: those
gradients, O((n + N)·D), never the logits.
"""

from __future__ import annotations

import torch

from fastclip import _checks
from fastclip.ops import library
from fastclip.ops.amp import autocast_off, first_order, no_autocast
from fastclip.ops.blocks import _run_block
from fastclip.ops.dispatch import block_impl
from fastclip.ops.family_inputs import gist_margins
from fastclip.ops.family_spec import FamilySpec
from fastclip.ops.family_variants import Layout, gist_spec, info_nce_spec
from fastclip.ops.inputs import nan_if_not_finite


class FamilyFunction(torch.autograd.Function):
    """Inputs: ``spec, impl, chunk_size, (n_ops, unit), scale, *operands, *ids, *guides, thr``; ``spec``
    the typed :class:`FamilySpec`, built once per call and handed to the implementation as it is (the
    custom op, which ``torch.compile`` traces, takes its text form)."""

    @staticmethod
    @autocast_off
    def forward(ctx, spec, impl, chunk_size, layout, scale, *rest):
        n_ops, unit = layout  # unit: normalize the operands (cosine similarity) inside
        ts = list(rest[:n_ops])
        ids = list(rest[n_ops : 2 * n_ops])
        guides = list(rest[2 * n_ops : 3 * n_ops])
        thr = rest[3 * n_ops]
        need = [bool(ctx.needs_input_grad[5 + i]) for i in range(n_ops)]
        need_s = bool(ctx.needs_input_grad[4])
        feats = [t.detach() for t in ts]
        norms = None
        if unit:
            # Unit rows here, not by autograd outside: the normalized copies live only during this
            # forward, and the normalization's Jacobian is applied to the gradients below (O(n·D)).
            feats, norms = zip(*(_unit_rows(t) for t in feats))
        args = (
            spec.to_text() if _checks._is_compiling() else spec,
            list(feats),
            [None if t is None else t.detach() for t in ids],
            [None if t is None else t.detach() for t in guides],
            None if thr is None else thr.detach(),
            scale.detach(),
            need,
            need_s,
            block_impl(impl),
            chunk_size,
        )
        out = _run_block(library.family_op, library.family_impl, *args)
        loss, ds, grads = out[0], out[1], list(out[2:])
        loss = nan_if_not_finite(loss, scale, *ts)
        if unit:
            for g, want, xh, nrm in zip(grads, need, feats, norms):
                if want:
                    _through_unit_rows(g, xh, nrm)
        del feats
        saved = [g if want else None for g, want in zip(grads, need)]
        ctx.save_for_backward(ds, *saved)
        ctx.n_ops = n_ops
        ctx.consumed = False
        ctx.meta = [(t.dtype, t.shape) for t in ts] + [(scale.dtype, scale.shape)]
        return loss

    @staticmethod
    @first_order
    @autocast_off
    def backward(ctx, grad_out):
        if ctx.consumed:
            raise RuntimeError(
                "fastclip's contrastive-family loss was backpropagated twice: its gradients are formed in the "
                "forward and scaled in place by the first backward (retain_graph=True cannot reuse them); "
                "compute the loss again for a second backward"
            )
        ctx.consumed = True
        ds, *grads = ctx.saved_tensors
        n = ctx.n_ops
        g = grad_out.to(ds.dtype)
        out = []
        for grad, (dtype, _) in zip(grads, ctx.meta[:n]):
            # In place: these fp32 buffers were made for this backward; no second (N, D) copy at the peak.
            out.append(None if grad is None else grad.mul_(g).to(dtype))
        s_dtype, s_shape = ctx.meta[n]
        d_scale = (ds * g).to(s_dtype).reshape(s_shape) if ctx.needs_input_grad[4] else None
        return (None, None, None, None, d_scale, *out, *([None] * (2 * n + 1)))


NORM_EPS = 1e-12  # F.normalize's


def _unit_rows(t: torch.Tensor):
    """``(x / max(|x|, eps), |x|)``: F.normalize's rows (computed in float32 for 16-bit inputs, returned
    in the input dtype) and the (n, 1) norms in the accumulation dtype."""
    acc = torch.promote_types(t.dtype, torch.float32)
    nrm = torch.linalg.vector_norm(t, dim=-1, keepdim=True, dtype=acc)
    return (t.to(acc) / nrm.clamp_min(NORM_EPS)).to(t.dtype), nrm


def _through_unit_rows(g: torch.Tensor, xh: torch.Tensor, nrm: torch.Tensor) -> None:
    """In place: ``g`` (the gradient w.r.t. the unit rows) becomes the gradient w.r.t. the raw rows,
    ``(g - xh (xh . g)) / |x|`` (``g / eps`` where ``|x| <= eps``, as F.normalize's clamp gives)."""
    x = xh.to(g.dtype)
    proj = (x * g).sum(-1, keepdim=True).mul_((nrm > NORM_EPS).to(g.dtype))
    g.addcmul_(x, proj, value=-1.0).div_(nrm.clamp_min(NORM_EPS).to(g.dtype))


def family_loss(
    spec: FamilySpec,
    operands: list[torch.Tensor],
    scale: torch.Tensor,
    *,
    ids: list[torch.Tensor | None] | None = None,
    guides: list[torch.Tensor | None] | None = None,
    thr: torch.Tensor | None = None,
    impl: str = "torch",
    chunk_size: int | None = None,
    unit: bool = False,
) -> torch.Tensor:
    """The loss of ``spec`` over checked operands of one dtype (autocast off inside). ``impl`` is a
    resolved implementation ("torch" or "triton"); ``unit``: the similarity is the cosine (operands
    normalized inside, their gradients taken through the normalization)."""
    n_ops = len(operands)
    ids = list(ids) if ids is not None else [None] * n_ops
    guides = list(guides) if guides is not None else [None] * n_ops
    assert len(ids) == n_ops and len(guides) == n_ops
    # One tensor may be several operands (``info_nce_loss(x, x)``, ``negatives=[positive]``, a bank that
    # is the queries): each later use becomes a view of it (no copy), a distinct input of the Function
    # whose gradient autograd adds to the tensor's (the gradient of an operand used twice is the sum).
    # torch.compile refuses one tensor passed twice to one autograd.Function (and so did an assert).
    operands = list(operands)
    seen = set()
    for i, t in enumerate(operands):
        if id(t) in seen:
            operands[i] = t = t.view_as(t)
        seen.add(id(t))
    # The no-gradient side inputs likewise (pair ids shared by queries and documents: O(n) copies).
    aux = []
    for t in [*ids, *guides]:
        if t is not None and id(t) in seen:
            t = t.clone()
        if t is not None:
            seen.add(id(t))
        aux.append(t)
    ids, guides = aux[:n_ops], aux[n_ops:]
    with no_autocast(operands[0].device):
        return FamilyFunction.apply(
            spec, impl, chunk_size, (n_ops, bool(unit)), scale, *operands, *ids, *guides, thr
        )


def info_nce_fused(a, o, chunk_size, *, columns=None, offset: int = 0) -> torch.Tensor:
    """The fused InfoNCE of checked inputs. ``columns``: the gathered ``(Q, P, negs, q_ids, p_ids,
    neg_ids)`` of a multi-process run (``fastclip.distributed``); None: this process's own tensors."""
    ops = [a.q, a.p]
    ids = [a.q_ids, a.p_ids]
    if columns is None:
        Q, P, N = 0, 1, []
        for t, t_ids in zip(a.negs, a.neg_ids):
            N.append(len(ops))
            ops.append(t)
            ids.append(t_ids)
    else:
        cq, cp, cn, cq_ids, cp_ids, cn_ids = columns
        if cq is a.q:  # no block reads the gathered queries
            Q = 0
        else:
            Q = len(ops)
            ops.append(cq)
            ids.append(cq_ids)
        P = len(ops)
        ops.append(cp)
        ids.append(cp_ids)
        N = list(range(len(ops), len(ops) + len(cn)))
        ops += list(cn)
        ids += list(cn_ids)
    bank = None
    if a.bank is not None:
        bank = len(ops)
        ops.append(a.bank.detach())
        ids.append(None)
    with_ids = (
        frozenset(i for i, t in enumerate(ids) if t is not None) if a.q_ids is not None else frozenset()
    )
    lay = Layout(q=0, p=1, Q=Q, P=P, N=tuple(N), bank=bank, with_ids=with_ids, offset=offset)
    spec = info_nce_spec(o, lay, a.q.shape[0])
    unit = o.similarity == "cos"
    return family_loss(spec, ops, a.scale, ids=ids, impl=a.impl, chunk_size=chunk_size, unit=unit)


def gist_fused(a, o, chunk_size, *, columns=None, offset: int = 0) -> torch.Tensor:
    """The fused GIST loss of checked inputs; ``columns``: the gathered ``(P, negs, GP, gnegs)``."""
    if columns is None:
        P, N, GP, GN = a.p, a.negs, a.gp, a.gnegs
        ops, guides = [a.q, a.p, *N], [a.gq, a.gp, *GN]
        lay = Layout(q=0, p=1, Q=0, P=1, N=tuple(range(2, 2 + len(N))))
    else:
        P, N, GP, GN = columns
        ops, guides = [a.q, a.p, P, *N], [a.gq, a.gp, GP, *GN]
        lay = Layout(q=0, p=1, Q=0, P=2, N=tuple(range(3, 3 + len(N))), offset=offset)
    thr = gist_margins(a.gq, a.gp, o)  # the op's thr: per-row margins (family_impl.guide_thresholds)
    spec = gist_spec(o, lay, a.q.shape[0])
    return family_loss(
        spec, ops, a.scale, guides=guides, thr=thr, impl=a.impl, chunk_size=chunk_size, unit=True
    )
