"""Weight loading: parity with Hugging Face CLIPModel / SiglipModel and with open_clip's own towers
(tiny random configs, no downloads), layout round trips, the convert CLI, and wrong weight files."""

import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch
from utils import assert_within_budget

from fastclip.cli import main as cli_main
from fastclip.models import create_model, load_pretrained
from fastclip.models.pretrained import (
    WeightLoadError,
    detect_layout,
    load_state_dict_checked,
    read_state_dict,
    save_fastclip,
    to_open_clip,
)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# ids: 98 = start, 99 = end (largest id, as in CLIP vocabularies), 0 = pad; EOT at positions 3, 2, 7, 5
IDS = torch.tensor(
    [
        [98, 5, 6, 99, 0, 0, 0, 0],
        [98, 7, 99, 0, 0, 0, 0, 0],
        [98, 5, 6, 7, 8, 9, 10, 99],
        [98, 11, 12, 13, 14, 99, 0, 0],
    ]
)


def _images(b=4, size=16, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _hf_clip(tmp_path, eos=99, seed=0, **save_kw):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=8, eos_token_id=eos, bos_token_id=98, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5, image_size=16,
            patch_size=4,
        ),
        projection_dim=24,
    )  # fmt: skip
    hf = transformers.CLIPModel(cfg).eval()
    path = tmp_path / "hf_clip"
    hf.save_pretrained(path, **save_kw)
    return hf, path


def _hf_siglip(tmp_path, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=8, bos_token_id=98, eos_token_id=99, pad_token_id=0, projection_size=40,
        ),
        vision_config=dict(
            hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5, image_size=16,
            patch_size=4,
        ),
    )  # fmt: skip
    hf = transformers.SiglipModel(cfg).eval()
    path = tmp_path / "hf_siglip"
    hf.save_pretrained(path)
    return hf, path


def _hf_feats(hf, images, ids, mask=None):
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=images).pooler_output
        kw = {} if mask is None else {"attention_mask": mask}
        txt = hf.get_text_features(input_ids=ids, **kw).pooler_output
    return img, txt


def _compare_with_hf(hf, model, mask_fn=None):
    images = _images()
    mask = mask_fn(IDS) if mask_fn else None
    truth = _hf_feats(hf.double(), images.double(), IDS, None if mask is None else mask)
    ref = _hf_feats(hf.float(), images, IDS, mask)
    model.eval()
    with torch.no_grad():
        got = (model.encode_image(images), model.encode_text(IDS))
    for name, g, r, t in zip(("image", "text"), got, ref, truth):
        assert g.shape == t.shape
        assert_within_budget(f"{name} features", g, r, t, torch.float32)


@pytest.mark.parametrize("eos", [99, 2])
def test_hf_clip_parity(tmp_path, eos):
    # eos 99: transformers pools at the first eos id; legacy eos 2: at the largest id (argmax)
    hf, path = _hf_clip(tmp_path, eos=eos)
    model = load_pretrained(path)
    assert model.config.text.pool == ("eos" if eos == 99 else "argmax")
    assert not model.is_siglip and model.logit_scale.shape == (1,)
    torch.testing.assert_close(model.logit_scale.detach(), hf.logit_scale.detach().reshape(1))
    _compare_with_hf(hf, model, mask_fn=lambda ids: (ids != 0).long())  # padding masked on the HF side
    _compare_with_hf(hf, model)


@pytest.mark.parametrize("loader", ["clip", "siglip"])
def test_hf_interpolated_position_embeddings(tmp_path, loader):
    # other resolutions (non-square too): bicubic resize of the position grid, as interpolate_pos_encoding=True
    hf, path = (_hf_clip if loader == "clip" else _hf_siglip)(tmp_path)
    model = load_pretrained(path, dynamic_size=True).eval()
    images = torch.randn(2, 3, 24, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=images, interpolate_pos_encoding=True).pooler_output
        truth = (
            hf.double()
            .get_image_features(pixel_values=images.double(), interpolate_pos_encoding=True)
            .pooler_output
        )
        got = model.encode_image(images)
    assert_within_budget("interpolated image features", got, ref, truth, torch.float32)


def test_hf_siglip_parity(tmp_path):
    hf, path = _hf_siglip(tmp_path)
    (path / "preprocessor_config.json").write_text(
        '{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}'
    )
    model = load_pretrained(path)
    assert model.config.vision.mean == (0.1, 0.2, 0.3) and model.config.vision.std == (0.4, 0.5, 0.6)
    assert model.is_siglip and model.config.vision.pool == "map" and not model.config.text.causal
    assert model.logit_bias.shape == (1,)
    torch.testing.assert_close(model.logit_bias.detach(), hf.logit_bias.detach())
    _compare_with_hf(hf, model)


def test_hf_sharded_and_bin(tmp_path):
    hf, path = _hf_clip(tmp_path, max_shard_size="40KB")
    assert os.path.exists(path / "model.safetensors.index.json")
    model = load_pretrained(path, attn_impl="math")
    assert model.config.attn_impl == "math"
    _compare_with_hf(hf, model)
    # the same weights as a pytorch_model.bin
    sd, _ = read_state_dict(path)
    bin_dir = tmp_path / "bin_dir"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((path / "config.json").read_text())
    torch.save(sd, bin_dir / "pytorch_model.bin")
    _compare_with_hf(hf, load_pretrained(bin_dir))


# ------------------------------------------------------------------------------------------ open_clip


@pytest.fixture
def open_clip_transformer(monkeypatch):
    """open_clip's transformer.py, imported without open_clip's package (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = torch.nn.BatchNorm2d  # only referenced by utils.freeze_batch_norm_2d
    tv.ops, ops.misc = ops, misc
    pkg = types.ModuleType("_oc_shim")
    pkg.__path__ = list(spec.submodule_search_locations)
    for name, mod in (
        ("torchvision", tv),
        ("torchvision.ops", ops),
        ("torchvision.ops.misc", misc),
        ("_oc_shim", pkg),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    module = importlib.import_module("_oc_shim.transformer")
    yield module
    for name in [n for n in sys.modules if n.startswith("_oc_shim.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("custom_text", [False, True])
def test_open_clip_parity(tmp_path, open_clip_transformer, custom_text):
    oc = open_clip_transformer
    torch.manual_seed(0)
    ls = {"ls_init_value": 0.5} if custom_text else {}  # LayerScale in one of the two variants
    visual = oc.VisionTransformer(
        image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_ratio=4.0, output_dim=24, **ls
    )
    text_kw = dict(no_causal_mask=True, proj_bias=True, pool_type="last") if custom_text else {}
    text = oc.TextTransformer(
        context_length=8, vocab_size=100, width=32, heads=4, layers=2, output_dim=24, **text_kw
    )
    with torch.no_grad():  # non-trivial norms and class token
        for m in (visual, text):
            for n, p in m.named_parameters():
                if "ln" in n or "class_embedding" in n or "gamma" in n:
                    p.add_(0.1 * torch.randn_like(p))
    tp = "text." if custom_text else ""
    sd = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    sd.update({f"{tp}{k}": v for k, v in text.state_dict().items()})
    sd["logit_scale"] = torch.tensor(2.5)  # 0-dim, as open_clip stores it
    assert detect_layout(sd) == "open_clip"
    path = tmp_path / "oc.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    over = {"vision_heads": 4, "text_heads": 4}  # open_clip assumes width/64 heads when inferring
    if custom_text:
        over.update(causal=False, text_pool="last")
    model = load_pretrained(path, **over).eval()
    assert model.logit_scale.shape == (1,) and float(model.logit_scale.detach()) == 2.5
    assert ("visual.transformer.blocks.0.ls1.gamma" in model.state_dict()) is custom_text
    images = _images()
    with torch.no_grad():
        truth = (visual.double()(images.double()), text.double()(IDS))
        ref = (visual.float()(images), text.float()(IDS))
        got = (model.encode_image(images), model.encode_text(IDS))
    for name, g, r, t in zip(("image", "text"), got, ref, truth):
        assert_within_budget(f"open_clip {name}", g, r, t, torch.float32)
    # and back: fastclip -> open_clip names gives the original tensors
    back = to_open_clip(model.state_dict(), custom_text=custom_text)
    assert set(back) == set(sd) - {f"{tp}attn_mask"}
    for k, v in back.items():
        torch.testing.assert_close(v.reshape(sd[k].shape), sd[k], rtol=0, atol=0, msg=k)


def test_open_clip_round_trip_named(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    sd = to_open_clip(model.state_dict())
    assert "visual.conv1.weight" in sd and "text_projection" in sd and "token_embedding.weight" in sd
    torch.save(sd, tmp_path / "oc.pt")
    loaded = load_pretrained(tmp_path / "oc.pt", "tiny").eval()
    inferred = load_pretrained(tmp_path / "oc.pt", vision_heads=4, text_heads=4).eval()
    images, ids = _images(2, 32), torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        for m in (loaded, inferred):
            torch.testing.assert_close(m.encode_image(images), model.encode_image(images), rtol=0, atol=0)
            torch.testing.assert_close(m.encode_text(ids), model.encode_text(ids), rtol=0, atol=0)


def test_open_clip_timm_siglip_layout(tmp_path):
    # open_clip's SigLIP models: timm vision trunk (visual.trunk.*) + CustomTextCLIP text (text.*)
    hf, path = _hf_siglip(tmp_path)
    sd = to_open_clip(load_pretrained(path).state_dict())
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    expected = {  # names and shapes of timm's VisionTransformer / AttentionPoolLatent and open_clip's text tower
        "visual.trunk.patch_embed.proj.weight": (40, 3, 4, 4),
        "visual.trunk.patch_embed.proj.bias": (40,),
        "visual.trunk.pos_embed": (1, 16, 40),
        "visual.trunk.blocks.1.attn.qkv.weight": (120, 40),
        "visual.trunk.blocks.1.mlp.fc2.weight": (40, 56),
        "visual.trunk.norm.weight": (40,),
        "visual.trunk.attn_pool.latent": (1, 1, 40),
        "visual.trunk.attn_pool.q.weight": (40, 40),
        "visual.trunk.attn_pool.kv.weight": (80, 40),
        "visual.trunk.attn_pool.mlp.fc1.weight": (56, 40),
        "text.token_embedding.weight": (100, 32),
        "text.positional_embedding": (8, 32),
        "text.transformer.resblocks.0.attn.in_proj_weight": (96, 32),
        "text.ln_final.weight": (32,),
        "text.text_projection.weight": (40, 32),
        "text.text_projection.bias": (40,),
        "logit_bias": (1,),
    }
    for k, shape in expected.items():
        assert shapes.get(k) == shape, (k, shapes.get(k))
    assert not any(
        k.startswith(("visual.trunk.cls_token", "visual.trunk.norm_pre", "visual.head")) for k in sd
    )
    safetensors_torch.save_file(
        {k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "oc_siglip.safetensors")
    )
    model = load_pretrained(tmp_path / "oc_siglip.safetensors", vision_heads=5, text_heads=4, act="gelu_tanh")
    assert model.is_siglip and model.config.vision.pool == "map" and not model.config.vision.class_token
    assert not model.config.text.causal and model.config.text.pool == "last"
    _compare_with_hf(hf, model)


# ------------------------------------------------------------------------------------------ fastclip files, convert CLI


def test_fastclip_safetensors_and_convert_cli(tmp_path, capsys):
    hf, path = _hf_siglip(tmp_path)
    dst = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(path), str(dst)]) == 0
    assert "SigLIP" in capsys.readouterr().out
    model = load_pretrained(dst)  # config from the file's metadata
    _compare_with_hf(hf, model)
    assert cli_main(["convert", str(path), str(dst)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    # open_clip layout out and back in
    tiny = create_model("tiny")
    save_fastclip(tiny, tmp_path / "tiny.safetensors")
    oc = tmp_path / "tiny_oc.safetensors"
    assert cli_main(["convert", str(tmp_path / "tiny.safetensors"), str(oc), "--to", "open_clip"]) == 0
    back = load_pretrained(oc, "tiny")
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    # a broken source: exit code 1 and the report on stderr
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert cli_main(["convert", str(tmp_path / "junk.safetensors"), str(tmp_path / "x.safetensors")]) == 1
    assert "fastclip convert" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ wrong weight files


def test_wrong_weight_files_report_and_load_nothing(tmp_path):
    hf, path = _hf_clip(tmp_path)
    sd = safetensors_torch.load_file(str(path / "model.safetensors"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((path / "config.json").read_text())
    # a missing tensor, an extra tensor and a tensor of the wrong shape
    sd.pop("vision_model.post_layernorm.bias")
    sd["text_model.extra.weight"] = torch.zeros(3)
    sd["text_projection.weight"] = torch.zeros(24, 31)
    safetensors_torch.save_file(sd, str(broken / "model.safetensors"))
    with pytest.raises(WeightLoadError) as info:
        load_pretrained(broken)
    msg = str(info.value)
    assert "nothing was loaded" in msg
    assert "visual.norm.bias" in msg and "missing" in msg
    assert "text_model.extra.weight" in msg and "unexpected" in msg
    assert "text.proj.weight: expected (24, 32), got (24, 31)" in msg
    assert info.value.missing == ["visual.norm.bias"]

    # into an existing model: nothing is half-loaded
    model = create_model("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {k: v.clone() + 1 for k, v in before.items()}
    bad["text.pos_embed"] = torch.zeros(5, 96)
    with pytest.raises(WeightLoadError, match="text.pos_embed: expected"):
        load_state_dict_checked(model, bad)
    bad = {k: v.clone() + 1 for k, v in before.items()}
    bad["visual.pos_embed"][0, 0] = float("nan")
    with pytest.raises(WeightLoadError, match="non-finite"):
        load_state_dict_checked(model, bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # a real file of another model
    torch.save({"encoder.weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(WeightLoadError, match="not a CLIP/SigLIP state dict"):
        load_pretrained(tmp_path / "other.bin", "tiny")
    # the wrong named config for the weights
    save_fastclip(create_model("tiny"), tmp_path / "tiny.safetensors")
    with pytest.raises(WeightLoadError, match="shape mismatches"):
        load_pretrained(tmp_path / "tiny.safetensors", "tiny-siglip")
    # a pickle with code in it is refused by weights_only loading
    torch.save({"state_dict": {"x": types.SimpleNamespace(a=1)}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_pretrained(tmp_path / "evil.pt", "tiny")
    with pytest.raises(ValueError, match="existing file"):
        load_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path)  # a directory without config.json
    with pytest.raises(ValueError, match=".safetensors, .bin"):
        (tmp_path / "w.npz").write_bytes(b"")
        load_pretrained(tmp_path / "w.npz")
    with pytest.raises(TypeError, match="path"):
        load_pretrained(123)


def test_training_checkpoint_wrapping(tmp_path):
    # open_clip training checkpoints: {"epoch": ..., "state_dict": {"module.visual...": ...}}
    model = create_model("tiny")
    sd = {f"module.{k}": v for k, v in to_open_clip(model.state_dict()).items()}
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "epoch_3.pt")
    loaded = load_pretrained(tmp_path / "epoch_3.pt", "tiny")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("where", ["absolute", "dotdot", "nested_dotdot"])
def test_shard_index_naming_a_file_outside_the_model_directory_is_refused(tmp_path, where):
    """issue 28 #12: a weight_map entry that is an absolute path or climbs out with '..' read weights from
    outside the model directory; refused, naming the index and the entry (subdirectories stay allowed)."""
    import json
    import shutil

    _, path = _hf_clip(tmp_path, max_shard_size="40KB")
    index = path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    victim = sorted(set(data["weight_map"].values()))[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(str(path / victim), str(outside / victim))
    name = {
        "absolute": str(outside / victim),
        "dotdot": f"../outside/{victim}",
        "nested_dotdot": f"sub/../../outside/{victim}",
    }[where]
    data["weight_map"] = {k: (name if v == victim else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(
        (ValueError, WeightLoadError), match=r"weight_map names .*outside the model directory"
    ):
        read_state_dict(path)
    with pytest.raises(
        (ValueError, WeightLoadError), match=r"model.safetensors.index.json: weight_map names"
    ):
        load_pretrained(path)
    # a shard in a subdirectory of the model directory is still read
    (path / "sub").mkdir()
    shutil.move(str(outside / victim), str(path / "sub" / victim))
    data["weight_map"] = {k: (f"sub/{victim}" if v == name else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    assert read_state_dict(path)[0]


def test_written_safetensors_have_the_umask_mode(tmp_path):
    """issue 28 #15: safetensors writes 0600 (a temporary file); fastclip's files get 0666 less the umask,
    like the JSON beside them: save_fastclip, save_open_clip and fastclip convert."""
    import stat

    from fastclip.models.openclip_format import save_open_clip

    mask = os.umask(0)
    os.umask(mask)
    model = create_model("tiny", patch_size=8)
    save_fastclip(model, tmp_path / "tiny.safetensors")
    save_open_clip(model, tmp_path / "oc")
    assert cli_main(["convert", str(tmp_path / "tiny.safetensors"), str(tmp_path / "hf.safetensors")]) == 0
    for path in (tmp_path / "tiny.safetensors", tmp_path / "oc" / "open_clip_model.safetensors",
                 tmp_path / "oc" / "open_clip_config.json", tmp_path / "hf.safetensors"):  # fmt: skip
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path
