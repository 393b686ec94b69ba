"""The contrastive family (info_nce_loss, gist_loss, InfoNCELoss) against its materialized float64
reference (fastclip/reference_family.py): every option and their combinations, the torch chunks and
the Triton kernels (interpreter), 16-bit budgets, autocast, torch.compile, memory, bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from utils import ABS_FLOOR, LargestOutput, assert_within_budget, max_err

import fastclip.functional as FF
from fastclip.losses_family import InfoNCELoss
from fastclip.ops.dispatch import triton_available
from fastclip.reference_family import gist_reference, info_nce_reference

ALL_DIRS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
DIRECTION_SETS = [
    ("query_to_doc",),
    ("query_to_doc", "query_to_query"),
    ("query_to_doc", "doc_to_query"),
    ("query_to_doc", "doc_to_doc"),
    ALL_DIRS,
]
HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
needs_triton = pytest.mark.skipif(
    not triton_available(torch.device("cpu")), reason="needs TRITON_INTERPRET=1"
)


def _inputs(n, d, k, dtype=torch.float64, seed=0, bank=0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(k + 2)]
    b = torch.randn(bank, d, generator=g, dtype=torch.float64) if bank else None
    ids = torch.randint(0, max(2, n // 3), (n,), generator=g)
    neg_ids = torch.randint(0, max(2, n // 3), (n, k), generator=g) if k else None
    return [t.to(dtype) for t in ts], (None if b is None else b.to(dtype)), ids, neg_ids


def _grads(fn, ts, scale=None):
    leaves = [t.detach().clone().requires_grad_() for t in ts]
    extra = []
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().clone().requires_grad_()
        extra = [scale]
    loss = fn(leaves, scale)
    grads = torch.autograd.grad(loss, leaves + extra)
    return loss.detach(), list(grads)


def _ref(ts, bank, kw, scale):
    q, p, *negs = ts
    return info_nce_reference(q, p, negs, bank=bank, scale=scale, **kw)


def _fused(ts, bank, kw, scale, **impl_kw):
    q, p, *negs = ts
    return FF.info_nce_loss(q, p, negs, bank=bank, scale=scale, **kw, **impl_kw)


def _all_cases():
    cases = []
    for dirs, part, hard, k in itertools.product(
        DIRECTION_SETS, ("joint", "per_direction"), HARDNESS, (0, 2)
    ):
        if part == "per_direction" and set(dirs) & {"query_to_query", "doc_to_doc"}:
            continue
        cases.append((dict(directions=dirs, partition=part, hardness=hard, hardness_strength=2.5), k, False))
    for dup, eps, k, bank in itertools.product(("ignore", "positive"), (0.0, 0.15), (0, 2), (False, True)):
        kw = dict(directions=ALL_DIRS, duplicates=dup, label_smoothing=eps, ids=True)
        cases.append((kw, k, bank))
    cases.append((dict(similarity="dot", hardness="all_negatives", hardness_strength=1.0), 1, True))
    return cases


def _materialize(kw, ids, neg_ids):
    kw = dict(kw)
    if kw.pop("ids", False):
        kw.update(query_ids=ids, negative_ids=neg_ids)
    return kw


@pytest.mark.parametrize("kw,k,bank", _all_cases())
def test_torch_equals_float64_reference(kw, k, bank):
    ts, b, ids, neg_ids = _inputs(11, 6, k, bank=5 if bank else 0)
    kw = _materialize(kw, ids, neg_ids)
    scale = torch.tensor(4.0, dtype=torch.float64)
    want = _grads(lambda t, s: _ref(t, b, kw, s), ts, scale)
    got = _grads(lambda t, s: _fused(t, b, kw, s, impl="torch", chunk_size=4), ts, scale)
    for name, a, w in zip(
        ["loss", "query", "positive", *[f"neg{i}" for i in range(k)], "scale"],
        [got[0], *got[1]],
        [want[0], *want[1]],
    ):
        err, where = max_err(a, w)
        assert err <= 1e-10, f"{name}: max |diff| {err:.2e} at {where}"


def test_reference_is_sentence_transformers_mnrl():
    """The reference's definition is the one sentence-transformers users train with."""
    st = pytest.importorskip("sentence_transformers.sentence_transformer.losses")
    ts, _, _, _ = _inputs(7, 5, 2)
    for dirs, part, hard in [
        (ALL_DIRS, "joint", "in_batch_negatives"),
        (("query_to_doc", "doc_to_query"), "per_direction", "hard_negatives"),
    ]:
        mnrl = st.MultipleNegativesRankingLoss(
            None, scale=9.0, directions=dirs, partition_mode=part, hardness_mode=hard, hardness_strength=1.5
        )
        want = mnrl.compute_loss_from_embeddings(ts, None)
        got = _ref(ts, None, dict(directions=dirs, partition=part, hardness=hard, hardness_strength=1.5), 9.0)
        assert abs(float(want) - float(got)) < 1e-12


def _gist_case(n=9, d=6, dg=4, neg=True, seed=3):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3 if neg else 2)]
    gs = [torch.randn(n, dg, generator=g, dtype=torch.float64) for _ in ts]
    # a duplicate pair: the guide sees rows 0 and 1 as the same text
    gs[0][1] = gs[0][0]
    gs[1][1] = gs[1][0]
    return ts, gs


def _gist(fn, ts, gs, kw):
    q, p, *rest = ts
    return fn(
        q, p, rest[0] if rest else None, guide_query=gs[0], guide_positive=gs[1],
        guide_negative=gs[2] if rest else None, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("strategy", ["absolute", "relative"])
@pytest.mark.parametrize("anchors,positives", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("neg", [True, False])
def test_gist_equals_reference(strategy, anchors, positives, neg):
    ts, gs = _gist_case(neg=neg)
    kw = dict(
        temperature=0.05,
        margin_strategy=strategy,
        margin=0.1,
        contrast_anchors=anchors,
        contrast_positives=positives,
    )
    want = _grads(lambda t, _: _gist(gist_reference, t, gs, kw), ts)
    got = _grads(lambda t, _: _gist(FF.gist_loss, t, gs, dict(kw, impl="torch", chunk_size=4)), ts)
    for a, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        assert max_err(a, w)[0] <= 1e-9


def test_gist_module_is_the_function():
    """``GistLoss`` holds the options and calls the function's entry: same loss and gradients, bitwise;
    its bad arguments raise at construction, naming them."""
    from fastclip import GistLoss

    ts, gs = _gist_case(neg=True)
    kw = dict(margin_strategy="relative", margin=0.1, contrast_anchors=False, impl="torch", chunk_size=4)
    want = _grads(lambda t, _: _gist(FF.gist_loss, t, gs, dict(kw, temperature=0.05)), ts)
    mod = GistLoss(0.05, **kw)
    got = _grads(lambda t, _: mod(t[0], t[1], *t[2:], guide_query=gs[0], guide_positive=gs[1],
                                  guide_negative=gs[2]), ts)  # fmt: skip
    for a, w in zip([got[0], *got[1]], [want[0], *want[1]]):
        assert torch.equal(a, w)
    assert "margin_strategy='relative'" in repr(mod) and "temperature=0.05" in repr(mod)
    # Under bf16 autocast (backward inside the block) the module is the function, bitwise.
    outs = []
    for fn in (lambda t: _gist(FF.gist_loss, t, gs, dict(kw, temperature=0.05)),
               lambda t: mod(t[0], t[1], t[2], guide_query=gs[0], guide_positive=gs[1], guide_negative=gs[2])):  # fmt: skip
        leaves = [t.float().requires_grad_() for t in ts]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn([leaves[0].bfloat16(), *leaves[1:]])
            loss.backward()
        outs.append([loss.detach(), *(x.grad for x in leaves)])
    assert all(torch.equal(a, b) for a, b in zip(*outs)) and torch.isfinite(outs[0][0])
    with pytest.raises(ValueError, match="temperature: expected a value in"):
        GistLoss(temperature=0.0)
    with pytest.raises(ValueError, match="margin_strategy: expected one of"):
        GistLoss(margin_strategy="ratio")
    with pytest.raises(ValueError, match="dist_impl: expected 'gather'"):
        GistLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="impl: expected 'auto', 'triton' or 'torch' here"):
        GistLoss(impl="reference", distributed=True)
    with pytest.raises(TypeError, match="guide_query"):
        mod(gs[0], gs[1])


TRITON_CASES = [
    (dict(), 0, False),
    (dict(directions=ALL_DIRS, hardness="in_batch_negatives", hardness_strength=2.0), 2, False),
    (
        dict(
            directions=("query_to_doc", "doc_to_query"),
            partition="per_direction",
            hardness="hard_negatives",
            hardness_strength=2.0,
        ),
        2,
        False,
    ),
    (
        dict(
            directions=ALL_DIRS,
            duplicates="positive",
            label_smoothing=0.1,
            ids=True,
            hardness="all_negatives",
            hardness_strength=1.0,
        ),
        1,
        True,
    ),
    (dict(directions=ALL_DIRS, duplicates="ignore", ids=True), 2, True),
]


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kw,k,bank", TRITON_CASES)
def test_triton_within_budget(kw, k, bank, dtype):
    n, d = 37, 9  # not a multiple of any block
    ts64, b64, ids, neg_ids = _inputs(n, d, k, bank=20 if bank else 0, seed=5)
    kw = _materialize(kw, ids, neg_ids)
    truth = _grads(lambda t, s: _ref(t, b64, kw, s), ts64, 6.0)
    ts = [t.to(dtype) for t in ts64]
    b = None if b64 is None else b64.to(dtype)
    # the materialized loss computed in the same dtype sets the budget (err <= 2 x its error + floor)
    ref_same = _grads(lambda t, s: _ref(t, b, kw, s), ts, 6.0)
    got = _grads(lambda t, s: _fused(t, b, kw, s, impl="triton"), ts, 6.0)
    outputs = zip([got[0], *got[1]], [ref_same[0], *ref_same[1]], [truth[0], *truth[1]])
    for i, (a, r, w) in enumerate(outputs):
        assert_within_budget(f"triton output {i}", a, r, w, dtype)


@needs_triton
@pytest.mark.interpreter
def test_triton_gist_equals_torch():
    ts, gs = _gist_case(n=21)
    ts = [t.float() for t in ts]
    kw = dict(temperature=0.05, margin=0.05)
    a = _grads(lambda t, _: _gist(FF.gist_loss, t, gs, dict(kw, impl="torch")), ts)
    b = _grads(lambda t, _: _gist(FF.gist_loss, t, gs, dict(kw, impl="triton")), ts)
    for x, y in zip([a[0], *a[1]], [b[0], *b[1]]):
        assert max_err(x, y)[0] <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_inputs_within_budget(dtype):
    ts64, b64, ids, neg_ids = _inputs(40, 16, 2, bank=8, seed=2)
    kw = dict(
        directions=ALL_DIRS,
        hardness="all_negatives",
        hardness_strength=1.0,
        query_ids=ids,
        label_smoothing=0.05,
    )
    truth = _grads(lambda t, s: _ref(t, b64, kw, s), ts64, 10.0)
    ts = [t.to(dtype) for t in ts64]
    same = _grads(lambda t, s: _ref(t, b64.to(dtype), kw, s), ts, 10.0)
    got = _grads(lambda t, s: _fused(t, b64.to(dtype), kw, s, impl="torch"), ts, 10.0)
    assert got[0].dtype == torch.float32 and all(g.dtype == dtype for g in got[1][:-1])
    for i, (a, r, w) in enumerate(zip([got[0], *got[1]], [same[0], *same[1]], [truth[0], *truth[1]])):
        assert_within_budget(f"output {i}", a, r, w, dtype)


@pytest.mark.parametrize("inside", [True, False])
def test_autocast_bf16_mixed_dtypes(inside):
    """A bf16 query tower beside an fp32 document tower under CPU autocast; backward inside or outside."""
    ts64, _, _, _ = _inputs(24, 8, 1, seed=4)
    w = torch.randn(8, 8, dtype=torch.float64)
    truth = _grads(lambda t, s: _ref([t[0] @ w, t[1], t[2]], None, {}, 20.0), ts64)
    q, p, neg = (t.float().requires_grad_() for t in ts64)
    lin = torch.nn.Linear(8, 8, bias=False)
    lin.weight.data = w.T.float().contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qe = lin(q)  # bf16 under autocast
        assert qe.dtype == torch.bfloat16
        loss = FF.info_nce_loss(qe, p, [neg])
        if inside:
            loss.backward()
    if not inside:
        loss.backward()
    assert loss.dtype == torch.float32
    for name, a, t in zip(["loss", "q", "p", "neg"], [loss, q.grad, p.grad, neg.grad], [truth[0], *truth[1]]):
        err, where = max_err(a, t)
        assert err <= 0.05 * max(1.0, float(t.abs().max())), f"{name}: {err:.3e} at {where}"


def test_mixed_dtypes_outside_autocast_raise():
    q = torch.randn(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="positive: expected dtype torch.bfloat16"):
        FF.info_nce_loss(q, torch.randn(4, 3))


def test_compile_fullgraph_matches_eager():
    ts, _, ids, _ = _inputs(16, 8, 1, dtype=torch.float32, seed=6)
    kw = dict(directions=ALL_DIRS, hardness="in_batch_negatives", hardness_strength=1.0, query_ids=ids)

    def step(q, p, n, s):
        return FF.info_nce_loss(q, p, [n], scale=s, impl="torch", **kw)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s = torch.tensor(8.0)
    eager = _grads(lambda t, sc: step(*t, sc), ts, s)
    comp = _grads(lambda t, sc: compiled(*t, sc), ts, s)
    for a, b in zip([eager[0], *eager[1]], [comp[0], *comp[1]]):
        assert max_err(a, b)[0] <= 1e-5


def test_no_tensor_of_n_by_N_elements_and_bank_gets_no_gradient():
    n, d, k, m, chunk = 512, 16, 1, 256, 32
    ts, b, ids, _ = _inputs(n, d, k, dtype=torch.float32, bank=m)
    width = n * (1 + k) + m + n + n + n * (1 + k)  # every block of all four directions
    q, p, neg = (t.requires_grad_() for t in ts)
    bank = b.requires_grad_()  # even a bank that requires grad gets none: it is detached by definition
    with LargestOutput() as mode:
        loss = FF.info_nce_loss(
            q,
            p,
            [neg],
            bank=bank,
            directions=ALL_DIRS,
            query_ids=ids,
            label_smoothing=0.1,
            impl="torch",
            chunk_size=chunk,
        )
        loss.backward()
    assert mode.largest <= chunk * max(n * (1 + k), m) + n * d * 4, (
        f"largest tensor {mode.largest} > one chunk"
    )
    assert mode.largest < n * width // 4
    assert bank.grad is None
    with LargestOutput() as ref:
        _ref([q.detach(), p.detach(), neg.detach()], bank.detach(), dict(directions=ALL_DIRS), 20.0)
    assert ref.largest >= n * n * (1 + k)  # the instrument sees the materialized matrix


def test_module_equals_functional_and_scale_gradient():
    ts, _, _, _ = _inputs(10, 5, 1, dtype=torch.float32)
    mod = InfoNCELoss(scale=7.0, directions=("query_to_doc", "doc_to_query"), partition="per_direction")
    s = torch.tensor(7.0, requires_grad=True)
    a = mod(ts[0], ts[1], [ts[2]], scale=s)
    b = FF.info_nce_loss(
        ts[0],
        ts[1],
        [ts[2]],
        scale=7.0,
        directions=("query_to_doc", "doc_to_query"),
        partition="per_direction",
    )
    assert torch.allclose(a, b)
    a.backward()
    ref = _grads(
        lambda t, sc: _ref(
            t, None, dict(directions=("query_to_doc", "doc_to_query"), partition="per_direction"), sc
        ),
        [t.double() for t in ts],
        torch.tensor(7.0, dtype=torch.float64),
    )
    assert abs(float(s.grad) - float(ref[1][-1])) < 1e-5
    assert "per_direction" in repr(mod)


def test_negatives_as_one_tensor_equal_the_list():
    ts, _, _, _ = _inputs(6, 4, 3, dtype=torch.float32)
    a = FF.info_nce_loss(ts[0], ts[1], ts[2:])
    b = FF.info_nce_loss(ts[0], ts[1], torch.stack(ts[2:], 1))
    assert torch.equal(a, b)


def test_non_finite_inputs_give_nan_or_raise():
    ts, _, _, _ = _inputs(6, 4, 1, dtype=torch.float32)
    ts[2][3, 1] = float("nan")
    assert torch.isnan(FF.info_nce_loss(ts[0], ts[1], [ts[2]], similarity="dot"))
    with pytest.raises(ValueError, match=r"negatives\[0\]: expected finite values"):
        FF.info_nce_loss(ts[0], ts[1], [ts[2]], check_finite=True)


def test_second_derivative_refused():
    q = torch.randn(4, 3, requires_grad=True)
    loss = FF.info_nce_loss(q, torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(loss, q, create_graph=True)[0].sum().backward()


BAD = [
    (dict(negatives=[torch.randn(5, 3)]), ValueError, r"negatives\[0\]: expected shape \(4, 3\)"),
    (dict(negatives=torch.randn(4, 2)), ValueError, "negatives: expected a \\(n, K, D\\) tensor"),
    (dict(query_ids=torch.zeros(3, dtype=torch.long)), ValueError, r"query_ids: expected shape \(4,\)"),
    (dict(query_ids=torch.zeros(4)), TypeError, "query_ids: expected an integer tensor"),
    (
        dict(doc_ids=torch.zeros(4, dtype=torch.long)),
        ValueError,
        "query_ids: expected an integer tensor when doc_ids",
    ),
    (
        dict(negative_ids=torch.zeros(4, 1, dtype=torch.long)),
        ValueError,
        "negative_ids: given without negatives",
    ),
    (
        dict(directions=("query_to_doc", "query_to_query"), partition="per_direction"),
        ValueError,
        "partition: 'per_direction'",
    ),
    (dict(directions=("doc_to_query",)), ValueError, "directions: expected 'query_to_doc'"),
    (dict(directions=("query_to_doc", "sideways")), ValueError, "directions: expected one of"),
    (dict(directions="query_to_doc"), TypeError, "directions: expected a tuple"),
    (
        dict(hardness="in_batch_negatives", hardness_strength=-1.0),
        ValueError,
        "hardness_strength: expected a value in",
    ),
    (dict(hardness="hardest"), ValueError, "hardness: expected one of"),
    (dict(label_smoothing=1.0), ValueError, r"label_smoothing: expected a value in \[0.0, 1.0\)"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(duplicates="merge"), ValueError, "duplicates: expected one of"),
    (dict(similarity="l2"), ValueError, "similarity: expected one of"),
    (dict(scale=0.0), ValueError, "scale: expected a value in"),
    (dict(scale=True), TypeError, "scale"),
    (dict(bank=torch.randn(5, 2)), ValueError, "bank: expected feature dim 3"),
    (dict(impl="fast"), ValueError, "impl: expected one of"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD)
def test_bad_input_names_the_argument(kw, exc, msg):
    kw = dict(kw)
    negatives = kw.pop("negatives", None)
    with pytest.raises(exc, match=msg):
        FF.info_nce_loss(torch.randn(4, 3), torch.randn(4, 3), negatives, **kw)


def test_bad_module_and_gist_arguments():
    with pytest.raises(ValueError, match="scale: expected a positive float"):
        InfoNCELoss(scale=-1.0)
    with pytest.raises(ValueError, match="partition"):
        InfoNCELoss(partition="both")
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="margin_strategy"):
        FF.gist_loss(q, q, guide_query=q, guide_positive=q, margin_strategy="ratio")
    with pytest.raises(ValueError, match="guide_negative: expected exactly when negative"):
        FF.gist_loss(q, q, q, guide_query=q, guide_positive=q)
    with pytest.raises(ValueError, match="temperature"):
        FF.gist_loss(q, q, guide_query=q, guide_positive=q, temperature=0.0)
    with pytest.raises(ValueError, match="guide_positive: expected 4 rows"):
        FF.gist_loss(q, q, guide_query=q, guide_positive=q[:2])


def test_reference_impl_is_offered():
    ts, _, _, _ = _inputs(5, 3, 0, dtype=torch.float32)
    a = FF.info_nce_loss(ts[0], ts[1], impl="reference")
    b = FF.info_nce_loss(ts[0], ts[1], impl="torch")
    assert abs(float(a) - float(b)) < 1e-5
    assert ABS_FLOOR  # budgets shared with the other loss tests


def test_second_backward_with_retain_graph_is_refused():
    q = torch.randn(4, 3, requires_grad=True)
    loss = FF.info_nce_loss(q, torch.randn(4, 3))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


@pytest.mark.parametrize(
    "impl",
    ["torch", pytest.param("triton", marks=[needs_triton, pytest.mark.interpreter])],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_siglip_with_negative_columns(impl, dtype):
    from fastclip.reference_family import siglip_negatives_reference

    g = torch.Generator().manual_seed(8)
    n, d = 21, 7
    ts64 = [
        torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
        for _ in range(4)
    ]
    s64, b64 = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)

    def run(fn, ts, s, b):
        leaves = [t.detach().clone().requires_grad_() for t in [*ts, s, b]]
        loss = fn(leaves)
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    def ref(leaves):
        x, y, n1, n2, s, b = leaves
        return siglip_negatives_reference(x, y, [n1, n2], s, b)

    def fused(leaves):
        x, y, n1, n2, s, b = leaves
        return FF.siglip_loss(x, y, s, b, negatives=torch.stack([n1, n2], 1), impl=impl)

    truth = run(ref, ts64, s64, b64)
    ts = [t.to(dtype) for t in ts64]
    same = run(ref, ts, s64.to(dtype), b64.to(dtype))
    got = run(fused, ts, s64.float(), b64.float())
    for i, (a, r, w) in enumerate(zip(got, same, truth)):
        assert_within_budget(f"siglip output {i}", a, r, w, dtype)
    with pytest.raises(ValueError, match=r"negatives\[0\]: expected shape \(21, 7\)"):
        FF.siglip_loss(ts[0], ts[1], 10.0, negatives=[torch.randn(20, 7, dtype=dtype)])


def test_gradcache_with_hard_negatives_equals_one_large_step():
    """GradCache (fastclip.train.gradcache) caches the negative captions' features like the others: the
    parameter gradients of micro-batches of 3 equal one full-batch step."""
    from fastclip.train.gradcache import gradcache_step

    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img = torch.nn.Linear(5, 8)
            self.txt = torch.nn.EmbeddingBag(30, 8)
            self.logit_scale = torch.nn.Parameter(torch.tensor([2.5]))

        def forward(self, images, texts):  # texts (B, 1 + K, T): the caption, then K negative captions
            b, c, t = texts.shape
            txt = self.txt(texts.reshape(b * c, t)).reshape(b, c, -1)
            return {
                "image_features": self.img(images),
                "text_features": txt[:, 0],
                "negative_features": txt[:, 1:],
                "logit_scale": self.logit_scale.exp(),
            }

    def loss_fn(image_features, text_features, negative_features, logit_scale):
        return FF.info_nce_loss(
            image_features, text_features, negative_features, scale=logit_scale,
            directions=("query_to_doc", "doc_to_query"), partition="per_direction", impl="torch",
        )  # fmt: skip

    model = Tiny()
    images, texts = torch.randn(10, 5), torch.randint(0, 30, (10, 3, 4))
    loss_full = loss_fn(**model(images, texts))
    loss_full.backward()
    full = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    loss_cached = gradcache_step(model, loss_fn, images, texts, micro_batch=3)
    assert abs(float(loss_full) - float(loss_cached)) < 1e-5
    for k, p in model.named_parameters():
        err, where = max_err(p.grad, full[k])
        assert err <= 1e-5, f"{k}: {err:.2e} at {where}"


def test_gist_builds_no_n_by_N_matrix_and_works_under_autocast():
    n, d, chunk = 384, 16, 32
    ts, gs = _gist_case(n=n, d=d, dg=8)
    q, p, neg = (t.float().requires_grad_() for t in ts)
    with LargestOutput() as mode:
        loss = FF.gist_loss(
            q,
            p,
            neg,
            guide_query=gs[0],
            guide_positive=gs[1],
            guide_negative=gs[2],
            impl="torch",
            chunk_size=chunk,
        )
        loss.backward()
    # One chunk of the widest row group (the anchors against positives, anchors and negatives: 3n
    # columns, one buffer in the column model), never n x N (n x 3n would be 12x this).
    assert mode.largest <= chunk * 3 * n + n * d, f"largest tensor {mode.largest}: more than one chunk"
    want = _grads(lambda t, _: _gist(gist_reference, t, gs, dict(temperature=0.01)), ts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        leaves = [t.float().requires_grad_() for t in ts]
        lin = [x * 1.0 for x in leaves]  # stays fp32; the loss casts nothing outside what autocast would
        loss = FF.gist_loss(
            lin[0].bfloat16(), lin[1], lin[2], guide_query=gs[0], guide_positive=gs[1], guide_negative=gs[2]
        )
        loss.backward()
    assert abs(float(loss) - float(want[0])) <= 0.05 * abs(float(want[0]))
    for leaf, w in zip(leaves, want[1]):
        assert max_err(leaf.grad, w)[0] <= 0.05 * max(1.0, float(w.abs().max()))


# ----------------------------------------------------------------------------------------------------
# Issue 28: silent wrong numbers and unclear errors (each test failed before its fix)


def _compare(got, want, tol, names=None):
    for i, (a, w) in enumerate(zip([got[0], *got[1]], [want[0], *want[1]])):
        err, where = max_err(a, w)
        name = names[i] if names else f"output {i}"
        assert err <= tol, (
            f"{name}: max |diff| {err:.3e} at {where} (got {a.flatten()[:3]}, want {w.flatten()[:3]})"
        )


@pytest.mark.parametrize("hardness", ["hard_negatives", "in_batch_negatives", "all_negatives"])
def test_torch_duplicate_positives_in_negative_columns_under_hardness(hardness):
    """duplicates="positive" with negative_ids where another row's negative shares a row's id: that
    column is an extra positive without the hardness shift. The torch implementation divided it by
    (1 + alpha / s) even in blocks where it was never multiplied ("own_only"): 4.3248 for 4.4540."""
    n, d, k = 6, 5, 2
    ts, _, _, _ = _inputs(n, d, k, seed=0)
    qid = torch.arange(n)
    neg_ids = torch.stack([(qid + 1) % n, (qid + 2) % n], 1)  # row i's negatives carry other rows' ids
    kw = dict(
        hardness=hardness, hardness_strength=3.0, query_ids=qid, negative_ids=neg_ids, duplicates="positive"
    )
    scale = torch.tensor(4.0, dtype=torch.float64)
    want = _grads(lambda t, s: _ref(t, None, kw, s), ts, scale)
    got = _grads(lambda t, s: _fused(t, None, kw, s, impl="torch", chunk_size=4), ts, scale)
    _compare(got, want, 1e-10)


@pytest.mark.parametrize("hardness", ["hard_negatives", "in_batch_negatives", "all_negatives"])
def test_torch_hardness_at_scale_zero_is_finite(hardness):
    """A tensor scale of 0 with hardness: L' = alpha * sg(S) on the shifted cells. The torch
    implementation formed 1 + alpha / s (NaN); the reference gives 3.7729 here."""
    ts, b, ids, _ = _inputs(7, 5, 2, seed=1, bank=3)
    kw = dict(hardness=hardness, hardness_strength=3.0, directions=ALL_DIRS, query_ids=ids)
    scale = torch.tensor(0.0, dtype=torch.float64)
    want = _grads(lambda t, s: _ref(t, b, kw, s), ts, scale)
    got = _grads(lambda t, s: _fused(t, b, kw, s, impl="torch", chunk_size=3), ts, scale)
    assert torch.isfinite(got[0])
    _compare(got, want, 1e-10)


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_negative_user_ids_never_match_id_less_columns(impl):
    """Negative groups without negative_ids carry no id. The reference gave them placeholder ids
    -(base + j) - 1, which equal users' negative ids (reference 6.4118, torch 6.5641 = the loss
    without ids). Relabelling the ids (a bijection) never changes the loss."""
    n, d, k = 6, 5, 2
    ts, _, _, _ = _inputs(n, d, k, seed=2)
    i = torch.arange(n)
    placeholder_ids = -(n + (i + 1) % n) - 1  # what the reference gave negative group 0's columns
    want = _grads(lambda t, s: _fused(t, None, dict(query_ids=i + 100), s, impl="torch"), ts, 20.0)
    for qid in (placeholder_ids, -(2 * n + (i + 2) % n) - 1, -i - 1):
        got = _grads(lambda t, s, qid=qid: _fused(t, None, dict(query_ids=qid), s, impl=impl), ts, 20.0)
        _compare(got, want, 1e-10)


def _same_tensor_cases(x, y):
    """(name, fused(impl), reference) pairs that pass one tensor as several operands."""
    gx, gy = x.detach() * 0.5 + 0.1, y.detach().flip(0)
    both = dict(directions=ALL_DIRS, hardness="all_negatives", hardness_strength=1.0)
    return [
        ("info_nce(x, x)", lambda impl: FF.info_nce_loss(x, x, impl=impl), lambda: info_nce_reference(x, x)),
        (
            "negatives=[positive]",
            lambda impl: FF.info_nce_loss(x, y, [y], directions=ALL_DIRS, impl=impl),
            lambda: info_nce_reference(x, y, [y], directions=ALL_DIRS),
        ),
        (
            "negatives=[n, n], bank=query",
            lambda impl: FF.info_nce_loss(x, y, [x, x], bank=x, impl=impl, **both),
            lambda: info_nce_reference(x, y, [x, x], bank=x, **both),
        ),
        (
            "gist(x, x, x)",
            lambda impl: FF.gist_loss(
                x, x, x, guide_query=gx, guide_positive=gy, guide_negative=gx, impl=impl
            ),
            lambda: gist_reference(x, x, x, guide_query=gx, guide_positive=gy, guide_negative=gx),
        ),
    ]


def test_one_tensor_as_several_operands():
    """The same tensor object as query and positive, as a negative group twice, as a bank: computed (it
    raised "AssertionError: an operand passed twice"), its gradient the sum over its uses."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    for name, fused, ref in _same_tensor_cases(x, y):
        want = ref()
        want_grads = torch.autograd.grad(want, [x, y], allow_unused=True)
        for impl in ("torch", "reference"):
            got = fused(impl)
            got_grads = torch.autograd.grad(got, [x, y], allow_unused=True)
            assert abs(float(got) - float(want)) <= 1e-10, (name, impl, float(got), float(want))
            for a, w in zip(got_grads, want_grads):
                if w is None:
                    assert a is None or float(a.abs().max()) == 0.0, (name, impl)
                else:
                    assert max_err(a, w)[0] <= 1e-10, (name, impl)


def test_one_tensor_as_several_operands_compiles_fullgraph():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(6, 5, generator=g, requires_grad=True)
    y = torch.randn(6, 5, generator=g, requires_grad=True)

    def step(a, b):
        return FF.info_nce_loss(
            a, a, [b, b], impl="torch", hardness="in_batch_negatives", hardness_strength=1.0
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = _grads(lambda t, _: step(*t), [x, y])
    comp = _grads(lambda t, _: compiled(*t), [x, y])
    for a, b in zip([eager[0], *eager[1]], [comp[0], *comp[1]]):
        assert max_err(a, b)[0] <= 1e-5


@pytest.mark.parametrize("module", [False, True])
def test_ids_without_query_ids_and_positive_without_ids_raise(module):
    """negative_ids without query_ids was silently ignored (doc_ids without query_ids raised), and
    duplicates="positive" without ids silently did nothing: both are a ValueError naming query_ids."""
    q, p, neg = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    ids = torch.arange(4)

    def call(duplicates="ignore", **kw):
        if module:
            return InfoNCELoss(duplicates=duplicates)(q, p, [neg], **kw)
        return FF.info_nce_loss(q, p, [neg], duplicates=duplicates, **kw)

    with pytest.raises(ValueError, match="query_ids: expected an integer tensor when negative_ids is given"):
        call(negative_ids=ids[:, None])
    with pytest.raises(ValueError, match="query_ids: expected an integer tensor with duplicates='positive'"):
        call(duplicates="positive")
    call(duplicates="positive", query_ids=ids)  # with ids: fine
    call()  # the default "ignore" without ids: nothing to remove, no error


def test_siglip_negative_errors_name_image_features():
    """siglip_loss has no ``query``: its negatives' shape errors named it."""
    x, y, s = torch.randn(4, 3), torch.randn(4, 3), torch.tensor(10.0)
    with pytest.raises(ValueError, match=r"negatives\[0\]: expected shape \(4, 3\) \(as image_features\)"):
        FF.siglip_loss(x, y, s, negatives=[torch.randn(5, 3)])
    with pytest.raises(ValueError, match=r"negatives: expected shape \(4, K, 3\) \(as image_features\)"):
        FF.siglip_loss(x, y, s, negatives=torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match=r"negatives\[0\]: expected shape \(4, 3\) \(as query\)"):
        FF.info_nce_loss(x, y, [torch.randn(5, 3)])


def test_module_checks_dist_impl_without_distributed():
    """InfoNCELoss(dist_impl="rign") was accepted while distributed=False."""
    with pytest.raises(ValueError, match=r"dist_impl: expected one of \('gather', 'ring'\), got 'rign'"):
        InfoNCELoss(dist_impl="rign")
    with pytest.raises(ValueError, match="dist_impl"):
        InfoNCELoss(dist_impl=["ring"], distributed=True)
    assert InfoNCELoss(dist_impl="ring").dist_impl == "ring"


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_float_scale_keeps_float64_precision(impl):
    """A Python-float scale (or GIST temperature) beside float64 features is a float64 scalar: it was
    made float32 (0.7 -> 0.699999988), an error of ~1e-8 in a float64 loss. Found by the randomized
    differential test (tests/test_family_differential.py)."""
    ts, _, _, _ = _inputs(5, 4, 1, seed=3)
    exact = torch.tensor(0.7, dtype=torch.float64)
    a = _fused(ts, None, dict(similarity="dot"), 0.7, impl=impl)
    b = _fused(ts, None, dict(similarity="dot"), exact, impl=impl)
    assert abs(float(a) - float(b)) <= 1e-13, (float(a), float(b))
    q, p, n = ts
    g = dict(guide_query=q, guide_positive=p)
    a = FF.gist_loss(q, p, temperature=0.07, impl=impl, **g)
    want = gist_reference(q, p, temperature=0.07, **g)
    assert abs(float(a) - float(want)) <= 1e-12, (float(a), float(want))


@pytest.mark.parametrize(
    "impl", ["torch", pytest.param("triton", marks=[needs_triton, pytest.mark.interpreter])]
)
def test_gist_duplicate_positive_ties_as_the_reference(impl):
    """A batch with the same positive twice (equal guide embeddings) at the default margin 0: the
    duplicate's guide similarity equals the positive's exactly, so (strict ">", as sentence-transformers)
    it stays. The fused paths compared a GEMM tile with a separately computed dot product (float64:
    1 ulp apart in some batches; Triton: an fp32 tile against a float64 threshold) and removed it there:
    e.g. 5.6036 for 7.4541. Found by the randomized differential test."""
    dtype, tol = (torch.float64, 1e-10) if impl == "torch" else (torch.float32, 2e-4)
    for seed in range(60 if impl == "torch" else 20):
        g = torch.Generator().manual_seed(seed)
        dg = 1 + seed % 7
        q, p = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(2))
        gq, gp = (torch.randn(4, dg, generator=g, dtype=torch.float64) for _ in range(2))
        gp[1], gq[1] = gp[0], gq[0]  # rows 0 and 1: the same texts, in the guide's eyes
        kw = dict(guide_query=gq, guide_positive=gp, temperature=0.1, margin=0.0)
        want = _grads(lambda t, _, kw=kw: gist_reference(*t, **kw), [q, p])
        got = _grads(
            lambda t, _, kw=kw: FF.gist_loss(*(x.to(dtype) for x in t), impl=impl, chunk_size=None, **kw),
            [q, p],
        )
        for a, w in zip([got[0], *got[1]], [want[0], *want[1]]):
            assert max_err(a, w)[0] <= tol, (seed, float(got[0]), float(want[0]))
