"""webdataset streams (fastclip.data): shards written by `fastclip data shards`, disjoint readers per
epoch, exact resume with workers and a shuffle buffer, O(1) resume far into a run, resampling,
corrupt samples skipped and counted, and clear errors."""

from __future__ import annotations

import io
import os
import tarfile
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.data import DataError, WebDatasetStream
from fastclip.data.common import default_workers
from fastclip.data.write import write_shards


def _cfg(**kw):
    base = dict(image_key="image", caption_key="caption", workers=0, shuffle_buffer=4, resampled=False)
    return types.SimpleNamespace(**{**base, **kw})


def _jpeg(seed, size=16):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_table(root, n, size=16):
    rows = ["image,caption"]
    for i in range(n):
        (root / f"im{i:03d}.jpg").write_bytes(_jpeg(i, size))
        rows.append(f"im{i:03d}.jpg,sample {i:03d}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return str(root / "pairs.csv")


@pytest.fixture
def shards(tmp_path):
    """24 samples in 8 shards of 3, written by the shard writer."""
    src = make_table(tmp_path, 24)
    out = write_shards(src, str(tmp_path / "shards"), 3, log=io.StringIO())
    assert out["samples"] == 24 and len(out["shards"]) == 8
    return str(tmp_path / "shards" / "*.tar")


def _read(stream, n):
    return [stream.next_batch() for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for (ia, ca), (ib, cb) in zip(a, b):
        assert ca == cb
        assert torch.equal(ia, ib)


def test_batches_shapes_normalisation_and_keys(shards):
    s = WebDatasetStream(shards, _cfg(augment=False), 8, 4, 0, 1, seed=0, mean=(0, 0, 0), std=(1, 1, 1))
    images, captions = s.next_batch()
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1  # identity normalisation: [0, 1]
    assert all(c.startswith("sample ") for c in captions)


@pytest.mark.parametrize("workers", [0, 2])
def test_one_epoch_reads_every_sample_once_across_ranks(shards, workers):
    """2 ranks x `workers` readers, local batch 1: the position after a sample tells its epoch."""
    streams = [WebDatasetStream(shards, _cfg(workers=workers), 8, 2, r, 2, seed=5) for r in range(2)]
    counts = {}
    while not all(min(p["epoch"] for p in s.positions) >= 1 for s in streams):
        for s in streams:
            reader = s.batches % s.readers
            _, (caption,) = s.next_batch()
            if s.positions[reader]["epoch"] == 0:  # the position just after this sample
                counts[caption] = counts.get(caption, 0) + 1
    assert sorted(counts) == [f"sample {i:03d}" for i in range(24)]
    assert set(counts.values()) == {1}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_exact_sequence(shards, workers):
    cfg = _cfg(workers=workers, shuffle_buffer=3)
    ref = WebDatasetStream(shards, cfg, 8, 4, 1, 2, seed=3)  # rank 1 of 2, local batch 2
    states, batches = [], []
    for _ in range(20):  # ~3 epochs of this rank's shards: crosses shard and epoch boundaries
        states.append(ref.state_dict())
        batches.append(ref.next_batch())
    for k in (0, 1, 5, 11, 17):
        resumed = WebDatasetStream(shards, cfg, 8, 4, 1, 2, seed=3)
        resumed.load_state_dict(states[k])
        _same(_read(resumed, 3), batches[k : k + 3])  # images (random crops included) bit-equal


def test_state_is_json_and_checks_the_run(shards):
    import json

    s = WebDatasetStream(shards, _cfg(workers=2), 8, 4, 0, 1, seed=0)
    _read(s, 3)
    state = json.loads(json.dumps(s.state_dict()))
    for change, words in (
        ({"workers": 1}, "data.workers"),
        ({"world_size": 2}, "number of ranks"),
        ({"seed": 9}, "train.seed"),
        ({"shards": 9}, "number of shards"),
    ):
        with pytest.raises(DataError, match=words):
            WebDatasetStream(shards, _cfg(workers=2), 8, 4, 0, 1, seed=0).load_state_dict({**state, **change})
    with pytest.raises(DataError, match="reader positions"):
        s.load_state_dict({**state, "readers": [{"epoch": 0}]})
    with pytest.raises(DataError, match="data state"):
        s.load_state_dict({"kind": "csv", "position": 3})


def test_resume_far_into_a_run_is_constant_time(shards):
    """A position ~10^6 samples into the run (epoch 41667 of 24 samples) resumes in well under 5 s and
    continues as the stream that reached it did."""
    cfg = _cfg(workers=0, shuffle_buffer=3)
    epoch = 10**6 // 24 + 1
    start = {"kind": "webdataset", "batches": epoch * 24 // 4, "world_size": 1, "workers": 1,
             "shards": 8, "resampled": False, "seed": 0, "skipped": 0,
             "readers": [{"epoch": epoch, "slot": 0, "sample": 0}]}  # fmt: skip
    ref = WebDatasetStream(shards, cfg, 8, 4, 0, 1, seed=0)
    ref.load_state_dict(start)
    _read(ref, 2)  # 8 samples: into the third shard of that epoch
    state = ref.state_dict()
    assert state["readers"][0] == {"epoch": epoch, "slot": 2, "sample": 2}
    assert state["batches"] * 4 >= 10**6
    expected = _read(ref, 3)
    t0 = time.perf_counter()
    far = WebDatasetStream(shards, cfg, 8, 4, 0, 1, seed=0)
    far.load_state_dict(state)
    got = _read(far, 3)
    assert time.perf_counter() - t0 < 5.0
    _same(got, expected)


def test_resampled_draws_with_replacement_and_never_runs_out(shards):
    cfg = _cfg(workers=2, resampled=True)
    # 8 shards, 3 ranks x 2 readers = 6 readers: fine without resampling too, but draws may repeat shards
    streams = [WebDatasetStream(shards, cfg, 8, 3, r, 3, seed=1) for r in range(3)]
    seen = [set() for _ in streams]
    for _ in range(30):  # 30 samples per rank: more than the 24 in the data set
        for s, acc in zip(streams, seen):
            acc.update(s.next_batch()[1])
    assert all(len(acc) > 8 for acc in seen)
    a = WebDatasetStream(shards, cfg, 8, 3, 0, 3, seed=1)
    b = WebDatasetStream(shards, cfg, 8, 3, 0, 3, seed=1)
    _same(_read(a, 5), _read(b, 5))


def test_too_few_shards_for_the_readers(shards):
    with pytest.raises(DataError, match=r"8 shard\(s\) cannot be split between 2 rank\(s\) x 5 reader"):
        WebDatasetStream(shards, _cfg(workers=5), 8, 4, 0, 2, seed=0)
    WebDatasetStream(shards, _cfg(workers=5, resampled=True), 8, 4, 0, 2, seed=0)  # allowed with resampling
    with pytest.raises(DataError, match="data shards not found"):
        WebDatasetStream(os.path.join(os.path.dirname(shards), "none-{0..3}.tar"), _cfg(), 8, 4, 0, 1, seed=0)


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_images_are_skipped_and_counted(tmp_path, capsys):
    good = _jpeg(0)
    samples = []
    for i in range(6):
        img = good if i % 3 else good[: len(good) // 3]  # samples 0 and 3: truncated JPEG
        samples += [(f"k{i}.jpg", img), (f"k{i}.txt", f"caption {i}".encode())]
    samples += [("k6.jpg", b"not an image at all"), ("k6.txt", b"caption 6"), ("k7.txt", b"no image")]
    samples += [("k8.jpg", good), ("k8.txt", b"   ")]  # empty caption
    _tar(tmp_path / "a.tar", samples)
    s = WebDatasetStream(str(tmp_path / "a.tar"), _cfg(shuffle_buffer=0), 8, 2, 0, 1, seed=0)
    caps = sum((s.next_batch()[1] for _ in range(4)), [])
    assert set(caps) == {"caption 1", "caption 2", "caption 4", "caption 5"}
    assert s.skipped == 5 + 2  # 8 good samples: one pass (4 good, 5 skipped), then k0, k3 again
    assert s.state_dict()["skipped"] == s.skipped
    err = capsys.readouterr().err
    assert "a.tar:k0: unreadable image" in err and "a.tar:k7: no image file" in err and "empty caption" in err


def test_shards_without_usable_samples_are_an_error(tmp_path):
    _tar(tmp_path / "a.tar", [("k0.png", b"x"), ("k0.txt", b"c"), ("k1.jpg", b"y")])
    _tar(tmp_path / "b.tar", [("k2.jpg", _jpeg(1))])  # no caption
    for workers in (0, 1):
        s = WebDatasetStream(str(tmp_path / "*.tar"), _cfg(workers=workers), 8, 2, 0, 1, seed=0)
        with pytest.raises(DataError, match="gave no usable"):
            s.next_batch()
    (tmp_path / "c.tar").write_bytes(b"\0garbage" * 100)  # not a tar at all
    s = WebDatasetStream(str(tmp_path / "c.tar"), _cfg(), 8, 2, 0, 1, seed=0)
    with pytest.raises(DataError, match="gave no usable"):
        s.next_batch()


def test_custom_extensions_and_default_workers(tmp_path, monkeypatch):
    _tar(tmp_path / "a.tar", [("k0.webp_", b""), ("k0.png", _png_bytes()), ("k0.cap", b"hello")])
    s = WebDatasetStream(
        str(tmp_path / "a.tar"), _cfg(image_key="png", caption_key="cap"), 8, 1, 0, 1, seed=0
    )
    assert s.next_batch()[1] == ["hello"]
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0}, raising=False)
    assert default_workers() == 0


def _png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (5, 7), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_tokenizer_runs_in_the_workers(shards):
    def tok(captions):
        return torch.tensor([[int(c.split()[1])] for c in captions])

    s = WebDatasetStream(shards, _cfg(workers=1), 8, 3, 0, 1, seed=0, tokenizer=tok)
    images, ids = s.next_batch()
    assert ids.shape == (3, 1) and ids.dtype == torch.int64


def test_spec_names_existing_file_before_url_scheme(tmp_path, monkeypatch):
    from fastclip.data import expand_shards

    monkeypatch.chdir(tmp_path)
    _tar(tmp_path / "pipe:touch MARK;#.tar", [("k0.png", _png_bytes()), ("k0.txt", b"hi")])
    assert expand_shards("pipe:touch MARK;#.tar") == [str(tmp_path / "pipe:touch MARK;#.tar")]
    s = WebDatasetStream("pipe:touch MARK;#.tar", _cfg(), 8, 1, 0, 1, seed=0)
    assert s.next_batch()[1] == ["hi"] and not (tmp_path / "MARK").exists()
    assert expand_shards("https://example.invalid/{0..1}.tar") == [
        "https://example.invalid/0.tar",
        "https://example.invalid/1.tar",
    ]  # a URL the user wrote is kept (and opened by webdataset's gopen when read)


def test_explicit_pipe_spec_written_by_the_user_is_run(tmp_path):
    _tar(tmp_path / "a.tar", [("k0.png", _png_bytes()), ("k0.txt", b"piped")])
    s = WebDatasetStream(f"pipe:cat {tmp_path / 'a.tar'}", _cfg(), 8, 1, 0, 1, seed=0)
    assert s.next_batch()[1] == ["piped"]


def _closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("kind", ["http", "file", "pipe"])
def test_a_shard_that_cannot_be_opened_says_so_and_why(tmp_path, kind):
    """issue 28 #12: an unreachable URL was reported as 'gave no usable sample ... check data.image_key'."""
    import shutil

    if kind == "http" and shutil.which("curl") is None:
        pytest.skip("webdataset fetches http URLs with curl")
    spec = {
        "http": f"http://127.0.0.1:{_closed_port()}/shard-{{0..1}}.tar",
        "file": f"file://{tmp_path}/missing.tar",
        "pipe": f"pipe:cat {tmp_path}/missing.tar",
    }[kind]
    reason = {
        "http": r"curl exit 7: could not connect to the host",
        "file": r"No such file or directory",
        "pipe": r"the command exited with status 1",
    }[kind]
    s = WebDatasetStream(spec, _cfg(), 8, 2, 0, 1, seed=0)
    with pytest.raises(DataError, match=rf"could not be opened \({reason}\)$") as info:
        s.next_batch()
    assert "image_key" not in str(info.value) and ".tar' could not be opened" in str(info.value)
