"""Data: synthetic shapes (held-out pairs, determinism, rank slices), CSV streams (per-rank
sharding, resume position, missing paths), and the evaluation metrics. webdataset streams:
tests/test_data_shards.py."""

from __future__ import annotations

import io
import os
import types

import numpy as np
import pytest
import torch

from fastclip.models import WordTokenizer
from fastclip.train import data
from fastclip.train.evaluate import retrieval_recall, topk_accuracy, zeroshot_classifier


def _cfg(**kw):
    base = dict(
        image_key="image",
        caption_key="caption",
        label_key="label",
        delimiter=None,
        workers=0,
        shuffle_buffer=4,
    )
    return types.SimpleNamespace(**{**base, **kw})


# ---- synthetic -------------------------------------------------------------------------------


def test_synthetic_held_out_pairs_never_train():
    ds = data.SyntheticShapes(16, seed=3)
    held = {c * len(ds.shapes) + s for c, s in ds.held_out}
    assert 0 < len(held) < len(ds.classnames) // 2
    train_labels = torch.cat([ds.batch("train", i, 256)[2] for i in range(4)])
    assert not set(train_labels.tolist()) & held
    assert len(set(train_labels.tolist())) == len(ds.classnames) - len(held)  # every seen pair occurs
    _, captions, labels = ds.batch("heldout", 0, 200)
    assert set(labels.tolist()) <= held and len(set(labels.tolist())) == len(held)
    # every colour and every shape still occurs in training with other partners
    assert {int(l) // len(ds.shapes) for l in train_labels} == set(range(len(ds.colors)))
    assert {int(l) % len(ds.shapes) for l in train_labels} == set(range(len(ds.shapes)))
    for cap, lab in zip(captions, labels.tolist()):
        color, shape = ds.classnames[lab].split()
        assert color in cap.split() or shape in cap.split(), (cap, ds.classnames[lab])


def test_synthetic_deterministic_and_tokenizable():
    ds = data.SyntheticShapes(32, seed=0)
    a, ca, la = ds.batch("train", 7, 33)
    b, cb, lb = ds.batch("train", 7, 33)
    c, _, _ = ds.batch("train", 8, 33)
    assert torch.equal(a, b) and ca == cb and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (33, 3, 32, 32) and a.dtype == torch.float32 and torch.isfinite(a).all()
    tok = WordTokenizer(ds.vocabulary(), 16)
    ids = tok(ca + [t.format(n) for n in ds.classnames for t in ds.templates])
    assert not (ids == tok.UNK).any(), "every caption and prompt word is in the vocabulary"
    with pytest.raises(ValueError, match="split"):
        ds.batch("test", 0, 4)
    with pytest.raises(ValueError, match="image_size"):
        data.SyntheticShapes(4)


def test_synthetic_stream_ranks_slice_the_global_batch():
    ds = data.SyntheticShapes(16)
    full = data.SyntheticStream(ds, 12, 0, 1)
    ranks = [data.SyntheticStream(ds, 12, r, 3) for r in range(3)]
    img, cap = full.next_batch()
    parts = [s.next_batch() for s in ranks]
    assert torch.equal(torch.cat([p[0] for p in parts]), img) and sum((p[1] for p in parts), []) == cap
    resumed = data.SyntheticStream(ds, 12, 1, 3)
    resumed.load_state_dict(ranks[1].state_dict())
    assert torch.equal(resumed.next_batch()[0], ranks[1].next_batch()[0])
    with pytest.raises(data.DataError, match="data state"):
        resumed.load_state_dict({"kind": "csv", "position": 1})


# ---- files -----------------------------------------------------------------------------------


def _png(color, size=(20, 14)):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def table(tmp_path):
    rows = ["image,caption,label"]
    for i in range(10):
        name = f"img{i}.png"
        (tmp_path / name).write_bytes(_png((20 * i, 10, 200 - 10 * i)))
        rows.append(f"{name},picture number {i},{i % 2}")
    path = tmp_path / "train.csv"
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_csv_stream_sharding_and_resume(table):
    cfg = _cfg()
    streams = [data.CsvStream(table, cfg, 8, 4, r, 2, seed=1) for r in range(2)]
    seen = []
    for _ in range(2):  # one epoch: 10 rows // 4 = 2 global batches
        batches = [s.next_batch() for s in streams]
        assert all(b[0].shape == (2, 3, 8, 8) for b in batches)
        seen += batches[0][1] + batches[1][1]
    assert len(set(seen)) == 8, "the ranks read disjoint rows"
    ref = data.CsvStream(table, cfg, 8, 4, 0, 2, seed=1)
    expected = [ref.next_batch() for _ in range(5)]  # crosses into epochs 2 and 3
    resumed = data.CsvStream(table, cfg, 8, 4, 0, 2, seed=1)
    resumed.load_state_dict({"kind": "csv", "position": 3})
    for want in expected[3:]:
        got = resumed.next_batch()
        assert got[1] == want[1] and torch.equal(got[0], want[0])


def test_csv_errors(tmp_path, table):
    cfg = _cfg()
    with pytest.raises(data.DataError, match="data file not found"):
        data.CsvStream(str(tmp_path / "none.csv"), cfg, 8, 4, 0, 1, 0)
    os.remove(os.path.join(os.path.dirname(table), "img3.png"))
    with pytest.raises(data.DataError, match=r"1 image file\(s\) not found, e.g. .*img3.png"):
        data.CsvStream(table, cfg, 8, 4, 0, 1, 0)
    with pytest.raises(data.DataError, match=r"expected a column 'path' \(data.image_key\)"):
        data.CsvStream(table, _cfg(image_key="path"), 8, 4, 0, 1, 0)
    empty = tmp_path / "empty.tsv"
    empty.write_text("image\tcaption\n")
    with pytest.raises(data.DataError, match="at least one row"):
        data.read_table(str(empty), "image", "caption", None)


def test_table_eval_set_labels(table):
    es = data.table_eval_set(table, _cfg(), 8, ["even", "odd"], None)
    assert es.images.shape == (10, 3, 8, 8) and es.labels.tolist() == [i % 2 for i in range(10)]
    with pytest.raises(data.DataError, match="set eval.classnames"):
        data.table_eval_set(table, _cfg(), 8, None, None)
    with pytest.raises(data.DataError, match=r"label 1 is outside \[0, 1\)"):
        data.table_eval_set(table, _cfg(), 8, ["only"], None)


def test_load_image_resize_and_crop():
    img = data.load_image(_png((255, 0, 0), size=(40, 20)), 10, mean=(0, 0, 0), std=(1, 1, 1))
    assert img.shape == (3, 10, 10)
    assert torch.allclose(img[0], torch.ones(10, 10)) and torch.allclose(img[1:], torch.zeros(2, 10, 10))


# ---- metrics ---------------------------------------------------------------------------------


def test_topk_and_recall_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.5, 0.4]])
    acc = topk_accuracy(scores, torch.tensor([0, 0, 2]), ks=(1, 2, 5))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 5: 1.0}
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # texts 1 and 2 swapped
    r = retrieval_recall(img, txt, ks=(1, 2))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["t2i_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == pytest.approx(1 / 3)  # rows 1, 2: the paired text scores 0, tied last
    r = retrieval_recall(img, txt, groups=torch.tensor([0, 1, 1]), ks=(1,))
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0, "identical captions count as the same pair"
    with pytest.raises(ValueError, match="text_f"):
        retrieval_recall(img, txt[:2])


def test_zeroshot_classifier_averages_templates():
    class Fake:
        def encode_text(self, ids, normalize=False):
            x = torch.nn.functional.one_hot(ids[:, 1] - 3, 4).float() + 0.1 * ids[:, 2:3].float()
            return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    tok = WordTokenizer(["a", "b", "c", "d", "x", "y"], 6)
    cls = zeroshot_classifier(Fake(), tok, ["a", "b"], ["{} x", "{} y"], 8, "cpu")
    assert cls.shape == (2, 4) and torch.allclose(cls.norm(dim=-1), torch.ones(2))
    assert int(cls[0].argmax()) == 0 and int(cls[1].argmax()) == 1
    with pytest.raises(ValueError, match="templates"):
        zeroshot_classifier(Fake(), tok, ["a"], ["no slot"], 8, "cpu")
    np.testing.assert_allclose(float(cls[0, 0]), float(cls[1, 1]), rtol=1e-6)
