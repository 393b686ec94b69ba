"""One decision in one place: the contrastive family's options are defined once (``InfoNCEOptions``,
``GistOptions`` in fastclip/ops/family_variants.py, ``Common`` in fastclip/ops/inputs.py: names, defaults,
checks), and the entries that spell them out -- the function, the module and the distributed entry --
derive their signatures from those fields (fastclip/ops/signatures.py). These tests fail if an entry
loses an option, shows another default, accepts a name no option has, or if the derivation stops
following the dataclass (a field added there must appear in the entry)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from fastclip import GistLoss, InfoNCELoss, gist_loss, info_nce_loss
from fastclip.distributed import gist_loss_distributed, info_nce_loss_distributed
from fastclip.ops.family_variants import GistOptions, InfoNCEOptions
from fastclip.ops.inputs import Common
from fastclip.ops.signatures import split_options, takes_options


def _defaults(fn) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _fields(*types) -> dict:
    return {f.name: f.default for t in types for f in dataclasses.fields(t)}


@pytest.mark.parametrize(
    "fn, types",
    [
        (info_nce_loss, (InfoNCEOptions, Common)),
        (info_nce_loss_distributed, (InfoNCEOptions, Common)),
        (InfoNCELoss, (InfoNCEOptions, Common)),
        (gist_loss, (GistOptions, Common)),
        (gist_loss_distributed, (GistOptions, Common)),
        (GistLoss, (GistOptions, Common)),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_entries_show_every_option_with_its_one_default(fn, types):
    got = _defaults(fn)
    for name, default in _fields(*types).items():
        assert name in got, f"{fn.__qualname__}: option {name!r} missing"
        assert got[name] == default, f"{fn.__qualname__}: {name}={got[name]!r}, the options say {default!r}"
        kind = inspect.signature(fn).parameters[name].kind
        assert kind is inspect.Parameter.KEYWORD_ONLY, (fn.__qualname__, name, kind)
    assert not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())


def test_info_nce_scale_default_is_sentence_transformers():
    for fn in (info_nce_loss, info_nce_loss_distributed, InfoNCELoss):
        assert _defaults(fn)["scale"] == 20.0, fn  # MultipleNegativesRankingLoss's default


def test_a_new_field_reaches_the_entry_without_touching_it():
    @dataclasses.dataclass(frozen=True)
    class Extra:
        gamma: float = 0.5

        def __post_init__(self):
            if self.gamma < 0:
                raise ValueError(f"gamma: expected a value >= 0, got {self.gamma}")

    @takes_options(Extra, Common)
    def entry(x, *, scale=1.0, **options):
        return split_options("entry", options, Extra, Common)

    params = inspect.signature(entry).parameters
    assert params["gamma"].default == 0.5 and params["impl"].default == "auto"
    extra, common = entry(1)
    assert extra == Extra() and common == Common()
    assert entry(1, gamma=2.0, impl="torch") == (Extra(2.0), Common("torch"))
    with pytest.raises(ValueError, match="gamma: expected a value >= 0, got -1"):
        entry(1, gamma=-1)


def test_unknown_options_raise_type_errors_naming_them():
    q = torch.randn(4, 8)
    with pytest.raises(TypeError, match=r"info_nce_loss\(\) got an unexpected keyword argument 'temprature'"):
        info_nce_loss(q, q, temprature=0.05)
    with pytest.raises(TypeError, match=r"InfoNCELoss\(\) got an unexpected keyword argument 'margin'"):
        InfoNCELoss(margin=0.1)
    with pytest.raises(TypeError, match=r"gist_loss\(\) got an unexpected keyword argument 'directions'"):
        gist_loss(q, q, guide_query=q, guide_positive=q, directions=("query_to_doc",))
    with pytest.raises(TypeError):  # the options are keyword-only
        InfoNCELoss(20.0, "dot")


def test_options_are_checked_where_they_are_defined():
    with pytest.raises(ValueError, match="partition: expected one of"):
        InfoNCEOptions(partition="both")
    with pytest.raises(ValueError, match="label_smoothing: expected a value in"):
        info_nce_loss(torch.randn(4, 8), torch.randn(4, 8), label_smoothing=1.0)
    with pytest.raises(TypeError, match="contrast_anchors: expected a bool"):
        GistOptions(contrast_anchors=1)
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        Common(chunk_size=0)
    # Normalized once, at construction: a list of directions becomes a tuple, an int strength a float.
    o = InfoNCEOptions(directions=["query_to_doc"], hardness_strength=2)
    assert o.directions == ("query_to_doc",) and isinstance(o.hardness_strength, float)
