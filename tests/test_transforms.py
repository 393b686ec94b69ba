"""Image transforms (fastclip.transforms): hand-computed eval outputs, every PIL mode, odd sizes,
seeded train crops, and errors for bad arguments."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.transforms import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    image_transform,
    random_resized_crop_box,
)


def _rgb(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _normalise(arr_uint8, mean, std):
    x = arr_uint8.astype(np.float64).transpose(2, 0, 1) / 255.0
    return (x - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None]


def _close(got, want, tol=1e-6):
    diff = (got.double() - torch.as_tensor(want)).abs()
    assert diff.max() <= tol, (
        f"max |diff| {float(diff.max()):.3g} at {np.unravel_index(int(diff.argmax()), diff.shape)}"
    )


def test_eval_shortest_without_resize_is_centre_crop_and_normalise():
    arr = _rgb(4, 6)  # shorter side already 4: only the centre crop (columns 1..4) applies
    x = image_transform(4, is_train=False)(Image.fromarray(arr))
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32 and x.is_contiguous()
    _close(x, _normalise(arr[:, 1:5], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))


def test_eval_shortest_box_resize_matches_block_means():
    arr = _rgb(8, 12, seed=1)  # box filter at an exact factor 2 = mean of 2x2 blocks
    x = image_transform(4, is_train=False, interpolation="box", mean=SIGLIP_MEAN, std=SIGLIP_STD)(
        Image.fromarray(arr)
    )
    blocks = arr.astype(np.float64).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3))
    small = np.floor(blocks + 0.5).astype(np.uint8)  # Pillow rounds to nearest
    want = _normalise(small[:, 1:5], SIGLIP_MEAN, SIGLIP_STD)
    _close(x, want, tol=1.5 / 255 / 0.5)  # Pillow's fixed-point box filter may differ by one level


def test_eval_shortest_bicubic_equals_pillow_resize_then_crop():
    arr = _rgb(30, 50, seed=2)
    x = image_transform(10, is_train=False)(Image.fromarray(arr))
    resized = np.asarray(Image.fromarray(arr).resize((16, 10), Image.Resampling.BICUBIC))  # int(10*50/30)=16
    _close(x, _normalise(resized[:, 3:13], OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))


def test_eval_squash_and_longest():
    arr = _rgb(8, 12, seed=3)
    sq = image_transform((4, 6), is_train=False, resize_mode="squash", interpolation="box")(
        Image.fromarray(arr)
    )
    blocks = np.floor(arr.astype(np.float64).reshape(4, 2, 6, 2, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
    _close(sq, _normalise(blocks, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), tol=1.5 / 255 / 0.26)

    arr = _rgb(2, 4, seed=4)  # longer side already 4: pad 1 row above and 1 below with the fill colour
    lo = image_transform(4, is_train=False, resize_mode="longest", fill=(10, 20, 30))(Image.fromarray(arr))
    padded = np.empty((4, 4, 3), np.uint8)
    padded[:] = (10, 20, 30)
    padded[1:3] = arr
    _close(lo, _normalise(padded, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("is_train", [False, True])
def test_every_mode_and_tiny_sizes(mode, is_train):
    tf = image_transform(7, is_train=is_train)
    for h, w in [(1, 1), (1, 9), (13, 2), (20, 31)]:
        img = Image.fromarray(_rgb(h, w, seed=h * w)).convert(mode)
        x = tf(img, generator=torch.Generator().manual_seed(0))
        assert x.shape == (3, 7, 7) and x.dtype == torch.float32 and torch.isfinite(x).all(), (mode, h, w)


def test_alpha_dropped_and_grey_replicated():
    arr = _rgb(5, 5, seed=5)
    tf = image_transform(5, is_train=False)
    rgba = np.concatenate([arr, np.zeros((5, 5, 1), np.uint8)], axis=2)  # fully transparent
    _close(tf(Image.fromarray(rgba, "RGBA")), tf(Image.fromarray(arr)))
    grey = tf(Image.fromarray(arr[..., 0], "L"))
    raw = grey * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1) + torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    _close(raw[0], raw[1], tol=1e-5)
    _close(raw[1], raw[2], tol=1e-5)


def test_sixteen_bit_png_scaled_to_eight_bits():
    a16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369).astype(np.uint16)  # 0 .. 65535
    buf = io.BytesIO()
    Image.fromarray(a16).save(buf, format="PNG")
    img = Image.open(io.BytesIO(buf.getvalue()))
    assert img.mode.startswith("I")
    x = image_transform(4, is_train=False, mean=(0, 0, 0), std=(1, 1, 1))(img)
    want = np.rint(a16 / 257.0) / 255.0
    _close(x[0], want)
    assert float(x.max()) == 1.0  # a white 16-bit pixel stays white (not clipped at 255/65535)


def test_cmyk_jpeg_and_palette_with_transparency():
    buf = io.BytesIO()
    Image.fromarray(_rgb(16, 16)).convert("CMYK").save(buf, format="JPEG")
    x = image_transform(8, is_train=False)(Image.open(io.BytesIO(buf.getvalue())))
    assert x.shape == (3, 8, 8)
    pal = Image.fromarray(_rgb(6, 6)).convert("P")
    pal.info["transparency"] = b"\x00" * 256
    with_warnings = image_transform(6, is_train=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_warnings(pal)


def test_train_crop_is_seeded_and_reproducible():
    img = Image.fromarray(_rgb(64, 80, seed=6))
    tf = image_transform(16, is_train=True, scale=(0.3, 1.0))
    a = tf(img, generator=torch.Generator().manual_seed(123))
    b = tf(img, generator=torch.Generator().manual_seed(123))
    c = tf(img, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(5)
    d = tf(img)
    torch.manual_seed(5)
    assert torch.equal(d, tf(img))  # without a generator: the global torch RNG


def test_train_full_crop_equals_squash():
    img = Image.fromarray(_rgb(40, 40, seed=7))
    train = image_transform(10, is_train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    squash = image_transform(10, is_train=False, resize_mode="squash")
    assert torch.equal(train(img, generator=torch.Generator().manual_seed(0)), squash(img))


def test_random_resized_crop_box_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(200, 120, (0.5, 0.9), (3 / 4, 4 / 3), g)
        assert 0 <= left and 0 <= top and left + w <= 200 and top + h <= 120
        assert 0.5 * 0.95 <= w * h / (200 * 120) <= 0.9 * 1.05
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    # impossible ratio for a 1x100 strip: falls back to the centre crop of the widest allowed ratio
    left, top, w, h = random_resized_crop_box(100, 1, (0.9, 1.0), (0.5, 2.0), g)
    assert (w, h) == (2, 1) and left == 49 and top == 0


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"image_size": 0}, ValueError, "image_size"),
        ({"image_size": True}, TypeError, "image_size"),
        ({"image_size": (3, 4, 5)}, TypeError, "image_size"),
        ({"image_size": 8.0}, TypeError, "image_size"),
        ({"is_train": "yes"}, TypeError, "is_train"),
        ({"resize_mode": "crop"}, ValueError, "resize_mode"),
        ({"interpolation": "cubic"}, ValueError, "interpolation"),
        ({"mean": (0.5, 0.5)}, ValueError, "mean"),
        ({"std": (0.5, 0.0, 0.5)}, ValueError, "std"),
        ({"std": "abc"}, TypeError, "std"),
        ({"scale": (0.5, 2.0)}, ValueError, "scale"),
        ({"scale": (0.0, 1.0)}, ValueError, "scale"),
        ({"ratio": (2.0, 1.0)}, ValueError, "ratio"),
        ({"ratio": (math.nan, 1.0)}, ValueError, "ratio"),
        ({"fill": (0, 0, 300)}, ValueError, "fill"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    args = {"image_size": 8, "is_train": False, **kwargs}
    with pytest.raises(exc, match=words):
        image_transform(args.pop("image_size"), **args)


def test_bad_call_inputs():
    tf = image_transform(8, is_train=True)
    with pytest.raises(TypeError, match="image"):
        tf(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="generator"):
        tf(Image.new("RGB", (8, 8)), generator=0)
    assert "224" in repr(image_transform(224, is_train=False))
