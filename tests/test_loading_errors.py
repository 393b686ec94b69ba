"""Loading models from files that are wrong, or from a training run: one clear error naming the file and
the key (no allocation of what a bad config asks for), and train -> load -> convert with no extra argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastclip.cli import main as cli_main
from fastclip.models import create_model, load_pretrained, load_tokenizer, save_fastclip
from fastclip.models.weights import FORMAT_KEY, WeightLoadError

safetensors_torch = pytest.importorskip("safetensors.torch")

MODEL = {"patch_size": 8, "vision_depth": 1, "text_depth": 1}


def _fastclip_file(tmp_path, edit=None, raw=None, name="m.safetensors"):
    """A tiny model saved by save_fastclip, its metadata config edited by ``edit(dict)`` or replaced by ``raw``."""
    from safetensors import safe_open

    path = tmp_path / name
    save_fastclip(create_model("tiny"), path)
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        sd = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta[FORMAT_KEY])
    if edit is not None:
        edit(cfg)
    meta[FORMAT_KEY] = raw if raw is not None else json.dumps(cfg)
    safetensors_torch.save_file(sd, str(path), metadata=meta)
    return path


@pytest.fixture
def real_builds(monkeypatch):
    """Records the vision width of every CLIP model built on a real device (models on ``meta`` are free)."""
    from fastclip.models.model import CLIP

    built, init = [], CLIP.__init__

    def spy(self, config):
        init(self, config)
        if self.logit_scale.device.type != "meta":
            built.append(config.vision.width)

    monkeypatch.setattr(CLIP, "__init__", spy)
    return built


def test_oversized_width_in_metadata_is_refused_before_building(tmp_path, real_builds):
    path = _fastclip_file(tmp_path, lambda c: c["vision"].update(width=1_000_000_000))
    real_builds.clear()  # the model that wrote the file
    with pytest.raises(ValueError) as e:
        load_pretrained(path)
    msg = str(e.value)
    assert str(path) in msg and FORMAT_KEY in msg and "vision.width" in msg and "1000000000" in msg
    assert real_builds == []


def test_width_that_does_not_fit_the_weights_is_named_and_not_allocated(tmp_path, real_builds):
    # within the size bounds, but not what the tensors hold: checked on shapes, never allocated
    path = _fastclip_file(tmp_path, lambda c: c["vision"].update(width=1024, mlp_dim=4096))
    real_builds.clear()
    with pytest.raises(WeightLoadError) as e:
        load_pretrained(path)
    first = str(e.value).splitlines()[0]
    assert "vision.width is 1024, the weights have 96" in first and "visual.patch_embed.weight" in first
    assert real_builds == []


def test_missing_width_is_named(tmp_path):
    path = _fastclip_file(tmp_path, lambda c: c["vision"].pop("width"))
    with pytest.raises(ValueError, match=r"missing key vision\.width\b") as e:
        load_pretrained(path)
    assert str(path) in str(e.value) and not isinstance(e.value, WeightLoadError)
    path = _fastclip_file(
        tmp_path, lambda c: (c["text"].pop("vocab_size"), c.pop("embed_dim")), name="b.safetensors"
    )
    with pytest.raises(ValueError, match=r"missing keys embed_dim, text\.vocab_size"):
        load_pretrained(path)


def test_metadata_config_that_is_not_json(tmp_path):
    path = _fastclip_file(tmp_path, raw="{vision: 96")
    with pytest.raises(ValueError, match="not valid JSON") as e:
        load_pretrained(path)
    assert str(path) in str(e.value) and FORMAT_KEY in str(e.value)


def test_oversized_sizes_are_refused_by_create_model():
    with pytest.raises(ValueError, match=r"vision\.width: expected a positive int of at most 65536"):
        create_model("tiny", vision_width=10**9)
    with pytest.raises(ValueError, match=r"text\.vocab_size: expected a positive int of at most"):
        create_model("tiny", vocab_size=10**12)


# ---- JSON files that are not JSON ---------------------------------------------------------------


def _open_clip_dir(tmp_path):
    from fastclip.models import save_open_clip

    d = tmp_path / "oc"
    save_open_clip(create_model("tiny"), d)
    return d


def test_open_clip_config_that_is_not_json(tmp_path, capsys):
    d = _open_clip_dir(tmp_path)
    cfg = d / "open_clip_config.json"
    cfg.write_text('{"model_cfg": {"embed_dim": 64,')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        load_pretrained(d)
    assert str(cfg) in str(e.value)
    assert cli_main(["convert", str(d), str(tmp_path / "o.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith("fastclip convert: ") and str(cfg) in err and "not valid JSON" in err
    cfg.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_pretrained(d)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c["vision"].update(width=10**9), r"vision\.width: expected a positive int of at most"),
        (lambda c: c["vision"].pop("width"), r"missing key vision\.width"),
        (
            lambda c: c["vision"].update(width=1024, mlp_dim=4096),
            r"vision\.width is 1024, the weights have 96",
        ),
    ],
    ids=["oversized", "missing", "does-not-fit"],
)
def test_fastclip_config_in_an_open_clip_dir(tmp_path, real_builds, edit, match):
    d = _open_clip_dir(tmp_path)
    cfg = d / "open_clip_config.json"
    oc = json.loads(cfg.read_text())
    edit(oc["fastclip_config"])
    cfg.write_text(json.dumps(oc))
    real_builds.clear()
    with pytest.raises(ValueError, match=match) as e:
        load_pretrained(d)
    assert str(cfg) in str(e.value).splitlines()[0]
    assert real_builds == []


def test_hf_config_that_is_not_json(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text("{\x00")
    safetensors_torch.save_file({"x": torch.zeros(1)}, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="not valid JSON") as e:
        load_pretrained(d)
    assert str(d / "config.json") in str(e.value)


@pytest.mark.parametrize("content", ["{not json", '{"model": ', "\xff\xfe garbage"])
def test_tokenizer_json_that_is_not_json(tmp_path, content):
    from fastclip.models import get_tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(content.encode("latin-1"))
    for call in (
        lambda: load_tokenizer(d / "tokenizer.json"),
        lambda: load_tokenizer(d),
        lambda: get_tokenizer(str(d)),
    ):
        with pytest.raises(ValueError, match="not valid JSON") as e:
            call()
        assert str(d / "tokenizer.json") in str(e.value)


def test_tokenizer_json_that_tokenizers_cannot_read_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 1}')
    with pytest.raises(ValueError) as e:
        load_tokenizer(tmp_path / "tokenizer.json")
    assert str(tmp_path / "tokenizer.json") in str(e.value)


# ---- train -> load -> convert ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "fastclip.cli", "train", "--output-dir", out, "--smoke"]
    cmd += ["--train.batch_size", "16", "--train.threads", "1", "--model.overrides", json.dumps(MODEL)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return out


def _features(model):
    torch.manual_seed(0)
    images = torch.randn(2, 3, model.config.vision.image_size, model.config.vision.image_size)
    texts = torch.randint(1, model.config.text.vocab_size, (2, model.config.text.context_length))
    with torch.no_grad():
        return model.eval()(images, texts)


@pytest.mark.slow
def test_trained_model_loads_and_converts_with_no_extra_argument(run, tmp_path, capsys):
    from safetensors import safe_open

    weights = os.path.join(run, "model.safetensors")
    with safe_open(weights, "pt") as f:
        meta = f.metadata()
    with open(os.path.join(run, "model_config.json")) as f:
        assert json.loads(meta[FORMAT_KEY]) == json.load(f)  # the run's config, in the file
    a, b = load_pretrained(weights), load_pretrained(run)  # the file, and the run directory
    assert a.config.text.vocab_size == b.config.text.vocab_size != create_model("tiny").config.text.vocab_size
    fa, fb = _features(a), _features(b)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    for src, dst, extra in (
        (weights, tmp_path / "oc.safetensors", ["--to", "open_clip"]),
        (run, tmp_path / "oc_dir", ["--to", "open_clip"]),
        (run, tmp_path / "again.safetensors", []),
    ):
        assert cli_main(["convert", str(src), str(dst), *extra]) == 0, capsys.readouterr().err
    back = load_pretrained(tmp_path / "oc_dir")
    fc = _features(back)
    assert all(torch.allclose(fa[k], fc[k], atol=1e-6) for k in fa)
    assert load_pretrained(tmp_path / "again.safetensors").config == a.config


@pytest.mark.slow
def test_export_without_metadata_uses_the_run_config_beside_it(run, tmp_path):
    """Files exported before the config went into the metadata: the model_config.json beside them."""
    import shutil

    from fastclip.train.export import export_safetensors

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    sd = safetensors_torch.load_file(str(copy / "model.safetensors"))
    safetensors_torch.save_file(sd, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert load_pretrained(copy / "model.safetensors").config == load_pretrained(run).config
    # an export elsewhere finds the config of the checkpoint's run and writes it into the metadata
    out = export_safetensors(str(copy / "checkpoints"), str(tmp_path / "elsewhere" / "w.safetensors"))
    assert load_pretrained(out).config == load_pretrained(run).config
    os.remove(copy / "model.safetensors")
    with pytest.raises(ValueError, match="has no model.safetensors"):
        load_pretrained(copy)
    with pytest.raises(ValueError, match=r"no config\.json .* open_clip_config\.json .* model\.safetensors"):
        load_pretrained(tmp_path / "elsewhere")


def test_export_refuses_a_config_that_does_not_fit(tmp_path, capsys):
    from fastclip.train.checkpoint import CheckpointError
    from fastclip.train.export import _config_metadata

    state = create_model("tiny").state_dict()
    cfg = create_model("tiny", vision_width=128).config
    with pytest.raises(CheckpointError, match="does not describe the checkpoint's weights"):
        _config_metadata(cfg, state, str(tmp_path))
    assert FORMAT_KEY in _config_metadata(create_model("tiny").config, state, str(tmp_path))
    assert _config_metadata(None, state, str(tmp_path)) == {}  # no model_config.json anywhere
    # a run of a model of the caller's own: its model_config.json is no fastclip config; left out, said so
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run / "model_config.json").write_text(json.dumps({"hidden": 12}))
    assert _config_metadata(None, state, str(run / "checkpoints" / "step_00000001")) == {}
    assert "written without a model config" in capsys.readouterr().err
    (run / "model_config.json").write_text(json.dumps(create_model("tiny").config.to_dict()))
    assert FORMAT_KEY in _config_metadata(None, state, str(run / "checkpoints" / "step_00000001"))
    with pytest.raises(TypeError, match="model_config: expected"):
        _config_metadata(3, state, str(tmp_path))


def test_convert_of_a_file_without_config_is_one_line_naming_the_option(tmp_path, capsys):
    src = tmp_path / "plain.safetensors"
    state = {k: v.contiguous() for k, v in create_model("tiny").state_dict().items()}
    safetensors_torch.save_file(state, str(src), metadata={"format": "pt"})
    assert cli_main(["convert", str(src), str(tmp_path / "o"), "--to", "open_clip"]) == 1
    err = capsys.readouterr().err
    assert err.endswith(")\n") and err.count("\n") == 1, repr(err)
    assert "carries no config" in err and "pass --model NAME" in err
    assert cli_main(["convert", str(src), str(tmp_path / "o"), "--to", "open_clip", "--model", "tiny"]) == 0
