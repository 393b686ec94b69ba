"""`fastclip data shards`: img2dataset layout, keys, re-encoding, unreadable images left out, CLI."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastclip.cli import main
from fastclip.data import DataError
from fastclip.data.write import write_shards


def _image(path, fmt, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).convert(mode).save(path, format=fmt)


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_layout_keys_and_formats(tmp_path):
    _image(tmp_path / "a.jpg", "JPEG", 1)
    _image(tmp_path / "b.png", "PNG", 2)
    _image(tmp_path / "c.webp", "WEBP", 3)
    _image(tmp_path / "d.bmp", "BMP", 4)
    (tmp_path / "e.jpg").write_bytes(b"broken")
    (tmp_path / "t.tsv").write_text(
        "path\ttext\na.jpg\tone\nb.png\ttwo\nc.webp\tthree\nd.bmp\tfour\ne.jpg\tfive\n"
    )
    log = io.StringIO()
    out = write_shards(
        str(tmp_path / "t.tsv"), str(tmp_path / "out"), 3, image_key="path", caption_key="text", log=log
    )
    assert out["samples"] == 4 and [p.rsplit("/", 1)[1] for p in out["shards"]] == ["00000.tar", "00001.tar"]
    assert len(out["skipped"]) == 1 and "e.jpg" in log.getvalue()
    first, second = _members(out["shards"][0]), _members(out["shards"][1])
    assert sorted(first) == sorted(f"00000000{i}.{e}" for i, ext in enumerate(["jpg", "png", "webp"])
                                   for e in (ext, "txt", "json"))  # fmt: skip
    assert first["000000000.jpg"] == (tmp_path / "a.jpg").read_bytes()  # stored as is
    assert first["000000001.txt"] == b"two"
    meta = json.loads(first["000000002.json"])
    assert meta == {"key": "000000002", "caption": "three", "source": "c.webp", "width": 7, "height": 9}
    assert set(second) == {"000010000.png", "000010000.txt", "000010000.json"}  # BMP re-encoded as PNG
    assert Image.open(io.BytesIO(second["000010000.png"])).size == (7, 9)
    again = write_shards(
        str(tmp_path / "t.tsv"), str(tmp_path / "out2"), 3, image_key="path", caption_key="text", log=log
    )
    assert [open(p, "rb").read() for p in again["shards"]] == [open(p, "rb").read() for p in out["shards"]]


def test_errors(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"broken")
    (tmp_path / "t.csv").write_text("image,caption\nbad.jpg,x\n")
    with pytest.raises(DataError, match="none of the 1 images could be read"):
        write_shards(str(tmp_path / "t.csv"), str(tmp_path / "o"), 2, log=io.StringIO())
    with pytest.raises(DataError, match="--shard-size"):
        write_shards(str(tmp_path / "t.csv"), str(tmp_path / "o"), 0)
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="OUT_DIR"):
        write_shards(str(tmp_path / "t.csv"), str(tmp_path / "file"), 2)


def test_cli(tmp_path, capsys):
    for i in range(5):
        _image(tmp_path / f"{i}.jpg", "JPEG", i)
    (tmp_path / "t.csv").write_text("file,cap\n" + "".join(f"{i}.jpg,c{i}\n" for i in range(5)))
    rc = main(["data", "shards", str(tmp_path / "t.csv"), str(tmp_path / "o"), "--shard-size", "2",
               "--image-key", "file", "--caption-key", "cap"])  # fmt: skip
    assert rc == 0 and "wrote 5 samples in 3 shard(s)" in capsys.readouterr().out
    rc = main(["data", "shards", str(tmp_path / "t.csv"), str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "expected a column 'image' (data.image_key)" in err and "Traceback" not in err
