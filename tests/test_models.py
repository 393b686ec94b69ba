"""Encoder towers: contract of the two-tower model, configs, attention backends, packing, patch dropout,
checkpointing, torch.compile, tokenizers and bad input. Weight loading is in test_models_pretrained.py."""

import math

import pytest
import torch
from utils import assert_within_budget

import fastclip
from fastclip.models import (
    CLIP,
    TextTransformer,
    VisionConfig,
    VisionTransformer,
    WordTokenizer,
    create_model,
    get_config,
    list_models,
)
from fastclip.models.attention import attention, available_impls, resolve_impl


def _inputs(model, b=4, seed=0, size=None):
    g = torch.Generator().manual_seed(seed)
    s = size or model.config.vision.image_size
    images = torch.randn(b, 3, s, s, generator=g)
    texts = torch.randint(
        3, model.config.text.vocab_size - 1, (b, model.config.text.context_length), generator=g
    )
    texts[:, -1] = model.config.text.vocab_size - 1  # an EOT-like largest id
    return images, texts


# ------------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", ["tiny", "tiny-siglip"])
def test_forward_contract_and_loss(name):
    torch.manual_seed(0)
    model = fastclip.create_model(name)  # the lazy top-level re-export
    assert isinstance(model, CLIP)
    images, texts = _inputs(model)
    out = model(images, texts)
    siglip = name.endswith("siglip")
    assert set(out) == {"image_features", "text_features", "logit_scale"} | (
        {"logit_bias"} if siglip else set()
    )
    assert model.config.siglip is siglip and model.is_siglip is siglip
    for k in ("image_features", "text_features"):
        assert out[k].shape == (4, model.config.embed_dim)
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)
    assert model.logit_scale.shape == (1,)
    expected_scale = 10.0 if siglip else 1 / 0.07
    torch.testing.assert_close(out["logit_scale"], torch.tensor([expected_scale]), rtol=1e-6, atol=0)
    if siglip:
        assert model.logit_bias.shape == (1,) and float(out["logit_bias"].detach()) == -10.0
    loss = (fastclip.SigLipLoss() if siglip else fastclip.ClipLoss())(**out)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.logit_scale.grad is not None and model.visual.patch_embed.weight.grad.abs().sum() > 0
    # encode_* without normalization give the raw projections
    raw = model.encode_image(images)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), out["image_features"])
    assert model.config.vision.image_size in (32, 64) and model.config.text.context_length == 16
    nwd = model.no_weight_decay()
    assert {"logit_scale", "visual.pos_embed", "text.pos_embed", "visual.norm.weight"} <= nwd
    assert "visual.transformer.blocks.0.attn.qkv.weight" not in nwd and "text.token_embed.weight" not in nwd


def test_named_configs_and_overrides():
    names = list_models()
    for required in (
        "tiny",
        "tiny-siglip",
        "ViT-B-32",
        "ViT-B-16",
        "ViT-L-14",
        "ViT-B-16-SigLIP",
        "ViT-SO400M-14-SigLIP",
    ):
        assert required in names
    cfg = get_config("ViT-SO400M-14-SigLIP")
    assert (cfg.vision.width, cfg.vision.depth, cfg.vision.mlp_dim, cfg.embed_dim) == (1152, 27, 4304, 1152)
    assert cfg.siglip and cfg.init_logit_bias == -10.0 and math.isclose(cfg.init_logit_scale, math.log(10))
    assert math.isclose(get_config("ViT-B-32").init_logit_scale, math.log(1 / 0.07))
    m = create_model(
        "tiny", vocab_size=1000, context_length=8, image_size=64, vision={"depth": 1}, text_width=64
    )
    assert m.text.token_embed.num_embeddings == 1000 and m.text.pos_embed.shape == (8, 64)
    assert m.visual.pos_embed.shape[0] == (64 // 4) ** 2 + 1 and len(m.visual.transformer.blocks) == 1
    assert m.text.transformer.blocks[0].mlp.fc1.out_features == 4 * 64  # mlp_dim follows the new width
    with pytest.raises(ValueError, match="vocab_size"):
        create_model("tiny", vocab_sise=10)
    with pytest.raises(ValueError, match="depth"):
        create_model("tiny", vision={"detph": 1})
    with pytest.raises(ValueError, match="ViT-B-16"):
        create_model("ViT-B-61")
    with pytest.raises(ValueError, match="heads"):
        create_model("tiny", vision_heads=5)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        create_model("tiny", image_size=30)
    with pytest.raises(ValueError, match="attn_impl"):
        create_model("tiny", attn_impl="fast")
    with pytest.raises(ValueError, match="patch_dropout"):
        create_model("tiny", patch_dropout=1.0)
    # pixel statistics the weights expect (for the data pipeline)
    assert get_config("ViT-B-16-SigLIP").vision.mean == (0.5, 0.5, 0.5)
    assert get_config("ViT-B-16").vision.mean[0] == pytest.approx(0.4815, abs=1e-4)
    gray = create_model("tiny", in_channels=1)
    assert gray.config.vision.mean == (0.5,) and gray.encode_image(torch.randn(2, 1, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="mean/std"):
        create_model("tiny", vision={"std": (0.5, 0.0, 0.5)})


# ------------------------------------------------------------------------------------------ attention


def _qkv(b, t, h, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, h, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_backends_agree(dtype, causal):
    q, k, v = _qkv(3, 13, 4, 24, dtype)
    truth = attention(*(t.double() for t in (q, k, v)), causal=causal, impl="math")
    ref = attention(q, k, v, causal=causal, impl="math")
    got = attention(q, k, v, causal=causal, impl="sdpa")
    assert got.dtype == dtype and got.shape == q.shape
    assert_within_budget("sdpa", got, ref, truth, dtype)
    # packed: 3 sequences of lengths 5, 1, 7 in one row == each alone
    lens = [5, 1, 7]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    packed = [t[:1] for t in (q, k, v)]
    for impl in ("math", "sdpa"):
        out = attention(*packed, causal=causal, impl=impl, cu_seqlens=cu)
        start = 0
        for n in lens:
            alone = attention(*(t[:, start : start + n] for t in packed), causal=causal, impl="math")
            torch.testing.assert_close(out[:, start : start + n], alone, **_tol(dtype))
            start += n


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def test_attention_auto_and_bad_impl():
    assert resolve_impl("auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert {"sdpa", "math"} <= set(available_impls())
    q, k, v = _qkv(1, 4, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="attn_impl"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    if "flash_attn" not in available_impls():
        with pytest.raises(ValueError, match="flash_attn"):
            attention(q, k, v, impl="flash_attn")


@pytest.mark.skipif("xformers" not in available_impls(), reason="xformers does not import")
def test_xformers_agrees():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        pytest.skip("xformers memory_efficient_attention has no CPU kernel")
    q, k, v = (t.to(dev) for t in _qkv(2, 37, 4, 32, torch.float16))
    torch.testing.assert_close(
        attention(q, k, v, impl="xformers"), attention(q, k, v, impl="math"), atol=2e-3, rtol=2e-3
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_agrees_gpu(dtype):
    if "flash_attn" not in available_impls():
        pytest.skip("flash-attn is not installed")
    q, k, v = (t.cuda() for t in _qkv(2, 37, 4, 64, dtype))
    truth = attention(*(t.double() for t in (q, k, v)), impl="math", causal=True)
    ref = attention(q, k, v, impl="math", causal=True)
    assert_within_budget("flash", attention(q, k, v, impl="flash_attn", causal=True), ref, truth, dtype)
    cu = torch.tensor([0, 10, 11, 37], dtype=torch.int32, device="cuda")
    got = attention(q[:1], k[:1], v[:1], impl="flash_attn", cu_seqlens=cu)
    torch.testing.assert_close(
        got, attention(q[:1], k[:1], v[:1], impl="math", cu_seqlens=cu), atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize("name", ["tiny", "tiny-siglip"])
def test_model_backends_agree(name):
    torch.manual_seed(0)
    model = create_model(name).double().eval()
    images, texts = _inputs(model, b=3)
    with torch.no_grad():
        model.set_attn_impl("math")
        truth = model(images.double(), texts)
        model.float()
        ref = model(images, texts)
        model.set_attn_impl("sdpa")
        got = model(images, texts)
    for k in ("image_features", "text_features"):
        assert_within_budget(k, got[k], ref[k], truth[k], torch.float32)


# ------------------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("pool", ["tok", "mean", "map"])
def test_packing_equals_one_by_one(pool):
    torch.manual_seed(0)
    cfg = VisionConfig(image_size=16, patch_size=4, width=32, depth=2, heads=4, pool=pool, dynamic_size=True)
    if pool == "map":
        cfg = VisionConfig(**{**cfg.__dict__, "class_token": False, "pre_norm": False, "patch_bias": True})
    tower = VisionTransformer(cfg, embed_dim=24).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=g) for h, w in ((16, 16), (8, 24), (4, 4), (20, 12))]
    for impl in ("sdpa", "math"):
        tower.attn_impl = impl
        with torch.no_grad():
            packed = tower.forward_packed(images)
            alone = torch.cat([tower(img.unsqueeze(0)) for img in images])
        assert packed.shape == (4, 24)
        torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_packing_bad_input():
    tower = create_model("tiny").visual
    with pytest.raises(ValueError, match="non-empty list"):
        tower.forward_packed([])
    with pytest.raises(ValueError, match=r"images\[1\].*multiples of patch_size"):
        tower.forward_packed([torch.randn(3, 8, 8), torch.randn(3, 8, 10)])


# ------------------------------------------------------------------------------------------ patch dropout, checkpointing, compile


def _seq_len_seen(tower, run):
    seen = []
    h = tower.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        run()
    finally:
        h.remove()
    return seen


@pytest.mark.parametrize(
    "name,prob,expected", [("tiny", 0.5, 32 + 1), ("tiny", 0.3, 44 + 1), ("tiny-siglip", 0.75, 16)]
)
def test_patch_dropout_keeps_count(name, prob, expected):
    model = create_model(name, patch_dropout=prob)
    images, _ = _inputs(model, b=2)
    model.train()
    assert _seq_len_seen(model.visual, lambda: model.encode_image(images)) == [expected]
    # packed: every image keeps its own count
    n_keep = expected - model.config.vision.num_prefix_tokens
    seen = _seq_len_seen(model.visual, lambda: model.visual.forward_packed([images[0], images[1]]))
    assert seen == [2 * expected]
    assert n_keep == max(1, int(64 * (1 - prob)))
    model.eval()  # no dropout at eval
    assert _seq_len_seen(model.visual, lambda: model.encode_image(images)) == [
        64 + model.config.vision.num_prefix_tokens
    ]
    # the kept tokens are the image's own tokens (position embeddings added before dropping): deterministic eval
    # output is unchanged by the setting
    ref = create_model(name)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model.eval().encode_image(images), ref.eval().encode_image(images))


@pytest.mark.parametrize("name", ["tiny", "tiny-siglip"])
def test_grad_checkpointing_same_gradients(name):
    torch.manual_seed(0)
    a = create_model(name).train()
    b = create_model(name, grad_checkpointing=True).train()
    b.load_state_dict(a.state_dict())
    images, texts = _inputs(a, b=3)
    grads = []
    for m in (a, b):
        out = m(images, texts)
        loss = (fastclip.SigLipLoss() if m.is_siglip else fastclip.ClipLoss())(**out)
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    assert b.visual.transformer.grad_checkpointing and b.text.transformer.grad_checkpointing
    for k in grads[0]:
        torch.testing.assert_close(
            grads[1][k], grads[0][k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_grad_checkpointing_recomputes():
    # the pre-hook fires twice per block when the block is recomputed in backward
    model = create_model("tiny", grad_checkpointing=True).train()
    calls = []
    model.visual.transformer.blocks[0].attn.register_forward_pre_hook(lambda *a: calls.append(1))
    images, texts = _inputs(model, b=2)
    model.encode_image(images).sum().backward()
    assert len(calls) == 2


def test_torch_compile_forward_cpu():
    torch.manual_seed(0)
    model = create_model("tiny", vision={"depth": 1}, text={"depth": 1}).eval()
    images, texts = _inputs(model, b=2)
    compiled = torch.compile(
        model, dynamic=False, fullgraph=True
    )  # no graph breaks: checks skip under tracing
    with torch.no_grad():
        got = compiled(images, texts)
        ref = model(images, texts)
    for k in ("image_features", "text_features"):
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ bad input


def test_bad_images():
    model = create_model("tiny")
    _, texts = _inputs(model, b=2)
    with pytest.raises(ValueError, match=r"expected 32x32 images.*got 64x64"):
        model(torch.randn(2, 3, 64, 64), texts)
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(2, 1, 32, 32), texts)
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32), texts)
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), texts)
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0]], texts)
    bad = torch.randn(2, 3, 32, 32)
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        model(bad, texts)
    # dynamic_size accepts other multiples of the patch size but never a non-multiple
    dyn = create_model("tiny", dynamic_size=True)
    assert dyn.encode_image(torch.randn(1, 3, 48, 16)).shape == (1, 64)
    with pytest.raises(ValueError, match="multiples of patch_size=4"):
        dyn.encode_image(torch.randn(1, 3, 30, 32))


def test_bad_texts():
    model = create_model("tiny")
    images, texts = _inputs(model, b=2)
    with pytest.raises(
        ValueError, match=r"token ids in \[0, 512\).*511|ids in \[0, 512\), got ids in \[\d+, 512\]"
    ):
        t = texts.clone()
        t[0, 3] = 512
        model(images, t)
    with pytest.raises(ValueError, match=r"got ids in \[-1"):
        t = texts.clone()
        t[1, 0] = -1
        model(images, t)
    with pytest.raises(ValueError, match="context_length=16"):
        model(images, torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(images, texts.float())
    with pytest.raises(ValueError, match="2-D"):
        model(images, texts[0])
    # shorter texts are fine (position embeddings are sliced)
    assert model.encode_text(texts[:, :5]).shape == (2, 64)


def test_text_pooling_positions():
    # argmax pooling reads the EOT position: padding after it (causal) cannot change the feature
    torch.manual_seed(0)
    tower = TextTransformer(get_config("tiny").text, embed_dim=64).eval()
    a = torch.tensor([[2, 5, 6, 511, 0, 0, 0, 0]])
    b = torch.tensor([[2, 5, 6, 511, 9, 9, 9, 9]])
    with torch.no_grad():
        torch.testing.assert_close(tower(a), tower(b))
        assert not torch.allclose(tower(a), tower(torch.tensor([[2, 5, 7, 511, 0, 0, 0, 0]])))


def test_components_reject_wrong_configs():
    with pytest.raises(TypeError, match="VisionConfig"):
        VisionTransformer(get_config("tiny").text, 64)
    with pytest.raises(TypeError, match="TextConfig"):
        TextTransformer(get_config("tiny").vision, 64)
    with pytest.raises(TypeError, match="ModelConfig"):
        CLIP({"embed_dim": 64})
    with pytest.raises(ValueError, match="class_token"):
        VisionConfig(pool="tok", class_token=False)


# ------------------------------------------------------------------------------------------ tokenizers


def test_word_tokenizer():
    tok = WordTokenizer(["red", "green", "Square", "circle", "red"], context_length=6)
    assert tok.vocab_size == 3 + 4 + 1 and tok.eot_id == tok.vocab_size - 1
    ids = tok(["a red square", "GREEN circle, red square circle green red"])
    assert ids.dtype == torch.long and ids.shape == (2, 6)
    assert ids[0].tolist() == [2, 1, 3, 5, tok.eot_id, 0]  # start, unk 'a', red, square, end, pad
    assert ids[1].tolist() == [2, 4, 6, 1, 3, tok.eot_id]  # truncated, end token kept last; ',' is unk
    assert (ids.argmax(dim=-1) == torch.tensor([4, 5])).all()  # EOT is the largest id in every row
    assert tok.decode(ids[0]) == "<unk> red square"
    model = create_model("tiny", vocab_size=tok.vocab_size, context_length=6)
    assert model.encode_text(ids).shape == (2, 64)
    with pytest.raises(ValueError, match="context_length"):
        WordTokenizer(["a"], context_length=1)
    with pytest.raises(TypeError, match="single str"):
        WordTokenizer("red green")
    with pytest.raises(TypeError, match="str entries"):
        tok([1, 2])


def test_load_tokenizer_local(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "red": 2, "square": 3}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    from fastclip.models import load_tokenizer

    tok = load_tokenizer(str(tmp_path / "tokenizer.json"), context_length=5)
    ids = tok(["red square", "square red blue red square red"])
    assert ids.shape == (2, 5) and ids[0].tolist()[:2] == [2, 3] and ids[1].tolist() == [3, 2, 1, 2, 3]
    # without transformers: the `tokenizers` package alone gives the same ids
    import sys

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "transformers", None)
        plain = load_tokenizer(str(tmp_path / "tokenizer.json"), context_length=5)
        assert plain._hf is None
        assert torch.equal(plain(["red square", "square red blue red square red"]), ids)
    with pytest.raises(ValueError, match="not found"):
        load_tokenizer(str(tmp_path / "nope"))
