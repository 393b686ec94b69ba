"""Randomized differential test of the contrastive family (issue 28's class test).

Every implementation of ``info_nce_loss`` — ``impl="torch"`` (chunked, random chunk sizes),
``impl="reference"`` (materialized, fastclip/reference_family.py), ``impl="triton"`` (the Triton
epilogue, under the interpreter on CPU) and the ``InfoNCELoss`` module — is compared, loss and every
gradient (features and a tensor scale), against a dense float64 oracle written here from the
definitions in docs/design.md ("The contrastive family"), independently of fastclip's code, over
random combinations of: K hard-negative groups, directions, partition, hardness mode and strength,
scale (0 included), cos/dot, query/doc/negative ids (negative integers, collisions with the row's own
columns, groups without ids), duplicates policy, label smoothing, a bank, and one tensor passed as
several operands. ``gist_loss``'s implementations likewise against a GIST oracle (guide margins,
duplicates in the guide's eyes, anchors/positives contrast flags, one tensor as two operands). Fixed
seeds, a bounded number of tiny cases (the Triton interpreter is slow). And ``info_nce_loss_distributed``
("gather" and "ring", 2 gloo ranks): each rank's loss and gradients against the oracle over the whole
batch.

The oracle, cell by cell (row i of n, columns of each block):

* blocks: (q, P) [own column: the positive], (q, N_k) [own column: the row's own negative], (q, bank)
  [no own column]; query_to_query (q, Q) [own removed]; doc_to_query (p, Q) [own column a plain
  column; its own log-sum-exp under per_direction]; doc_to_doc (p, P), (p, N_k) [own removed];
* ids (only with query_ids; documents default to their query's id; a negative group without ids has
  none): a column other than the row's own whose id equals the row's is removed, or under
  duplicates="positive" one more positive in the query->document blocks (q, P), (q, N_k) (removed
  in every other block);
* hardness: L' = s S + alpha sg(S) on the shifted cells: in_batch_negatives: (q, P) and (q, N_k)
  except the own column, the whole bank; hard_negatives: the own column of (q, N_k); all_negatives:
  (q, P) except the own column, all of (q, N_k) and the bank; positives are never shifted;
* row loss: sum_P w_P lse_P - sum_j t_ij L'_ij, w_P = 1 / #parts, t = (1 - eps) uniform(positives)
  + eps uniform(valid columns of all blocks); the loss is the mean over rows.
"""

from __future__ import annotations

import json
import os
import random
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastclip.functional as FF
from fastclip.losses_family import InfoNCELoss
from fastclip.ops.dispatch import triton_available

DIRS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
N_CASES = 300
N_TRITON = 40  # of them, also run through the Triton epilogue (interpreter: slow)
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------------
# the oracle


def oracle_info_nce(
    q, p, negs, bank, scale, *, similarity, directions, partition, hardness, alpha, q_ids, d_ids, n_ids,
    duplicates, eps, per_row=False,
):  # fmt: skip
    """The loss from the definitions (see the module docstring), dense, float64, with autograd
    (``per_row``: the (n,) row losses instead of their mean)."""
    n = q.shape[0]

    def unit(t):
        return F.normalize(t, dim=-1) if similarity == "cos" else t

    qu, pu = unit(q), unit(p)
    nu = [unit(t) for t in negs]
    ids_on = q_ids is not None
    if ids_on and d_ids is None:
        d_ids = q_ids
    hard = hardness if alpha else None

    def same(row_ids, col_ids, i, j):
        return ids_on and row_ids is not None and col_ids is not None and int(row_ids[i]) == int(col_ids[j])

    # Each block: (S, part, cell classifier(i, j) -> "removed" | "positive" | "negative", shifted(i, j)).
    blocks = []

    def qd_block(cols, col_ids, is_pos_group):
        def cls(i, j):
            if j == i:
                return "positive" if is_pos_group else "negative"
            if same(q_ids, col_ids, i, j):
                return "positive" if duplicates == "positive" else "removed"
            return "negative"

        def shifted(i, j, c):
            if c == "positive" or hard is None:
                return False
            if hard == "in_batch_negatives":
                return j != i
            if hard == "hard_negatives":
                return (not is_pos_group) and j == i
            return (j != i) if is_pos_group else True  # all_negatives

        blocks.append((qu @ cols.T, 0, cls, shifted))

    qd_block(pu, d_ids if ids_on else None, True)
    for k, t in enumerate(nu):
        qd_block(t, n_ids[k] if ids_on and n_ids is not None else None, False)
    if bank is not None:
        bank_shift = hard in ("in_batch_negatives", "all_negatives")
        blocks.append((qu @ unit(bank.detach()).T, 0, lambda i, j: "negative", lambda i, j, c: bank_shift))

    def removing(row_ids, col_ids, own_removed):
        def cls(i, j):
            if j == i:
                return "removed" if own_removed else "negative"
            return "removed" if same(row_ids, col_ids, i, j) else "negative"

        return cls

    no_shift = lambda i, j, c: False
    if "query_to_query" in directions:
        blocks.append((qu @ qu.T, 0, removing(q_ids, q_ids, True), no_shift))
    if "doc_to_query" in directions:
        part = 1 if partition == "per_direction" else 0
        blocks.append((pu @ qu.T, part, removing(d_ids, q_ids, False), no_shift))
    if "doc_to_doc" in directions:
        blocks.append((pu @ pu.T, 0, removing(d_ids, d_ids, True), no_shift))
        for k, t in enumerate(nu):
            col_ids = n_ids[k] if ids_on and n_ids is not None else None
            blocks.append((pu @ t.T, 0, removing(d_ids, col_ids, True), no_shift))
    n_parts = 1 + max(b[1] for b in blocks)

    rows = []
    for i in range(n):
        part_terms = [[] for _ in range(n_parts)]
        pos_terms, valid_terms = [], []
        for S, part, cls, shifted in blocks:
            for j in range(S.shape[1]):
                c = cls(i, j)
                if c == "removed":
                    continue
                L = scale * S[i, j]
                if alpha and shifted(i, j, c):
                    L = L + alpha * S[i, j].detach()
                part_terms[part].append(L)
                valid_terms.append(L)
                if c == "positive":
                    pos_terms.append(L)
        lse = sum(torch.logsumexp(torch.stack(t), 0) for t in part_terms) / n_parts
        target = (1 - eps) * torch.stack(pos_terms).mean() + eps * torch.stack(valid_terms).mean()
        rows.append(lse - target)
    rows = torch.stack(rows)
    return rows if per_row else rows.mean()


def oracle_gist(q, p, neg, gq, gp, gn, *, temperature, margin_strategy, margin, contrast_anchors,
                contrast_positives):  # fmt: skip
    """GISTEmbed from its definition (docs/design.md, README): anchor i's scores against every positive,
    every anchor, every positive from its positive's row and every negative; a column other than the
    positive is removed where the guide scores it above g(anchor i, positive i) - margin ("absolute") or
    - |g| margin ("relative"); the anchor's own anchor column and the positive's own positive column
    always; cross-entropy of scores / temperature with the positive as target. Cell by cell."""
    n = q.shape[0]

    def unit(t):
        return F.normalize(t, dim=-1)

    qu, pu = unit(q), unit(p)
    gqu, gpu = unit(gq), unit(gp)
    nu = None if neg is None else unit(neg)
    gnu = None if gn is None else unit(gn)

    def g(a, b):
        return float((a * b).sum())

    total = q.new_zeros(())
    for i in range(n):
        g_pos = g(gqu[i], gpu[i])
        thr = g_pos - margin if margin_strategy == "absolute" else g_pos - abs(g_pos) * margin
        cells, target = [], None
        for j in range(n):
            if j == i:
                target = len(cells)
                cells.append((qu[i] * pu[j]).sum())
            elif not g(gqu[i], gpu[j]) > thr:
                cells.append((qu[i] * pu[j]).sum())
        if contrast_anchors:
            cells += [(qu[i] * qu[j]).sum() for j in range(n) if j != i and not g(gqu[i], gqu[j]) > thr]
        if contrast_positives:
            cells += [(pu[i] * pu[j]).sum() for j in range(n) if j != i and not g(gpu[i], gpu[j]) > thr]
        if nu is not None:
            cells += [(qu[i] * nu[j]).sum() for j in range(n) if not g(gqu[i], gnu[j]) > thr]
        logits = torch.stack(cells) / temperature
        total = total + torch.logsumexp(logits, 0) - logits[target]
    return total / n


# ----------------------------------------------------------------------------------------------------
# random cases


def _case(seed, n=None):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n, d, k = n or rnd.randint(1, 7), rnd.randint(1, 5), rnd.choice([0, 0, 1, 2, 3])
    dirs = ["query_to_doc"] + [x for x in DIRS[1:] if rnd.random() < 0.4]
    partition = "joint"
    if not set(dirs) & {"query_to_query", "doc_to_doc"} and rnd.random() < 0.5:
        partition = "per_direction"
    hardness = rnd.choice(HARDNESS)
    alpha = rnd.choice([0.0, 0.5, 3.0, 10.0]) if hardness else 0.0
    scale_value = rnd.choice([0.0, 0.7, 5.0, 20.0, 45.0])
    scale_is_tensor = scale_value == 0.0 or rnd.random() < 0.6  # a float scale must be > 0
    leaves = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2 + k)]
    q, p, *negs = leaves
    bank = torch.randn(rnd.randint(1, 4), d, generator=g, dtype=torch.float64) if rnd.random() < 0.3 else None
    # one tensor as several operands
    alias = rnd.random() < 0.3
    if alias:
        pick = rnd.choice(["p=q", "neg=p", "neg=q", "neg=neg", "bank=q"])
        if pick == "p=q":
            p = q
        elif pick == "neg=p" and k:
            negs[0] = p
        elif pick == "neg=q" and k:
            negs[-1] = q
        elif pick == "neg=neg" and k >= 2:
            negs[1] = negs[0]
        elif pick == "bank=q":
            bank = q
    ids = {}
    if rnd.random() < 0.6:
        lo = rnd.choice([0, -3, -20])  # negative ids collide with any placeholder a reference might use
        span = rnd.randint(1, max(1, n))
        ids["query_ids"] = torch.randint(lo, lo + span, (n,), generator=g)
        if rnd.random() < 0.3:
            ids["doc_ids"] = torch.randint(lo, lo + span, (n,), generator=g)
        if k and rnd.random() < 0.7:
            groups = [torch.randint(lo, lo + span, (n,), generator=g) for _ in range(k)]
            if rnd.random() < 0.3:
                groups[rnd.randrange(k)] = None  # a negative group without ids
            ids["negative_ids"] = groups if any(t is None for t in groups) else torch.stack(groups, 1)
    duplicates = rnd.choice(["ignore", "positive"]) if "query_ids" in ids else "ignore"
    eps = rnd.choice([0.0, 0.0, 0.1, 0.45])
    opts = dict(
        similarity=rnd.choice(["cos", "cos", "dot"]), directions=tuple(dirs), partition=partition,
        hardness=hardness, hardness_strength=alpha, duplicates=duplicates, label_smoothing=eps,
    )  # fmt: skip
    scale = torch.tensor(scale_value, dtype=torch.float64) if scale_is_tensor else scale_value
    chunk = rnd.choice([None, 1, 2, 3])
    return dict(q=q, p=p, negs=negs, bank=bank, scale=scale, ids=ids, opts=opts, chunk=chunk, seed=seed)


def _uniq(c):
    """The distinct feature tensors of a case (an alias once)."""
    uniq = []
    for t in [c["q"], c["p"], *c["negs"], c["bank"]]:
        if t is not None and all(t is not u for u in uniq):
            uniq.append(t)
    return uniq


def _leaves(c):
    """A function rebuilding the operands of a case from copies of its distinct tensors that require
    grad (a tensor used twice stays one tensor)."""
    uniq = _uniq(c)

    def build(dtype):
        fresh = [u.detach().to(dtype).clone().requires_grad_() for u in uniq]

        def m(t):
            return None if t is None else fresh[next(i for i, u in enumerate(uniq) if u is t)]

        scale = c["scale"]
        if isinstance(scale, torch.Tensor):
            scale = scale.detach().to(dtype).clone().requires_grad_()
        return fresh, m(c["q"]), m(c["p"]), [m(t) for t in c["negs"]], m(c["bank"]), scale

    return build


def _run(c, how, dtype=torch.float64):
    """(loss, [grads of the distinct tensors..., scale grad]) of one implementation."""
    fresh, q, p, negs, bank, scale = _leaves(c)(dtype)
    o, ids = c["opts"], c["ids"]
    if how == "oracle":
        neg_ids = ids.get("negative_ids")
        if isinstance(neg_ids, torch.Tensor):
            neg_ids = list(neg_ids.unbind(1))
        loss = oracle_info_nce(
            q, p, negs, bank, scale, similarity=o["similarity"], directions=o["directions"],
            partition=o["partition"], hardness=o["hardness"], alpha=o["hardness_strength"],
            q_ids=ids.get("query_ids"), d_ids=ids.get("doc_ids"), n_ids=neg_ids,
            duplicates=o["duplicates"], eps=o["label_smoothing"],
        )  # fmt: skip
    elif how == "module":
        mod = InfoNCELoss(**o, impl="torch", chunk_size=c["chunk"])
        loss = mod(q, p, negs or None, scale=scale, bank=bank, **ids)
    else:
        chunk = c["chunk"] if how == "torch" else None
        loss = FF.info_nce_loss(q, p, negs, scale=scale, bank=bank, impl=how, chunk_size=chunk, **o, **ids)
    wrt = fresh + ([scale] if isinstance(scale, torch.Tensor) else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]
    # a bank gets no gradient by definition: its slot must be zero in every implementation
    return loss.detach(), [g.detach().double() for g in grads]


def _describe(c):
    ids = {
        k: (v if isinstance(v, torch.Tensor) else [None if t is None else t.tolist() for t in v])
        for k, v in c["ids"].items()
    }
    scale = c["scale"]
    return (
        f"seed={c['seed']} n={c['q'].shape[0]} D={c['q'].shape[1]} K={len(c['negs'])} "
        f"bank={None if c['bank'] is None else tuple(c['bank'].shape)} scale={scale!r} chunk={c['chunk']} "
        f"opts={c['opts']} ids={ids} aliases={len({id(t) for t in [c['q'], c['p'], *c['negs']]}) < 2 + len(c['negs']) or c['bank'] is c['q']}"
    )


def _assert_close(name, got, want, tol, c):
    loss_g, grads_g = got
    loss_w, grads_w = want
    top = max([1.0, abs(float(loss_w))] + [float(g.abs().max()) for g in grads_w if g.numel()])
    errs = [abs(float(loss_g) - float(loss_w))] + [
        float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(grads_g, grads_w)
    ]
    worst = max(errs)
    assert worst <= tol * top, (
        f"{name}: max |diff| {worst:.3e} (loss {float(loss_g):.6f} vs {float(loss_w):.6f}; per output "
        f"{[f'{e:.1e}' for e in errs]}) for {_describe(c)}"
    )


SEEDS = list(range(N_CASES))


@pytest.mark.parametrize("seed", SEEDS)
def test_info_nce_implementations_equal_the_oracle(seed):
    c = _case(1000 + seed)
    want = _run(c, "oracle")
    assert torch.isfinite(want[0])
    _assert_close("torch", _run(c, "torch"), want, 1e-10, c)
    _assert_close("reference", _run(c, "reference"), want, 1e-10, c)
    if seed % 5 == 0:
        _assert_close("module", _run(c, "module"), want, 1e-10, c)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", SEEDS[:N_TRITON])
def test_info_nce_triton_equals_the_oracle(seed):
    # the Triton cases are drawn from the same generator, among those that exercise the most options
    c = _case(5000 + seed)
    want = _run(c, "oracle")
    _assert_close("triton fp32", _run(c, "triton", torch.float32), want, 2e-4, c)


def _gist_case(seed):
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    n, d, dg = rnd.randint(1, 6), rnd.randint(1, 5), rnd.randint(1, 4)
    q, p, neg = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
    gq, gp, gn = (torch.randn(n, dg, generator=g, dtype=torch.float64) for _ in range(3))
    if n > 1:  # a duplicate in the guide's eyes
        gp[1] = gp[0]
        gq[1] = gq[0]
    with_neg = rnd.random() < 0.5
    alias = rnd.choice([None, "p=q", "neg=p"])
    if alias == "p=q":
        p = q
    elif alias == "neg=p":
        neg = p
    kw = dict(
        temperature=rnd.choice([0.02, 0.1, 1.0]), margin_strategy=rnd.choice(["absolute", "relative"]),
        margin=rnd.choice([0.0, 0.1, -0.2]), contrast_anchors=rnd.random() < 0.7,
        contrast_positives=rnd.random() < 0.7,
    )  # fmt: skip
    return q, p, (neg if with_neg else None), gq, gp, (gn if with_neg else None), kw


def _gist_run(case, impl, dtype=torch.float64, chunk=None):
    """(loss, grads of the distinct feature tensors) of one GIST implementation (or the oracle)."""
    q0, p0, n0, gq, gp, gn, kw = case
    uniq = []
    for t in (q0, p0, n0):
        if t is not None and all(t is not u for u in uniq):
            uniq.append(t)
    fresh = [u.to(dtype).clone().requires_grad_() for u in uniq]

    def m(t):
        return None if t is None else fresh[next(i for i, u in enumerate(uniq) if u is t)]

    if impl == "oracle":
        loss = oracle_gist(m(q0), m(p0), m(n0), gq, gp, gn, **kw)
    else:
        loss = FF.gist_loss(
            m(q0), m(p0), m(n0), guide_query=gq, guide_positive=gp, guide_negative=gn, impl=impl,
            chunk_size=chunk, **kw,
        )  # fmt: skip
    grads = torch.autograd.grad(loss, fresh, allow_unused=True)  # (a removed negative: no gradient)
    return loss.detach(), [(torch.zeros_like(f) if g is None else g).double() for g, f in zip(grads, fresh)]


def _gist_describe(seed, case):
    return dict(
        seed=seed, q=case[0], p=case[1], negs=[], bank=None, scale=None, chunk=2, opts=case[-1], ids={}
    )


@pytest.mark.parametrize("seed", range(60))
def test_gist_implementations_equal_the_oracle(seed):
    case = _gist_case(2000 + seed)
    want = _gist_run(case, "oracle")
    c = _gist_describe(seed, case)
    _assert_close("gist reference", _gist_run(case, "reference"), want, 1e-10, c)
    _assert_close("gist torch", _gist_run(case, "torch", chunk=2), want, 1e-10, c)


@pytest.mark.interpreter
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("seed", range(10))
def test_gist_triton_equals_the_oracle(seed):
    case = _gist_case(2000 + seed)
    want = _gist_run(case, "oracle")
    _assert_close(
        "gist triton fp32", _gist_run(case, "triton", torch.float32), want, 2e-4, _gist_describe(seed, case)
    )


def test_oracle_is_mnrl_and_symmetric_infonce():
    """The oracle itself, on the cases with a closed form: MNRL (cross-entropy over positives and hard
    negatives) and the symmetric per-direction InfoNCE (CLIP's loss)."""
    g = torch.Generator().manual_seed(0)
    q, p, n1 = (torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    common = dict(similarity="cos", hardness=None, alpha=0.0, q_ids=None, d_ids=None, n_ids=None)
    common.update(duplicates="ignore", eps=0.0)
    got = oracle_info_nce(q, p, [n1], None, 7.0, directions=("query_to_doc",), partition="joint", **common)
    logits = 7.0 * F.normalize(q, dim=-1) @ F.normalize(torch.cat([p, n1]), dim=-1).T
    assert abs(float(got) - float(F.cross_entropy(logits, torch.arange(5)))) < 1e-12
    got = oracle_info_nce(
        q, p, [], None, 7.0, directions=("query_to_doc", "doc_to_query"), partition="per_direction", **common
    )
    sim = 7.0 * F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T
    want = (F.cross_entropy(sim, torch.arange(5)) + F.cross_entropy(sim.T, torch.arange(5))) / 2
    assert abs(float(got) - float(want)) < 1e-12


# ----------------------------------------------------------------------------------------------------
# several processes (gloo): each rank's loss and gradients against the oracle over the whole batch

N_DIST_CASES = 16


def _oracle_kwargs(c):
    o, ids = c["opts"], c["ids"]
    neg_ids = ids.get("negative_ids")
    if isinstance(neg_ids, torch.Tensor):
        neg_ids = list(neg_ids.unbind(1))
    return dict(
        similarity=o["similarity"], directions=o["directions"], partition=o["partition"],
        hardness=o["hardness"], alpha=o["hardness_strength"], q_ids=ids.get("query_ids"),
        d_ids=ids.get("doc_ids"), n_ids=neg_ids, duplicates=o["duplicates"], eps=o["label_smoothing"],
    )  # fmt: skip


def _dist_expected(c, world, n):
    """Rank r's loss is the mean of its rows' losses over the whole batch's columns; every rank's
    features get d(sum_r loss_r)/d(features) (the gathered columns' gradients flow to their owners);
    a tensor scale gets d loss_r / ds on rank r (no reduction: as any parameter before DDP's)."""
    fresh, q, p, negs, bank, scale = _leaves(c)(torch.float64)
    rows = oracle_info_nce(q, p, negs, bank, scale, per_row=True, **_oracle_kwargs(c))
    losses = [rows[r * n : (r + 1) * n].mean() for r in range(world)]
    grads = torch.autograd.grad(sum(losses), fresh, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(f) if g is None else g for g, f in zip(grads, fresh)]
    s_grads = None
    if isinstance(scale, torch.Tensor):
        s_grads = [torch.autograd.grad(loss, scale, retain_graph=True)[0] for loss in losses]
    return [float(x) for x in losses], grads, s_grads


def _dist_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    failures, checked = [], 0
    try:
        from fastclip.distributed import info_nce_loss_distributed

        for seed in range(N_DIST_CASES):
            n = random.Random(seed).randint(1, 3)
            c = _case(7000 + seed, n=world * n)
            if c["bank"] is not None and any(c["bank"] is t for t in [c["q"], c["p"], *c["negs"]]):
                c["bank"] = None  # each rank's bank is its own: a bank that is the queries differs per rank
            want_losses, want_grads, want_s = _dist_expected(c, world, n)
            sl = slice(rank * n, (rank + 1) * n)
            uniq = _uniq(c)
            for dist_impl in ("gather", "ring"):
                local = [u[sl].clone().requires_grad_() if u is not c["bank"] else u for u in uniq]

                def m(t, local=local, uniq=uniq):
                    return None if t is None else local[next(i for i, u in enumerate(uniq) if u is t)]

                scale = c["scale"]
                if isinstance(scale, torch.Tensor):
                    scale = scale.clone().requires_grad_()
                ids = {}
                for key, v in c["ids"].items():
                    ids[key] = (
                        v[sl] if isinstance(v, torch.Tensor) else [None if t is None else t[sl] for t in v]
                    )
                loss = info_nce_loss_distributed(
                    m(c["q"]), m(c["p"]), [m(t) for t in c["negs"]] or None, scale=scale, bank=c["bank"],
                    impl="torch", chunk_size=c["chunk"], dist_impl=dist_impl, **c["opts"], **ids,
                )  # fmt: skip
                feats = [t for t in local if t is not c["bank"]]
                wrt = feats + ([scale] if isinstance(scale, torch.Tensor) else [])
                got = torch.autograd.grad(loss, wrt, allow_unused=True)
                got = [torch.zeros_like(w) if g is None else g for g, w in zip(got, wrt)]
                want = [g[sl] for g, u in zip(want_grads, uniq) if u is not c["bank"]]
                want += [want_s[rank]] if want_s is not None else []
                errs = [abs(float(loss) - want_losses[rank])] + [
                    float((a - b).abs().max()) for a, b in zip(got, want)
                ]
                top = max([1.0, abs(want_losses[rank])] + [float(b.abs().max()) for b in want])
                checked += 1
                if not max(errs) <= 1e-10 * top:
                    failures.append(f"{dist_impl}: errors {errs} for {_describe(c)}")
    except Exception:
        failures.append(traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"failures": failures, "checked": checked}, f)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_distributed_info_nce_equals_the_oracle(tmp_path):
    """2 gloo ranks, "gather" and "ring", random cases (float64, the torch blocks)."""
    world = 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dist_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    for r in range(world):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert not res["failures"], f"rank {r}: " + "\n".join(res["failures"][:5])
        assert res["checked"] == 2 * N_DIST_CASES
