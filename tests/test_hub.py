"""Hub ids offline: each test writes a Hugging Face hub cache (models--org--name/{refs,blobs,snapshots})
with tiny random transformers CLIP/SigLIP repos (tokenizers built with `tokenizers`, no downloads) and an
open_clip-format repo written by fastclip, sets HF_HUB_OFFLINE=1, and resolves "hf-hub:org/name" through
huggingface_hub: create_model_and_transforms, get_tokenizer, load_pretrained, list_pretrained, convert."""

import hashlib
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from utils import assert_within_budget

import fastclip
from fastclip.cli import main as cli_main
from fastclip.models import HubError, create_model, save_open_clip
from fastclip.models.hub import TOKENIZER_FILES, HubId, parse_hub_id

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
huggingface_hub = pytest.importorskip("huggingface_hub")
Image = pytest.importorskip("PIL.Image")

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "mat"]
# ids: 0 pad, 1 unk, 2.. words, 98 start, 99 end (largest id, as in CLIP vocabularies)
VOCAB = {"<pad>": 0, "<unk>": 1, **{w: 2 + i for i, w in enumerate(WORDS)}, "<sot>": 98, "<eot>": 99}
LONG = "a red cat on the blue mat of the dog photo"  # 11 words: truncated at context 8


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty offline hub cache; ``hub(repo_id, directory)`` copies a directory into it as the
    huggingface_hub cache layout does (blobs by sha256, snapshot symlinks, refs/main)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables when it is imported: set its constants as a fresh process would
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def populate(repo_id, src):
        base = cache / f"models--{repo_id.replace('/', '--')}"
        commit = hashlib.sha1(repo_id.encode()).hexdigest()
        (base / "refs").mkdir(parents=True)
        (base / "refs" / "main").write_text(commit)
        (base / "blobs").mkdir()
        snap = base / "snapshots" / commit
        snap.mkdir(parents=True)
        for name in sorted(os.listdir(src)):
            data = (src / name).read_bytes()
            blob = hashlib.sha256(data).hexdigest()
            (base / "blobs" / blob).write_bytes(data)
            os.symlink(os.path.join("..", "..", "blobs", blob), snap / name)
        return snap

    populate.cache = cache
    return populate


def _save_tokenizer(directory, eos_only=False):
    """A word-level tokenizer (lower-cased, whitespace split) saved as a transformers fast tokenizer:
    CLIP style "<sot> ... <eot>" or SigLIP style "... <eot>", padded with <pad>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    single = "$A <eot>" if eos_only else "<sot> $A <eot>"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<sot>", 98), ("<eot>", 99)]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<sot>", eos_token="<eot>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)


def _repo_ids(directory, texts, length):
    tok = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")[
        "input_ids"
    ]


def _text_cfg(**kw):
    return dict(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=8, bos_token_id=98, eos_token_id=99, pad_token_id=0, **kw,
    )  # fmt: skip


_VISION_CFG = dict(
    hidden_size=40,
    intermediate_size=56,
    num_hidden_layers=2,
    num_attention_heads=5,
    image_size=16,
    patch_size=4,
)


def _hf_repo(tmp_path, kind):
    torch.manual_seed(0)
    path = tmp_path / f"src_{kind}"
    if kind == "clip":
        cfg = transformers.CLIPConfig(text_config=_text_cfg(), vision_config=_VISION_CFG, projection_dim=24)
        hf = transformers.CLIPModel(cfg).eval()
        proc = {
            "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 16},
            "do_center_crop": True, "crop_size": {"height": 16, "width": 16}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        }  # fmt: skip
    else:
        cfg = transformers.SiglipConfig(text_config=_text_cfg(projection_size=40), vision_config=_VISION_CFG)
        hf = transformers.SiglipModel(cfg).eval()
        proc = {
            "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 16, "width": 16},
            "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        }  # fmt: skip
    hf.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(proc))
    _save_tokenizer(path, eos_only=kind == "siglip")
    return hf, path


def _image(w=23, h=17, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _hf_pixels(path, kind, img):
    cls = transformers.CLIPImageProcessorPil if kind == "clip" else transformers.SiglipImageProcessorPil
    proc = cls.from_pretrained(path, local_files_only=True)
    return proc(img, return_tensors="pt")["pixel_values"][0]


def _check_features(hf, model, pixels, ids):
    with torch.no_grad():
        ref = (
            hf.get_image_features(pixel_values=pixels).pooler_output,
            hf.get_text_features(input_ids=ids).pooler_output,
        )
        hf64 = hf.double()
        truth = (
            hf64.get_image_features(pixel_values=pixels.double()).pooler_output,
            hf64.get_text_features(input_ids=ids).pooler_output,
        )
        hf.float()
        got = (model.encode_image(pixels), model.encode_text(ids))
    for name, g, r, t in zip(("image", "text"), got, ref, truth):
        assert g.shape == t.shape
        assert_within_budget(f"{name} features", g, r, t, torch.float32)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_repo(tmp_path, hub, kind):
    hf, src = _hf_repo(tmp_path, kind)
    snap = hub(f"org/tiny-{kind}", src)
    # a plain "org/name" is a hub id too when no such local path exists
    name = f"hf-hub:org/tiny-{kind}" if kind == "clip" else f"org/tiny-{kind}"
    model, pre_train, pre_val = fastclip.create_model_and_transforms(name)
    model.eval()
    assert model.is_siglip == (kind == "siglip")
    v = model.config.vision
    assert v.resize_mode == ("shortest" if kind == "clip" else "squash")
    assert v.interpolation == ("bicubic" if kind == "clip" else "bilinear")

    # preprocessing equals transformers' image processor of the repo (PIL-based), within PIL rounding
    images = [_image(23, 17, 0), _image(16, 30, 1), _image(16, 16, 2)]
    got = torch.stack([pre_val(im) for im in images])
    want = torch.stack([_hf_pixels(snap, kind, im) for im in images])
    assert got.shape == want.shape == (3, 3, 16, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # an image at the model size is only normalized: the exact expected tensor
    arr = np.asarray(images[2], dtype=np.float32) / 255
    mean, std = np.array(v.mean, dtype=np.float32), np.array(v.std, dtype=np.float32)
    exact = torch.from_numpy(((arr - mean) / std).transpose(2, 0, 1).copy())
    torch.testing.assert_close(got[2], exact, rtol=0, atol=1e-6)
    # training transform: random resized crop of the same size and statistics
    assert pre_train(images[0], generator=torch.Generator().manual_seed(0)).shape == (3, 16, 16)

    # tokenizer: the repo tokenizer's ids, padded to the text context (8), the end token kept on truncation
    tok = fastclip.get_tokenizer(name)
    texts = ["a photo", "A RED cat  on the mat", LONG]
    ids = tok(texts)
    want_ids = _repo_ids(snap, texts, 8)
    assert ids.dtype == torch.long and ids.shape == (3, 8)
    assert torch.equal(ids, want_ids)
    assert torch.equal(tok(["a photo"]), _repo_ids(snap, ["a photo"], 8))
    assert int(ids[2, -1]) == 99 and int(ids[0, 2 if kind == "clip" else 1]) != 0
    # the model's features equal transformers' on the same pixels and ids
    _check_features(hf, model, want, ids)
    # the README's end-to-end call: preprocessed image + tokenized text through the model
    with torch.no_grad():
        out = model(pre_val(images[0]).unsqueeze(0), tok(["a photo of a cat"]))
    assert out["image_features"].shape == out["text_features"].shape == (1, model.config.embed_dim)
    # load_pretrained takes the hub id as well
    again = fastclip.load_pretrained(name).eval()
    with torch.no_grad():
        assert torch.equal(again.encode_text(ids), model.encode_text(ids))


def test_open_clip_repo_written_by_fastclip(tmp_path, hub):
    torch.manual_seed(0)
    ref = create_model("tiny", vocab_size=100, context_length=8).eval()
    src = tmp_path / "oc"
    save_open_clip(ref, src)
    _save_tokenizer(src)
    oc = json.loads((src / "open_clip_config.json").read_text())
    assert set(oc) == {"model_cfg", "preprocess_cfg", "fastclip_config"}
    assert oc["model_cfg"]["vision_cfg"]["head_width"] == 24 and oc["model_cfg"]["text_cfg"]["heads"] == 4
    assert sorted(os.listdir(src))[:2] == ["open_clip_config.json", "open_clip_model.safetensors"]
    hub("org/tiny-oc", src)
    # the same repo as open_clip itself writes it: no fastclip_config, model_cfg/preprocess_cfg translated
    del oc["fastclip_config"]
    oc["preprocess_cfg"].update(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], resize_mode="squash")
    (src / "open_clip_config.json").write_text(json.dumps(oc))
    snap_plain = hub("org/tiny-oc-plain", src)

    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for name in ("hf-hub:org/tiny-oc", "hf-hub:org/tiny-oc-plain"):
        model, _, pre_val = fastclip.create_model_and_transforms(name, attn_impl="math")
        model.eval()
        assert model.config.attn_impl == "math"
        tok = fastclip.get_tokenizer(name)
        ids = tok(["a  photo ", LONG])  # open_clip's default cleaning: whitespace collapsed
        assert torch.equal(ids, _repo_ids(snap_plain, ["a photo", LONG], 8))
        ref.set_attn_impl("math")
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), rtol=0, atol=0)
            torch.testing.assert_close(model.encode_text(ids), ref.encode_text(ids), rtol=0, atol=0)
    # preprocess_cfg of the plain repo: SigLIP statistics, squash resize (exact: PIL resize then normalize)
    img = _image(40, 20, 3)
    arr = np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(
        pre_val(img), torch.from_numpy((arr - 0.5).transpose(2, 0, 1) / 0.5), rtol=0, atol=1e-6
    )


def test_open_clip_repo_siglip_and_pickle(tmp_path, hub):
    # a SigLIP model round trip (timm tower names), and a pickled open_clip_pytorch_model.bin
    torch.manual_seed(1)
    ref = create_model("tiny-siglip").eval()
    src = tmp_path / "oc_siglip"
    save_open_clip(ref, src)
    hub("org/tiny-oc-siglip", src)
    model, preprocess = fastclip.create_model_from_pretrained("hf-hub:org/tiny-oc-siglip")
    assert model.is_siglip and model.config.vision.resize_mode == "squash"
    assert preprocess.mean == (0.5, 0.5, 0.5)
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # pickles are read with weights_only=True: code in one is refused
    from safetensors.torch import load_file

    bad = tmp_path / "oc_bad"
    bad.mkdir()
    (bad / "open_clip_config.json").write_text((src / "open_clip_config.json").read_text())
    sd = load_file(str(src / "open_clip_model.safetensors"))
    torch.save({"state_dict": {**sd, "x": types.SimpleNamespace(a=1)}}, bad / "open_clip_pytorch_model.bin")
    hub("org/bad-pickle", bad)
    with pytest.raises(ValueError, match="weights_only"):
        fastclip.load_pretrained("hf-hub:org/bad-pickle")


def test_missing_repo_offline_one_line_error(tmp_path, hub, capsys):
    cache = str(hub.cache)
    for call in (
        lambda: fastclip.create_model_and_transforms("hf-hub:org/missing"),
        lambda: fastclip.load_pretrained("hf-hub:org/missing"),
        lambda: fastclip.get_tokenizer("hf-hub:org/missing"),
    ):
        with pytest.raises(HubError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg
        for part in ("hf-hub:org/missing", "open_clip_config.json", "config.json", cache, "HF_HUB_OFFLINE=1"):
            assert part in msg, (part, msg)
    with pytest.raises(HubError, match="open_clip_model.safetensors or open_clip_pytorch_model.bin"):
        fastclip.create_model_and_transforms("hf-hub:org/missing")
    # a repo whose config is cached but not its weights names the weights
    part = tmp_path / "part"
    part.mkdir()
    (part / "config.json").write_text(json.dumps({"model_type": "clip"}))
    hub("org/partial", part)
    with pytest.raises(HubError, match="model.safetensors or .* or pytorch_model.bin"):
        fastclip.load_pretrained("hf-hub:org/partial")
    # the convert CLI: exit code 1, the same message on stderr
    assert cli_main(["convert", "hf-hub:org/missing", str(tmp_path / "x.safetensors")]) == 1
    assert "hf-hub:org/missing: not in the Hugging Face cache" in capsys.readouterr().err


def test_named_config_tokenizer(tmp_path, hub):
    with pytest.raises(HubError) as info:
        fastclip.get_tokenizer("ViT-B-32")
    msg = str(info.value)
    for part in ("openai/clip-vit-base-patch32", "tokenizer.json", str(hub.cache), "load_tokenizer"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match="WordTokenizer"):
        fastclip.get_tokenizer("tiny")
    # the files in the cache: the named config's tokenizer, context 77, open_clip's whitespace cleaning
    src = tmp_path / "tok"
    _save_tokenizer(src)
    snap = hub("openai/clip-vit-base-patch32", src)
    tok = fastclip.get_tokenizer("ViT-B-32")
    assert torch.equal(tok(["a   photo"]), _repo_ids(snap, ["a photo"], 77))
    assert fastclip.get_tokenizer("ViT-B-32", context_length=5)([LONG]).tolist() == [[98, 2, 7, 5, 99]]
    # open_clip repos without tokenizer files: the repo text_cfg.hf_tokenizer_name names, else (OpenAI's
    # 49408-token vocabulary, open_clip's built-in tokenizer) the OpenAI CLIP tokenizer files
    for repo, text_cfg in (
        ("org/oc-openai-vocab", {"context_length": 77, "vocab_size": 49408}),
        ("org/oc-named-tok", {"context_length": 12, "vocab_size": 100, "hf_tokenizer_name": "org/tok"}),
    ):
        d = tmp_path / repo.replace("/", "_")
        d.mkdir()
        (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": text_cfg}}))
        hub(repo, d)
    with pytest.raises(HubError, match="hf-hub:org/tok: not in the Hugging Face cache"):
        fastclip.get_tokenizer("hf-hub:org/oc-named-tok")
    hub("org/tok", src)
    for repo, ctx in (("org/oc-openai-vocab", 77), ("org/oc-named-tok", 12)):
        got = fastclip.get_tokenizer(f"hf-hub:{repo}")(["a  photo"])
        assert torch.equal(got, _repo_ids(snap, ["a photo"], ctx)), repo
    # SigLIP configs canonicalize (lower case, punctuation removed) as open_clip does
    hub("timm/ViT-B-16-SigLIP", src)
    sig = fastclip.get_tokenizer("ViT-B-16-SigLIP")
    assert torch.equal(sig(["A photo, of the CAT!"]), _repo_ids(snap, ["a photo of the cat"], 64))


def test_list_pretrained_and_transforms_of_named_configs(tmp_path, hub):
    _, src = _hf_repo(tmp_path, "clip")
    hub("org/tiny-clip", src)
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((src / "config.json").read_text())
    hub("org/no-weights", cfg_only)
    listed = fastclip.list_pretrained()
    assert "hf-hub:org/tiny-clip" in listed and "hf-hub:org/no-weights" not in listed
    assert "ViT-B-32" in listed and "tiny" in listed

    model, pre_train, pre_val = fastclip.create_model_and_transforms("tiny-siglip", precision="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (pre_val.resize_mode, pre_val.mean, pre_val.size) == ("squash", (0.5, 0.5, 0.5), (32, 32))
    assert pre_train.is_train and not pre_val.is_train
    with pytest.raises(ValueError, match="precision"):
        fastclip.create_model_and_transforms("tiny", precision="fp8")
    with pytest.raises(ValueError, match="pretrained"):
        fastclip.create_model_from_pretrained("tiny")
    with pytest.raises(ValueError, match="pretrained tags"):
        fastclip.create_model_and_transforms("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="did you mean"):
        fastclip.create_model_and_transforms("ViT-B-33")
    with pytest.raises(TypeError, match="name_or_id"):
        fastclip.get_tokenizer(3)


def test_config_preprocessing_matches_transforms():
    from fastclip import transforms
    from fastclip.models import configs

    assert configs.CLIP_MEAN == transforms.OPENAI_CLIP_MEAN and configs.CLIP_STD == transforms.OPENAI_CLIP_STD
    assert configs.SIGLIP_MEAN == transforms.SIGLIP_MEAN and configs.SIGLIP_STD == transforms.SIGLIP_STD
    assert configs.RESIZE_MODES == transforms.RESIZE_MODES
    assert set(configs.INTERPOLATIONS) == set(transforms.INTERPOLATIONS)


def test_parse_hub_id(tmp_path, monkeypatch):
    assert parse_hub_id("hf-hub:org/name") == HubId("org/name", None)
    assert parse_hub_id("hf-hub:org/name@v1.0") == HubId("org/name", "v1.0")
    assert parse_hub_id("org/name") == HubId("org/name", None)
    assert parse_hub_id("ViT-B-32") is None and parse_hub_id("a/b/c") is None
    for bad in (
        "hf-hub:../etc",
        "hf-hub:org/na--me",
        "hf-hub:org",
        "hf-hub:org/name@..",
        "hf-hub:o/n;rm -rf",
    ):
        with pytest.raises(ValueError, match="hub id"):
            parse_hub_id(bad)
    assert parse_hub_id("org/../x") is None  # not a valid id: read as a path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert parse_hub_id("org/name") is None  # an existing local path wins over a plain id
    assert str(HubId("org/name", "main")) == "hf-hub:org/name@main"


def test_convert_hub_id(tmp_path, hub):
    hf, src = _hf_repo(tmp_path, "clip")
    hub("org/tiny-clip", src)
    out = tmp_path / "out.safetensors"
    assert cli_main(["convert", "hf-hub:org/tiny-clip", str(out)]) == 0
    repo = tmp_path / "oc_repo"
    assert cli_main(["convert", "hf-hub:org/tiny-clip", str(repo), "--to", "open_clip"]) == 0
    assert sorted(os.listdir(repo)) == ["open_clip_config.json", "open_clip_model.safetensors"]
    a, b = fastclip.load_pretrained(out), fastclip.load_pretrained(repo)
    assert b.config == a.config  # the repo's fastclip_config: interpolation, statistics and all
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


@pytest.fixture
def open_clip_model(monkeypatch):
    """open_clip's model.py, imported without open_clip's package __init__ (which needs torchvision)."""
    import importlib
    import importlib.machinery
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    mods = {n: types.ModuleType(n) for n in ("torchvision", "torchvision.ops", "torchvision.ops.misc")}
    for n, m in mods.items():
        m.__spec__ = importlib.machinery.ModuleSpec(n, None)
    mods["torchvision.ops.misc"].FrozenBatchNorm2d = torch.nn.BatchNorm2d
    mods["torchvision"].ops, mods["torchvision.ops"].misc = (
        mods["torchvision.ops"],
        mods["torchvision.ops.misc"],
    )
    pkg = types.ModuleType("_oc_hub_shim")
    pkg.__path__ = list(spec.submodule_search_locations)
    for name, mod in (*mods.items(), ("_oc_hub_shim", pkg)):
        monkeypatch.setitem(sys.modules, name, mod)
    try:
        module = importlib.import_module("_oc_hub_shim.model")
    except ImportError as exc:
        pytest.skip(f"open_clip's model.py does not import here: {exc}")
    yield module
    for name in [n for n in sys.modules if n.startswith("_oc_hub_shim.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("variant", ["plain", "quickgelu_ls_eos"])
def test_open_clip_builds_fastclip_written_repo(tmp_path, open_clip_model, variant):
    # the model_cfg fastclip writes is one open_clip itself builds, and its weights load strictly into it
    from safetensors.torch import load_file

    torch.manual_seed(0)
    kw = {"vocab_size": 100, "context_length": 8}
    if variant != "plain":
        kw.update(
            act="quick_gelu", vision={"ls_init": 0.3}, text={"ls_init": 0.3, "pool": "eos", "eos_id": 99}
        )
    ref = create_model("tiny", **kw).eval()
    save_open_clip(ref, tmp_path / "oc")
    model_cfg = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())["model_cfg"]
    cls = open_clip_model.CustomTextCLIP if model_cfg.pop("custom_text", False) else open_clip_model.CLIP
    oc = cls(**model_cfg).eval()
    oc.load_state_dict(load_file(str(tmp_path / "oc" / "open_clip_model.safetensors")), strict=True)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[98, 2, 3, 99, 0, 0, 0, 0], [98, 5, 6, 7, 8, 9, 10, 99], [98, 4, 99, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        ref_oc = (oc.encode_image(images), oc.encode_text(ids))
        oc64 = oc.double()
        truth = (oc64.encode_image(images.double()), oc64.encode_text(ids))
        got = (ref.encode_image(images, normalize=False), ref.encode_text(ids, normalize=False))
    for name, g, r, t in zip(("image", "text"), got, ref_oc, truth):
        assert_within_budget(f"open_clip {name}", g, r, t, torch.float32)


def test_tokenizer_without_transformers(tmp_path, hub, monkeypatch):
    # the `tokenizers` fallback (transformers not importable) gives the same ids, pad id from the
    # special tokens map, the end token kept on truncation
    _, src = _hf_repo(tmp_path, "clip")
    snap = hub("org/tiny-clip", src)
    want = _repo_ids(snap, ["a photo", LONG], 8)
    monkeypatch.setitem(sys.modules, "transformers", None)
    tok = fastclip.get_tokenizer("hf-hub:org/tiny-clip")
    assert tok._hf is None and tok._tok is not None
    assert torch.equal(tok(["a photo", LONG]), want)


def test_preprocess_settings_from_hf_processor_configs():
    from fastclip.models.pretrained import preprocess_from_hf

    assert preprocess_from_hf({"size": {"shortest_edge": 224}, "resample": 3}) == {
        "resize_mode": "shortest",
        "interpolation": "bicubic",
    }
    assert (
        preprocess_from_hf({"size": {"height": 384, "width": 384}, "resample": 2})["resize_mode"] == "squash"
    )
    # older CLIPFeatureExtractor files: an int size with a centre crop resizes the shorter side
    assert preprocess_from_hf({"size": 224, "do_center_crop": True})["resize_mode"] == "shortest"
    assert preprocess_from_hf({"size": 224})["resize_mode"] == "squash"
    got = preprocess_from_hf({"image_mean": [0.1, 0.2, 0.3], "image_std": [1, 2, 3], "resample": 0})
    assert got == {"mean": (0.1, 0.2, 0.3), "std": (1, 2, 3), "interpolation": "nearest"}


@pytest.fixture
def fake_hub(hub, monkeypatch):
    """A local HTTP server answering huggingface_hub's file requests (HEAD/GET /{repo}/resolve/{rev}/{file})
    from in-memory repos, with the Hub's headers and error codes; records every request. The cache of
    ``hub`` is used and offline mode is switched off."""
    import http.server
    import threading

    from huggingface_hub import constants

    repos, log = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, body: bool):
            log.append((self.command, self.path))
            parts = self.path.split("/")  # "", org, name, "resolve", rev, file
            files = repos.get(f"{parts[1]}/{parts[2]}") if len(parts) == 6 and parts[3] == "resolve" else None
            if files is None or parts[5] not in files:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound" if files is None else "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = files[parts[5]]
            self.send_response(200)
            self.send_header("X-Repo-Commit", hashlib.sha1(parts[2].encode()).hexdigest())
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    yield repos, log
    server.shutdown()
    server.server_close()


def test_online_download_fetches_only_what_is_needed(tmp_path, fake_hub, monkeypatch):
    from huggingface_hub import constants

    repos, log = fake_hub
    hf, src = _hf_repo(tmp_path, "clip")
    files = {name: (src / name).read_bytes() for name in os.listdir(src)}
    files["tf_model.h5"] = b"not needed"  # other frameworks' weights in the same repo are left alone
    files["pytorch_model.bin"] = b"not needed either: the safetensors file comes first"
    repos["org/online-clip"] = files

    def fetched():
        return sorted({p.rsplit("/", 1)[1] for m, p in log if m == "GET" and "/resolve/" in p})

    model, _, _ = fastclip.create_model_and_transforms("hf-hub:org/online-clip")
    assert fetched() == ["config.json", "model.safetensors", "preprocessor_config.json"]
    ids = fastclip.get_tokenizer("hf-hub:org/online-clip")(["a photo"])  # adds the tokenizer files only
    tokenizer_files = [n for n in files if n in TOKENIZER_FILES]
    assert "tokenizer.json" in tokenizer_files
    assert fetched() == sorted(
        ["config.json", "model.safetensors", "preprocessor_config.json", *tokenizer_files]
    )
    _check_features(hf, model.eval(), torch.randn(2, 3, 16, 16), ids)
    # the files are now in the standard cache: offline, the same id resolves without a request
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n = len(log)
    assert "hf-hub:org/online-clip" in fastclip.list_pretrained()
    fastclip.create_model_and_transforms("hf-hub:org/online-clip")
    assert len(log) == n
    # the Hub answers that a repo does not exist: a different message from "not cached"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubError, match="no such model repo"):
        fastclip.load_pretrained("hf-hub:org/nothing-here")
