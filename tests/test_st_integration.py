"""fastclip.integrations.sentence_transformers against sentence-transformers' own loss classes.

Oracle: the installed sentence-transformers release's classes, same model, same batch, same seed.
Two levels:
* the loss stage on a tiny model's real embeddings, for EVERY combination sentence-transformers
  accepts (directions x partition_mode x pairs/triplets/4-tuples x hardness mode x cos/dot; GIST:
  margin strategy x margin x contrast flags x pair/triplet): loss and the embeddings' gradients;
* end to end (forward + backward through the model): loss and every parameter's gradient, on a set
  of cases in which each option value appears, cached and uncached, in MatryoshkaLoss and
  AdaptiveLayerLoss, with dropout (the cached losses' RNG replay), and under bf16 autocast.
Since the parameters' gradients are a linear function of the embeddings' gradients, the two levels
together check every combination end to end.
"""

from __future__ import annotations

import copy
import itertools
import os
import subprocess
import sys
import warnings

import _st_fixtures as F
import pytest
import sentence_transformers
import torch
from sentence_transformers import util as st_util
from sentence_transformers.sentence_transformer import losses as st_losses

import fastclip
from fastclip.integrations import sentence_transformers as fc

B = 6  # rows per column; the cached losses embed it in mini-batches of 4 (an uneven split)
MINI = 4
RTOL, ATOL = 1e-4, 1e-6  # fp32 (relative to each gradient's largest element)
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
EXTRA = DIRECTIONS[1:]
# Every (directions, partition_mode) sentence-transformers accepts: query_to_doc is required, and
# per_direction refuses query_to_query / doc_to_doc.
JOINT = [("query_to_doc", *c) for r in range(4) for c in itertools.combinations(EXTRA, r)]
PER_DIRECTION = [("query_to_doc",), ("query_to_doc", "doc_to_query")]
DIRECTION_CASES = [(d, "joint") for d in JOINT] + [(d, "per_direction") for d in PER_DIRECTION]
HARDNESS = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
SIMS = {"cos": (st_util.cos_sim, 20.0), "dot": (st_util.dot_score, 0.5)}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ST's deprecated symmetric classes
        warnings.filterwarnings("ignore", message=".*hardness_strength=0.0.*")
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    root = tmp_path_factory.mktemp("st_models")
    out = {
        "model": F.load_model(F.build_model_dir(str(root / "model"), seed=0)),
        "guide": F.load_model(F.build_model_dir(str(root / "guide"), seed=1)),
        "dropout": F.load_model(F.build_model_dir(str(root / "dropout"), seed=2, dropout=0.1)),
        "guide_retok": F.load_model(
            F.build_model_dir(str(root / "guide_retok"), seed=3, vocab_order=F.WORDS[::-1])
        ),
    }
    return out


@pytest.fixture(scope="module")
def feats(models):
    return F.batch(models["model"], B, 4, seed=0)  # anchor, positive, negative_1, negative_2


@pytest.fixture(scope="module")
def embeddings(models, feats):
    """The model's and the guide's embeddings of the 4 columns, as plain tensors."""
    with torch.no_grad():
        emb = [models["model"](dict(f))["sentence_embedding"].clone() for f in feats]
        gemb = [models["guide"](dict(f))["sentence_embedding"].clone() for f in feats]
    return emb, gemb


def _stage(fn, embs):
    """(loss, [grad of each embedding]) of a loss-stage callable on leaf copies of ``embs``."""
    leaves = [e.detach().clone().requires_grad_() for e in embs]
    loss = fn(leaves)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach().double(), {f"emb{i}": (g if g is not None else torch.zeros_like(e)) for i, (g, e) in
                                    enumerate(zip(grads, leaves))}  # fmt: skip


def _check(failures):
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:12])


# ----------------------------------------------------------------------------------------------------
# the loss stage: every combination


def test_mnrl_loss_stage_every_combination(models, embeddings):
    emb, _ = embeddings
    model = models["model"]
    failures, n = [], 0
    for (dirs, part), columns, hardness, sim in itertools.product(DIRECTION_CASES, (2, 3, 4), HARDNESS, SIMS):
        fct, scale = SIMS[sim]
        kw = dict(scale=scale, similarity_fct=fct, directions=dirs, partition_mode=part,
                  hardness_mode=hardness, hardness_strength=3.0 if hardness else 0.0)  # fmt: skip
        ours = fc.MultipleNegativesRankingLoss(model, **kw)
        ref = st_losses.MultipleNegativesRankingLoss(model, **kw)
        got = _stage(lambda e, m=ours: m.compute_loss_from_embeddings(e, None), emb[:columns])
        want = _stage(lambda e, m=ref: m.compute_loss_from_embeddings(e, None), emb[:columns])
        failures += F.compare(f"{dirs}/{part}/{columns}/{hardness}/{sim}", got, want, RTOL, ATOL)
        n += 1
    assert n == 10 * 3 * 4 * 2
    _check(failures)


def test_gist_loss_stage_every_combination(models, embeddings):
    emb, gemb = embeddings
    model, guide = models["model"], models["guide"]
    failures = []
    margins = {"absolute": (0.0, 0.02, 0.3), "relative": (0.0, 0.02, 0.3)}
    margin_matters = 0
    for strategy, flags, columns in itertools.product(
        margins, itertools.product((True, False), repeat=2), (2, 3)
    ):
        ref_losses = set()
        for margin in margins[strategy]:
            kw = dict(temperature=0.05, margin_strategy=strategy, margin=margin,
                      contrast_anchors=flags[0], contrast_positives=flags[1])  # fmt: skip
            ours = fc.GISTEmbedLoss(model, guide, **kw)
            # sentence-transformers' GISTEmbedLoss has no embeddings-only entry; its cached form's
            # calculate_loss is that (the same maths, chunked by mini_batch_size rows).
            ref = st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=MINI, **kw)
            g = gemb[:columns]
            got = _stage(lambda e, m=ours, g=g: m.compute_loss_from_embeddings(e, g), emb[:columns])
            want = _stage(
                lambda e, m=ref, g=g: m.calculate_loss([[x] for x in e], [[x] for x in g]), emb[:columns]
            )
            failures += F.compare(f"{strategy}/{margin}/{flags}/{columns}", got, want, RTOL, ATOL)
            ref_losses.add(round(want[0].item(), 5))
        margin_matters += len(ref_losses) > 1
    _check(failures)
    assert margin_matters >= 8, "the guide's mask hardly depends on the margin here: a weak test"


def test_gist_uncached_stage_equals_st_forward(models, feats):
    """The uncached GISTEmbedLoss end to end, every strategy x flag (pairs and triplets)."""
    model, guide = models["model"], models["guide"]
    failures = []
    for i, (strategy, flags) in enumerate(
        itertools.product(("absolute", "relative"), itertools.product((True, False), repeat=2))
    ):
        kw = dict(temperature=0.05, margin_strategy=strategy, margin=0.02 * (i % 3),
                  contrast_anchors=flags[0], contrast_positives=flags[1])  # fmt: skip
        columns = 2 + i % 2
        got = F.run_loss(fc.GISTEmbedLoss(model, guide, **kw), model, feats[:columns])
        want = F.run_loss(st_losses.GISTEmbedLoss(model, guide, **kw), model, feats[:columns])
        failures += F.compare(f"GIST {kw} columns={columns}", got, want, RTOL, ATOL)
    _check(failures)


# GIST's self columns: sentence-transformers >= 6 removes the anchor's own column of anchor->anchors and
# the positive's own column of positive->positives always; the guide's threshold keeps them where the
# anchor's text is its positive's (guide score 1 = the threshold) or the margin is negative.
ST_MAJOR = int(sentence_transformers.__version__.split(".")[0])
SELF_CASES = {
    "anchors are positives": ("same", {}),
    "negative margin": ("distinct", {"margin": -0.1}),
    "negative relative margin": ("distinct", {"margin_strategy": "relative", "margin": -0.1}),
}


def _self_batch(model, kind, columns):
    if kind == "same":  # the anchor texts are the positive texts
        texts = F.sentences(2 * B, seed=7)
        cols = [texts[:B], texts[:B], texts[B:]]
        return [model.preprocess(c) for c in cols[:columns]]
    return F.batch(model, B, columns, seed=7)


@pytest.mark.skipif(ST_MAJOR < 6, reason="sentence-transformers 5.x keeps the self columns the guide keeps")
@pytest.mark.parametrize("case", list(SELF_CASES))
@pytest.mark.parametrize("columns", [2, 3])
def test_gist_self_columns_match_sentence_transformers(models, case, columns):
    model, guide = models["model"], models["guide"]
    kind, extra = SELF_CASES[case]
    feats = _self_batch(model, kind, columns)
    failures = []
    results = {}
    for cls, kw in (("GISTEmbedLoss", {}), ("CachedGISTEmbedLoss", {"mini_batch_size": MINI})):
        got = F.run_loss(getattr(fc, cls)(model, guide, **extra, **kw), model, feats)
        want = F.run_loss(getattr(st_losses, cls)(model, guide, **extra, **kw), model, feats)
        failures += F.compare(f"{cls} {case}", got, want, RTOL, ATOL)
        results[cls] = got
    failures += F.compare(f"cached vs uncached {case}", results["CachedGISTEmbedLoss"], results["GISTEmbedLoss"],
                          RTOL, ATOL)  # fmt: skip
    # the functional gist_loss on the embeddings against sentence-transformers' loss stage
    with torch.no_grad():
        emb = [model(dict(f))["sentence_embedding"].clone() for f in feats]
        gemb = [guide(dict(f))["sentence_embedding"].clone() for f in feats]
    ref = st_losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=MINI, **extra)
    margin_kw = dict(margin_strategy=ref.margin_strategy, margin=ref.margin)

    def functional(e):
        neg = e[2] if columns == 3 else None
        gneg = gemb[2] if columns == 3 else None
        return fastclip.gist_loss(e[0], e[1], neg, guide_query=gemb[0], guide_positive=gemb[1],
                                  guide_negative=gneg, temperature=ref.temperature, **margin_kw)  # fmt: skip

    got = _stage(functional, emb)
    want = _stage(lambda e: ref.calculate_loss([[x] for x in e], [[x] for x in gemb]), emb)
    failures += F.compare(f"gist_loss {case}", got, want, RTOL, ATOL)
    _check(failures)


# ----------------------------------------------------------------------------------------------------
# end to end: every option value, through the model


def _cover():
    """Each (directions, partition) case once; tuple size, hardness and similarity cycled against it
    (coprime periods), so every value of every option meets several others."""
    for i, (dirs, part) in enumerate(DIRECTION_CASES + [(("query_to_doc",), "joint")] * 2):
        yield dirs, part, 2 + i % 3, HARDNESS[i % 4], ("cos", "dot")[(i // 2) % 2]


@pytest.mark.parametrize("dirs,part,columns,hardness,sim", list(_cover()))
def test_mnrl_end_to_end(models, feats, dirs, part, columns, hardness, sim):
    model = models["model"]
    fct, scale = SIMS[sim]
    kw = dict(scale=scale, similarity_fct=fct, directions=dirs, partition_mode=part,
              hardness_mode=hardness, hardness_strength=2.5 if hardness else 0.0)  # fmt: skip
    got = F.run_loss(fc.MultipleNegativesRankingLoss(model, **kw), model, feats[:columns])
    want = F.run_loss(st_losses.MultipleNegativesRankingLoss(model, **kw), model, feats[:columns])
    # every parameter received a gradient (BERT's pooler is unused by mean pooling)
    assert set(got[1]) == {k for k, _ in model.named_parameters() if ".pooler." not in k}
    _check(F.compare("MNRL", got, want, RTOL, ATOL))


CACHED_CASES = [
    (("query_to_doc",), "joint", 2, None, "cos"),
    (DIRECTIONS, "joint", 3, "in_batch_negatives", "dot"),
    (("query_to_doc", "doc_to_query"), "per_direction", 4, "hard_negatives", "cos"),
    (("query_to_doc", "doc_to_doc"), "joint", 4, "all_negatives", "cos"),
]


@pytest.mark.parametrize("dirs,part,columns,hardness,sim", CACHED_CASES)
def test_cached_mnrl_end_to_end(models, feats, dirs, part, columns, hardness, sim):
    """The dropout model: the second (gradient) pass must replay the first pass's dropout masks."""
    model = models["dropout"]
    fct, scale = SIMS[sim]
    kw = dict(scale=scale, similarity_fct=fct, mini_batch_size=MINI, directions=dirs, partition_mode=part,
              hardness_mode=hardness, hardness_strength=2.5 if hardness else 0.0)  # fmt: skip
    got = F.run_loss(fc.CachedMultipleNegativesRankingLoss(model, **kw), model, feats[:columns])
    want = F.run_loss(st_losses.CachedMultipleNegativesRankingLoss(model, **kw), model, feats[:columns])
    _check(F.compare("CachedMNRL", got, want, RTOL, ATOL))


def test_symmetric_classes(models, feats):
    model = models["model"]
    failures = []
    pairs = [
        (fc.MultipleNegativesSymmetricRankingLoss(model), st_losses.MultipleNegativesSymmetricRankingLoss(model)),
        (fc.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=MINI),
         st_losses.CachedMultipleNegativesSymmetricRankingLoss(model, mini_batch_size=MINI)),
    ]  # fmt: skip
    for ours, ref in pairs:
        assert ours.directions == ref.directions and ours.partition_mode == ref.partition_mode
        assert ours.get_config_dict() == ref.get_config_dict()
        failures += F.compare(
            type(ours).__name__,
            F.run_loss(ours, model, feats[:2]),
            F.run_loss(ref, model, feats[:2]),
            RTOL,
            ATOL,
        )
    _check(failures)


@pytest.mark.parametrize("columns,flags,retok", [(2, (True, True), False), (3, (False, True), True)])
def test_cached_gist_end_to_end(models, feats, columns, flags, retok):
    model = models["dropout"]
    guide = models["guide_retok" if retok else "guide"]
    kw = dict(temperature=0.05, mini_batch_size=MINI, margin_strategy="relative" if retok else "absolute",
              margin=0.02, contrast_anchors=flags[0], contrast_positives=flags[1])  # fmt: skip
    ours = fc.CachedGISTEmbedLoss(model, guide, **kw)
    assert ours.must_retokenize == retok
    got = F.run_loss(ours, model, feats[:columns])
    want = F.run_loss(st_losses.CachedGISTEmbedLoss(model, guide, **kw), model, feats[:columns])
    _check(F.compare("CachedGIST", got, want, RTOL, ATOL))


def test_gist_retokenizing_guide(models, feats):
    model, guide = models["model"], models["guide_retok"]
    ours = fc.GISTEmbedLoss(model, guide, margin=0.01)
    assert ours.must_retokenize
    got = F.run_loss(ours, model, feats[:3])
    want = F.run_loss(st_losses.GISTEmbedLoss(model, guide, margin=0.01), model, feats[:3])
    _check(F.compare("GIST retokenize", got, want, RTOL, ATOL))


# ----------------------------------------------------------------------------------------------------
# wrappers: MatryoshkaLoss and AdaptiveLayerLoss; the fused call at every dimension


@pytest.fixture
def spy(monkeypatch):
    """Record the feature dimension of every fused call (info_nce_loss and gist_loss)."""
    calls = []
    for name in ("info_nce_loss", "gist_loss"):
        real = getattr(fastclip, name)

        def wrapped(query, *args, _real=real, _name=name, **kw):
            calls.append((_name, query.shape[-1]))
            return _real(query, *args, **kw)

        monkeypatch.setattr(fastclip, name, wrapped)
    return calls


@pytest.mark.parametrize("kind", ["mnrl", "cached", "gist", "cached_gist"])
def test_matryoshka(models, feats, spy, kind):
    model, guide = models["model"], models["guide"]
    dims = [32, 16, 8]
    make = {
        "mnrl": lambda ns: ns.MultipleNegativesRankingLoss(model, directions=DIRECTIONS),
        "cached": lambda ns: ns.CachedMultipleNegativesRankingLoss(model, mini_batch_size=MINI, hardness_mode="all_negatives", hardness_strength=2.0),
        "gist": lambda ns: ns.GISTEmbedLoss(model, guide, margin=0.02),
        "cached_gist": lambda ns: ns.CachedGISTEmbedLoss(model, guide, mini_batch_size=MINI),
    }[kind]  # fmt: skip
    columns = 3
    ours = st_losses.MatryoshkaLoss(model, make(fc), dims, matryoshka_weights=[1.0, 0.5, 0.25])
    got = F.run_loss(ours, model, feats[:columns])
    seen = [d for _, d in spy]
    spy.clear()
    want = F.run_loss(
        st_losses.MatryoshkaLoss(model, make(st_losses), dims, matryoshka_weights=[1.0, 0.5, 0.25]),
        model,
        feats[:columns],
    )
    assert seen == dims, f"fused calls at dims {seen}, expected one at each of {dims}"
    assert spy == [], "sentence-transformers' own classes must not reach fastclip"
    _check(F.compare(f"Matryoshka({kind})", got, want, RTOL, ATOL))


def test_adaptive_layer_loss(models, feats, spy):
    model = models["model"]
    ours = st_losses.AdaptiveLayerLoss(model, fc.MultipleNegativesRankingLoss(model), n_layers_per_step=1)
    ref = st_losses.AdaptiveLayerLoss(
        model, st_losses.MultipleNegativesRankingLoss(model), n_layers_per_step=1
    )
    got = F.run_loss(ours, model, feats[:3], seed=5)
    assert len(spy) >= 2  # the last layer and a sampled one, both fused
    want = F.run_loss(ref, model, feats[:3], seed=5)
    _check(F.compare("AdaptiveLayerLoss", got, want, RTOL, ATOL))


# ----------------------------------------------------------------------------------------------------
# bf16 autocast: error against float64 at most twice sentence-transformers' own under the same autocast


def _err(got, truth):
    """Largest error of the loss and of each gradient, relative to that tensor's largest element."""
    loss, grads = got
    out = {"loss": abs(loss.item() - truth[0].item()) / max(1.0, abs(truth[0].item()))}
    for k, t in truth[1].items():
        out[k] = (grads[k].double() - t.double()).abs().max().item() / t.abs().max().item()
    return out


@pytest.mark.parametrize("kind", ["mnrl", "cached", "gist"])
def test_bf16_autocast(models, feats, kind):
    model, guide = models["model"], models["guide"]
    model64, guide64 = copy.deepcopy(model).double(), copy.deepcopy(guide).double()
    make = {
        "mnrl": lambda ns, m, g: ns.MultipleNegativesRankingLoss(m, directions=DIRECTIONS, hardness_mode="in_batch_negatives", hardness_strength=2.0),
        "cached": lambda ns, m, g: ns.CachedMultipleNegativesRankingLoss(m, mini_batch_size=MINI),
        "gist": lambda ns, m, g: ns.GISTEmbedLoss(m, g, temperature=0.05, margin=0.02),
    }[kind]  # fmt: skip
    columns = 3
    truth = F.run_loss(make(st_losses, model64, guide64), model64, feats[:columns])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = F.run_loss(make(fc, model, guide), model, feats[:columns])
        ref = F.run_loss(make(st_losses, model, guide), model, feats[:columns])
    e_got, e_ref = _err(got, truth), _err(ref, truth)
    bad = [
        f"{k}: {e_got[k]:.3g} > 2 x {e_ref[k]:.3g} + 1e-3" for k in e_got if e_got[k] > 2 * e_ref[k] + 1e-3
    ]
    assert max(e_ref.values()) > 1e-4, "autocast did not lower sentence-transformers' precision: no test"
    _check(bad)


# ----------------------------------------------------------------------------------------------------
# the fallback, the class surface, the constructor checks, the optional import


def test_other_similarity_falls_back_with_one_warning(models, feats, spy):
    model = models["model"]

    def my_sim(a, b):
        return st_util.cos_sim(a, b) * 0.5

    for ours_cls, ref_cls, kw in [
        (fc.MultipleNegativesRankingLoss, st_losses.MultipleNegativesRankingLoss, {}),
        (fc.CachedMultipleNegativesRankingLoss, st_losses.CachedMultipleNegativesRankingLoss, {"mini_batch_size": MINI}),
    ]:  # fmt: skip
        ours = ours_cls(model, similarity_fct=my_sim, **kw)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            got = F.run_loss(ours, model, feats[:3])
            F.run_loss(ours, model, feats[:3])
        msgs = [str(w.message) for w in rec if "materialized" in str(w.message)]
        assert len(msgs) == 1 and "my_sim" in msgs[0], msgs
        want = F.run_loss(ref_cls(model, similarity_fct=my_sim, **kw), model, feats[:3])
        _check(F.compare(ours_cls.__name__, got, want, RTOL, ATOL))
    assert spy == []


def test_fallback_warning_without_similarity_fct_name(models, feats, monkeypatch):
    """sentence-transformers 5.7 has no ``util.similarity_fct_name``: the fallback's warning names the
    callable all the same (it raised AttributeError there)."""

    def other_sim(a, b):
        return st_util.cos_sim(a, b) * 0.5

    monkeypatch.delattr(fc._st_util, "similarity_fct_name", raising=False)
    monkeypatch.setattr(fc, "_WARNED", set())
    with pytest.warns(UserWarning, match="similarity_fct=other_sim"):
        F.run_loss(
            fc.MultipleNegativesRankingLoss(models["model"], similarity_fct=other_sim),
            models["model"],
            feats[:2],
        )


@pytest.mark.parametrize(
    "name",
    [
        "MultipleNegativesRankingLoss",
        "CachedMultipleNegativesRankingLoss",
        "GISTEmbedLoss",
        "CachedGISTEmbedLoss",
    ],
)
def test_class_surface(models, name):
    model, guide = models["model"], models["guide"]
    args = (model, guide) if "GIST" in name else (model,)
    ours, ref = getattr(fc, name)(*args), getattr(st_losses, name)(*args)
    assert isinstance(ours, getattr(st_losses, name))
    assert ours.get_config_dict() == ref.get_config_dict()
    assert getattr(ours, "citation", None) == getattr(ref, "citation", None)
    assert ours.temperature == ref.temperature
    import inspect

    assert inspect.signature(type(ours).__init__) == inspect.signature(type(ref).__init__)
    for sym in ("MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss"):
        a, b = (
            inspect.signature(getattr(fc, sym).__init__),
            inspect.signature(getattr(st_losses, sym).__init__),
        )
        assert list(a.parameters) == list(b.parameters)
        assert [p.default for p in a.parameters.values()] == [p.default for p in b.parameters.values()]


@pytest.mark.parametrize(
    "kw",
    [{"scale": 0.0}, {"directions": ()}, {"directions": ("doc_to_query",)}, {"directions": ("query_to_doc", "sideways")},
     {"directions": ("query_to_doc", "query_to_query"), "partition_mode": "per_direction"},
     {"partition_mode": "both"}, {"hardness_mode": "hardest"}, {"hardness_strength": -1.0}],
)  # fmt: skip
def test_constructor_checks_are_sentence_transformers(models, kw):
    model = models["model"]
    for cls in ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"):
        with pytest.raises(ValueError) as ref:
            getattr(st_losses, cls)(model, **kw)
        with pytest.raises(ValueError) as ours:
            getattr(fc, cls)(model, **kw)
        assert str(ours.value) == str(ref.value)


@pytest.mark.parametrize("value", [0, -1, 2.5, None, True])
@pytest.mark.parametrize(
    "name",
    [
        "CachedMultipleNegativesRankingLoss",
        "CachedMultipleNegativesSymmetricRankingLoss",
        "CachedGISTEmbedLoss",
    ],
)
def test_cached_mini_batch_size_is_checked_at_construction(models, name, value):
    """sentence-transformers' own classes accept these and fail at the first forward with Python's
    internals (``range() arg 3 must not be zero``, ``torch.cat(): expected a non-empty list``, ...)."""
    args = (models["model"], models["guide"]) if "GIST" in name else (models["model"],)
    with pytest.raises(ValueError, match=rf"^mini_batch_size: expected a positive int, got {value!r}$"):
        getattr(fc, name)(*args, mini_batch_size=value)
    loss = getattr(fc, name)(*args, mini_batch_size=3)
    assert loss.mini_batch_size == 3 and loss.get_config_dict()["mini_batch_size"] == 3
    with pytest.raises(ValueError, match="mini_batch_size: expected a positive int"):
        loss.mini_batch_size = value  # set later: checked too
    assert loss.mini_batch_size == 3


def test_accepts_what_sentence_transformers_accepts(models, feats):
    """Contrast flags are read by truthiness, repeated directions count once (membership tests)."""
    model, guide = models["model"], models["guide"]
    failures = []
    for cls, args, kw in [
        ("GISTEmbedLoss", (model, guide), dict(contrast_anchors=1, contrast_positives=0)),
        ("MultipleNegativesRankingLoss", (model,), dict(directions=("query_to_doc", "query_to_doc", "doc_to_query"))),
    ]:  # fmt: skip
        got = F.run_loss(getattr(fc, cls)(*args, **kw), model, feats[:3])
        want = F.run_loss(getattr(st_losses, cls)(*args, **kw), model, feats[:3])
        failures += F.compare(f"{cls} {kw}", got, want, RTOL, ATOL)
    _check(failures)


@pytest.mark.parametrize(
    "attrs,name",
    [({"partition_mode": "both"}, "partition_mode"), ({"hardness_mode": "hardest"}, "hardness_mode"),
     ({"partition_mode": "per_direction", "directions": ("query_to_doc", "doc_to_doc")}, "partition_mode")],
)  # fmt: skip
def test_errors_name_sentence_transformers_arguments(models, feats, attrs, name):
    """An attribute changed after construction to a value sentence-transformers' constructor refuses:
    the error names sentence-transformers' argument, not fastclip's (``partition``, ``hardness``)."""
    loss = fc.MultipleNegativesRankingLoss(models["model"], hardness_strength=1.0)
    for key, value in attrs.items():
        setattr(loss, key, value)
    with pytest.raises(ValueError, match=rf"^{name}"):
        F.run_loss(loss, models["model"], feats[:2])


def test_too_few_columns(models, embeddings):
    emb, gemb = embeddings
    with pytest.raises(ValueError, match="at least 2 embeddings"):
        fc.MultipleNegativesRankingLoss(models["model"]).compute_loss_from_embeddings(emb[:1], None)
    with pytest.raises(ValueError, match="2 or 3 embeddings"):
        fc.GISTEmbedLoss(models["model"], models["guide"]).compute_loss_from_embeddings(emb, gemb)


def test_import_fastclip_without_sentence_transformers():
    """``import fastclip`` never imports sentence-transformers; without it the integration says so."""
    code = (
        "import sys, fastclip, fastclip.losses\n"
        "assert 'sentence_transformers' not in sys.modules, 'import fastclip imported sentence_transformers'\n"
        "sys.modules['sentence_transformers'] = None\n"
        "try:\n"
        "    import fastclip.integrations.sentence_transformers\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'fastclip-contrastive[st]'\" in str(e), str(e)\n"
        "    print('OK')\n"
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)  # fmt: skip
    assert out.stdout.strip() == "OK", out.stderr[-2000:]


def test_bench_st_small(tmp_path):
    """``fastclip bench st`` end to end at a small size: every provider, the same loss, JSON + log."""
    import argparse
    import json

    from fastclip.bench.cli import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["st", "--batch", "48", "--dim", "16", "--negatives", "0,1", "--reps", "1",
                              "--mini-batch-size", "16", "--out", str(tmp_path)])  # fmt: skip
    assert run(args) == 0
    (path,) = tmp_path.glob("st_loss_stage_*_cpu.json")
    assert path.with_suffix(".log").exists()
    doc = json.loads(path.read_text())
    recs = doc["records"]
    assert sorted((r["negatives"], r["provider"]) for r in recs) == sorted(
        (k, p) for k in (0, 1) for p in ("fastclip", "st_mnrl", "st_cached")
    )
    for k in (0, 1):
        losses = [r["loss"] for r in recs if r["negatives"] == k]
        assert max(losses) - min(losses) < 1e-4 * max(1.0, abs(losses[0])), losses
    assert all(r["peak_extra_bytes"] > 0 and r["median_s"] > 0 for r in recs)
    assert doc["versions"]["sentence_transformers"]
