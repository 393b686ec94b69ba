"""CSV streams and tables (fastclip.data): worker-independent exact order, O(1) resume far into a run,
corrupt images replaced and counted, one-line errors for empty captions, data.root confinement."""

from __future__ import annotations

import io
import os
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.data import CsvStream, DataError, read_table
from fastclip.data.streams import PositionSampler


def _cfg(**kw):
    base = dict(image_key="image", caption_key="caption", label_key="label", delimiter=None, workers=0)
    return types.SimpleNamespace(**{**base, **kw})


def _write_png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def table(tmp_path):
    rows = ["image,caption"]
    for i in range(12):
        _write_png(tmp_path / f"im{i}.png", i)
        rows.append(f"im{i}.png,caption {i}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "t.csv")


def _same(a, b):
    for (ia, ca), (ib, cb) in zip(a, b):
        assert ca == cb and torch.equal(ia, ib)


def test_order_and_augmentation_do_not_depend_on_workers(table):
    runs = []
    for workers in (0, 2):
        s = CsvStream(table, _cfg(workers=workers), 8, 4, 0, 1, seed=2)
        runs.append([s.next_batch() for _ in range(7)])  # 3 batches per epoch: crosses two epochs
    _same(runs[0], runs[1])
    s = CsvStream(table, _cfg(workers=1), 8, 4, 0, 1, seed=2)
    s.load_state_dict({"kind": "csv", "position": 4})
    _same([s.next_batch() for _ in range(3)], runs[0][4:])


def test_resume_at_a_million_samples_is_constant_time(table):
    t0 = time.perf_counter()
    s = CsvStream(table, _cfg(), 8, 4, 0, 2, seed=0)
    position = 10**6 // 4  # global batches of 4: 10^6 samples
    s.load_state_dict({"kind": "csv", "position": position})
    images, caps = s.next_batch()
    assert time.perf_counter() - t0 < 5.0
    epoch, k = divmod(position, 12 // 4)  # the sampler's definition, computed here by hand
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0 * 100003 + epoch)).tolist()
    assert caps == [f"caption {i}" for i in perm[k * 4 : k * 4 + 2]]
    assert images.shape == (2, 3, 8, 8)


def test_position_sampler_covers_each_epoch_once_per_rank_pair():
    samplers = [iter(PositionSampler(10, 4, r, 2, 7, 0)) for r in range(2)]
    rows = [row for _ in range(2) for s in samplers for row, _ in next(s)]
    assert len(rows) == 8 and len(set(rows)) == 8  # one epoch: 2 global batches, disjoint rows


def test_corrupt_image_replaced_by_next_row_and_counted(table, capsys):
    folder = os.path.dirname(table)
    with open(os.path.join(folder, "im3.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    s = CsvStream(table, _cfg(workers=1), 8, 12, 0, 1, seed=0)  # one batch = the whole epoch
    images, caps = s.next_batch()
    assert "caption 3" not in caps and caps.count("caption 4") == 2
    assert s.skipped == 1 and s.state_dict()["skipped"] == 1
    assert "im3.png: unreadable image" in capsys.readouterr().err


def test_empty_caption_is_a_one_line_error(tmp_path):
    _write_png(tmp_path / "a.png", 0)
    (tmp_path / "t.csv").write_text("image,caption\na.png,fine\na.png,\n")
    with pytest.raises(DataError, match=r"t.csv: row 3: empty 'caption' \(caption\)$"):
        read_table(str(tmp_path / "t.csv"), "image", "caption")
    (tmp_path / "u.tsv").write_text("image\tcaption\n\tno image\n")
    with pytest.raises(DataError, match=r"u.tsv: row 2: empty 'image' \(image path\)"):
        read_table(str(tmp_path / "u.tsv"), "image", "caption")


def test_root_confines_image_paths(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_png(data / "a.png", 0)
    _write_png(tmp_path / "secret.png", 1)
    os.symlink(tmp_path / "secret.png", data / "link.png")
    ok = tmp_path / "ok.csv"
    ok.write_text("image,caption\na.png,inside\n")
    images, _, _ = read_table(str(ok), "image", "caption", root=str(data))
    assert images == [str((data / "a.png").resolve())]
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "link.png"):
        t = data / "bad.csv"
        t.write_text(f"image,caption\na.png,x\n{bad},y\n")
        with pytest.raises(DataError, match=r"row 3: image .* lies outside data.root"):
            read_table(str(t), "image", "caption", root=str(data))
        if bad != "link.png":
            read_table(str(t), "image", "caption")  # without data.root: allowed, as documented
    with pytest.raises(DataError, match="data.root: expected a directory"):
        read_table(str(ok), "image", "caption", root=str(tmp_path / "nope"))


def test_workers_value_checked(table):
    with pytest.raises(DataError, match="data.workers"):
        CsvStream(table, _cfg(workers=-1), 8, 4, 0, 1, seed=0)


def test_encoded_image_in_memory_decodes_like_a_file(tmp_path):
    from fastclip.data import decode_image

    _write_png(tmp_path / "a.png", 3)
    buf = io.BytesIO((tmp_path / "a.png").read_bytes())
    a, b = decode_image(str(tmp_path / "a.png")), decode_image(buf.getvalue())
    assert a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(Exception, match="not an image"):
        decode_image(b"hello")


def test_trainer_tokenizer_reads_the_table_under_data_root(tmp_path):
    """With data.root, relative paths start at the root also where the trainer builds its vocabulary."""
    from fastclip.train.build import build_model
    from fastclip.train.config import Config

    (tmp_path / "imgs").mkdir()
    (tmp_path / "lists").mkdir()
    _write_png(tmp_path / "imgs" / "a.png", 0)
    (tmp_path / "lists" / "t.csv").write_text("image,caption\na.png,zebra crossing\n")
    cfg = Config.from_dict({"data": {"kind": "csv", "train": str(tmp_path / "lists" / "t.csv"),
                                     "root": str(tmp_path / "imgs")}})  # fmt: skip
    tokenizer, _ = build_model(cfg, str(tmp_path), rank=1)
    assert "zebra" in tokenizer.vocab


def test_build_data_uses_the_models_preprocessing(table):
    """Normalisation, eval resize and filter come from the model config (SigLIP: 0.5/0.5)."""
    from fastclip.models import create_model
    from fastclip.train.config import Config
    from fastclip.train.data import build_data
    from fastclip.transforms import SIGLIP_MEAN, SIGLIP_STD

    cfg = Config.from_dict({"data": {"kind": "csv", "train": table, "eval": table, "workers": 0},
                            "train": {"batch_size": 4}})  # fmt: skip
    model = create_model("tiny-siglip")
    model.config.vision.resize_mode, model.config.vision.interpolation = "squash", "bilinear"
    stream, (evalset,) = build_data(cfg, model, None, 0, 1)
    tf = stream.dataset.transform
    assert (tf.mean, tf.std, tf.interpolation, tf.is_train) == (SIGLIP_MEAN, SIGLIP_STD, "bilinear", True)
    cfg.data.augment = False
    stream, _ = build_data(cfg, model, None, 0, 1)
    assert stream.dataset.transform.resize_mode == "squash" and not stream.dataset.transform.is_train
    cfg.data.resize_mode = "longest"  # the data config overrides the model's
    stream, _ = build_data(cfg, model, None, 0, 1)
    assert stream.dataset.transform.resize_mode == "longest"
    assert evalset.images.shape[-1] == model.config.vision.image_size
