"""One decision in one place: the contrastive family's options are defined once (``InfoNCEOptions``,
``GistOptions`` in fastclip/ops/family_variants.py, and the shared ``impl``/``chunk_size``/``check_finite``),
and every public entry that spells them out -- the function, the module, the distributed entry and the
sentence-transformers integration's keyword pass-through -- must agree with that one definition in names and
defaults. A default changed in one place and not the others fails here."""

from __future__ import annotations

import dataclasses
import inspect

from fastclip import InfoNCELoss, info_nce_loss
from fastclip.distributed import info_nce_loss_distributed
from fastclip.ops.family_variants import InfoNCEOptions

COMMON = {"impl": "auto", "chunk_size": None, "check_finite": False}


def _defaults(fn) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_info_nce_entries_agree_with_the_options():
    want = {f.name: f.default for f in dataclasses.fields(InfoNCEOptions)}
    for fn in (info_nce_loss, info_nce_loss_distributed, InfoNCELoss.__init__):
        got = _defaults(fn)
        for name, default in {**want, **COMMON}.items():
            assert name in got, f"{fn.__qualname__}: option {name!r} missing"
            assert got[name] == default, (
                f"{fn.__qualname__}: {name}={got[name]!r}, InfoNCEOptions says {default!r}"
            )
        assert got["scale"] == 20.0, fn.__qualname__  # sentence-transformers' MNRL default
