"""Offline use: the Hub unreachable or switched off costs no retries (huggingface_hub waits ~20 s per file
before it gives up), and a training set smaller than one batch is reported instead of silently repeated."""

from __future__ import annotations

import io
import os
import socket
import time
import types

import pytest

pytest.importorskip("huggingface_hub")


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """Online mode, an empty cache, and an endpoint where nothing listens (connections are refused);
    records the back-off sleeps of huggingface_hub's retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    sleeps = []
    monkeypatch.setattr(_http.time, "sleep", lambda s: sleeps.append(s))
    return types.SimpleNamespace(cache=cache, sleeps=sleeps, port=port)


def test_unreachable_hub_fails_fast(no_hub):
    from fastclip.models import get_tokenizer
    from fastclip.models.hub import HubError

    t0 = time.perf_counter()
    with pytest.raises(HubError) as e:
        get_tokenizer("ViT-B-32")
    elapsed = time.perf_counter() - t0
    msg = str(e.value)
    assert "the Hub could not be reached" in msg and f"127.0.0.1:{no_hub.port}" in msg
    assert "openai/clip-vit-base-patch32" in msg and "load_tokenizer" in msg
    assert no_hub.sleeps == []  # no retry back-off at all
    assert elapsed < 10  # huggingface_hub's 5 retries alone sleep 23 s


def test_unreachable_hub_still_serves_the_cache(no_hub):
    """A cached repo resolves without a retry when the Hub is unreachable (huggingface_hub would first
    retry its freshness check of the first file)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from fastclip.models import get_tokenizer

    commit = "0" * 40
    base = no_hub.cache / "models--openai--clip-vit-base-patch32"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "a": 2, "photo": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(snap / "tokenizer.json"))
    ids = get_tokenizer("ViT-B-32")(["a photo"])
    assert ids.shape == (1, 77) and ids[0, :2].tolist() == [2, 3]
    assert no_hub.sleeps == []


def test_offline_switch_makes_no_connection(no_hub, monkeypatch):
    from huggingface_hub import constants

    from fastclip.models import get_tokenizer
    from fastclip.models.hub import HubError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    attempts = []
    real = socket.getaddrinfo  # every connection, huggingface_hub's and fastclip's probe, resolves first
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: attempts.append(a) or real(*a, **k))
    with pytest.raises(HubError, match=r"downloads are off \(HF_HUB_OFFLINE=1\)"):
        get_tokenizer("ViT-B-32")
    assert attempts == [] and no_hub.sleeps == []


def test_probe_gives_up_on_a_resolver_that_does_not_answer(monkeypatch):
    from huggingface_hub import constants

    from fastclip.models.hub import hub_unreachable

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example.invalid")
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(30))
    t0 = time.perf_counter()
    why = hub_unreachable(timeout=0.2)
    assert time.perf_counter() - t0 < 5
    assert why == "no connection to hub.example.invalid:443: the name did not resolve within 0.2 s"


def test_probe_reaches_a_listening_endpoint(monkeypatch):
    from huggingface_hub import constants

    from fastclip.models.hub import hub_unreachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable() is None


# ---- a training set smaller than one batch -----------------------------------------------------


def _shards(tmp_path, n, per_shard):
    import numpy as np
    from PIL import Image

    from fastclip.data.write import write_shards

    rows = ["image,caption"]
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 10 % 256, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,sample {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    write_shards(str(tmp_path / "pairs.csv"), str(tmp_path / "shards"), per_shard, log=io.StringIO())
    return os.path.join(str(tmp_path / "shards"), "*.tar")


def _cfg(**kw):
    base = dict(image_key="image", caption_key="caption", workers=0, shuffle_buffer=0, resampled=False)
    return types.SimpleNamespace(**{**base, **kw})


def test_dataset_smaller_than_one_batch_is_reported_once(tmp_path, capsys):
    from fastclip.data import WebDatasetStream

    stream = WebDatasetStream(_shards(tmp_path, 20, 10), _cfg(), 8, 32, 0, 1, seed=0)
    for _ in range(3):
        images, captions = stream.next_batch()
        assert images.shape[0] == 32 and len(set(captions)) == 20  # what the warning is about
    err = capsys.readouterr().err
    assert err.count("smaller than one batch") == 1
    assert "gave 20 usable sample(s), fewer than the 32 of one batch per rank" in err
    assert "train.batch_size" in err


def test_no_report_when_every_batch_is_distinct(tmp_path, capsys):
    from fastclip.data import WebDatasetStream

    stream = WebDatasetStream(_shards(tmp_path, 20, 10), _cfg(), 8, 8, 0, 1, seed=0)
    for _ in range(6):  # over two passes: passes of 20 samples, batches of 8
        stream.next_batch()
    assert "smaller than one batch" not in capsys.readouterr().err
