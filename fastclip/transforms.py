"""Image preprocessing on PIL + torch: the train and eval transforms of CLIP/open_clip.

    tf = image_transform(224, is_train=False)                   # resize shorter side, centre crop
    x = tf(Image.open("cat.jpg"))                               # (3, 224, 224) float32, normalised
    tf = image_transform(224, is_train=True, scale=(0.9, 1.0))  # random resized crop
    x = tf(img, generator=torch.Generator().manual_seed(7))     # reproducible crop

Meanings follow open_clip's ``image_transform``:

- train: a random resized crop (area fraction drawn from ``scale``, aspect ratio log-uniform in
  ``ratio``, ten tries, then the centre crop that fits ``ratio``), resized to ``image_size``;
- eval, ``resize_mode="shortest"``: shorter side resized to ``image_size`` then a centre crop;
  ``"squash"``: resized to exactly ``image_size`` (aspect ratio not kept); ``"longest"``: longer
  side resized to ``image_size``, the rest padded with ``fill``;
- both: conversion to RGB, ``[0, 255] -> [0, 1]``, ``(x - mean) / std`` per channel.

Any PIL mode is accepted (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, LAB, HSV, I, I;16*, F) and any
size down to 1×1. Transparency is dropped (the colour under it is kept, as open_clip does);
16-bit images (``I;16*``; ``I`` when a value exceeds 255, as 16-bit PNGs may open) are scaled by
1/257 to 8 bits.

torchvision is not used (it does not import with the CPU torch of this project); the random draws
use torch's generator so that a sample's crop is a pure function of the generator's seed.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def _size_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, bool):
        raise TypeError(f"image_size: expected an int or a (height, width) pair, got {image_size!r}")
    if isinstance(image_size, numbers.Integral):
        image_size = (int(image_size), int(image_size))
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in image_size)
    ):
        raise TypeError(f"image_size: expected an int or a (height, width) pair of ints, got {image_size!r}")
    if min(image_size) < 1:
        raise ValueError(f"image_size: expected sizes >= 1, got {tuple(image_size)}")
    return int(image_size[0]), int(image_size[1])


def _triple(name: str, value) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected 3 numbers (one per RGB channel), got {value!r}") from None
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name}: expected 3 finite numbers (one per RGB channel), got {value!r}")
    return out


def _range(name: str, value, low_ok) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a (min, max) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not low_ok(lo) or lo > hi:
        raise ValueError(f"{name}: expected 0 < min <= max (finite), got {value!r}")
    return lo, hi


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> an 8-bit RGB image (alpha dropped, 16-bit scaled to 8 bits)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        if mode != "I" or arr.max(initial=0) > 255:  # 16-bit range; an "I" image within 0..255 is 8-bit
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # palette transparency: Pillow warns unless converted this way
    elif mode == "HSV":
        return _hsv_to_rgb(image)
    return image.convert("RGB")


def _hsv_to_rgb(image: Image.Image) -> Image.Image:
    # Pillow converts to HSV but not back; do it on the arrays.
    hsv = np.asarray(image, dtype=np.float64) / 255.0
    h, s, v = hsv[..., 0] * 6.0, hsv[..., 1], hsv[..., 2]
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros(hsv.shape, dtype=np.float64)
    for k, (r, g, b) in enumerate(choices):
        m = i == k
        rgb[m] = np.stack([r[m], g[m], b[m]], axis=-1)
    return Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), mode="RGB")


def random_resized_crop_box(width: int, height: int, scale, ratio, generator=None):
    """(left, top, crop_w, crop_h) of a random resized crop, drawn as torchvision's RandomResizedCrop
    draws it (ten tries, then the largest centre crop whose aspect ratio lies in ``ratio``)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, max(1, int(round(width / ratio[0])))
    elif in_ratio > ratio[1]:
        w, h = max(1, int(round(height * ratio[1]))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageTransform:
    """A PIL image -> (3, H, W) float32 tensor; see :func:`image_transform`.

    ``__call__(image, generator=None)``: ``generator`` (a ``torch.Generator``) drives the random crop
    of the train transform; without it the global torch RNG is used. The eval transform is
    deterministic and ignores it."""

    def __init__(self, size, is_train, mean, std, resize_mode, interpolation, scale, ratio, fill):
        self.size, self.is_train, self.resize_mode = size, is_train, resize_mode
        self.interpolation, self.scale, self.ratio, self.fill = interpolation, scale, ratio, fill
        self.mean, self.std = mean, std
        self._resample = INTERPOLATIONS[interpolation]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        h, w = self.size
        what = (
            f"random_resized_crop(scale={self.scale}, ratio={self.ratio})"
            if self.is_train
            else self.resize_mode
        )
        return (
            f"ImageTransform(size=({h}, {w}), {what}, interpolation={self.interpolation!r}, "
            f"mean={self.mean}, std={self.std})"
        )

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image: expected a PIL.Image.Image, got {type(image).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image: expected a non-empty image, got size {image.size}")
        img = to_rgb(image)
        img = self._geometry(img, generator)
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W, 3)
        x = arr.permute(2, 0, 1).to(torch.float32).div_(255.0)
        return x.sub_(self._mean).div_(self._std).contiguous()

    def _geometry(self, img: Image.Image, generator) -> Image.Image:
        th, tw = self.size
        w, h = img.size
        if self.is_train:
            left, top, cw, ch = random_resized_crop_box(w, h, self.scale, self.ratio, generator)
            return img.crop((left, top, left + cw, top + ch)).resize((tw, th), self._resample)
        if self.resize_mode == "squash":
            return img.resize((tw, th), self._resample)
        if self.resize_mode == "shortest":
            if th == tw:  # torchvision Resize(int): shorter side to size, the other floored
                if w <= h:
                    nw, nh = th, int(th * h / w)
                else:
                    nw, nh = int(th * w / h), th
            else:  # keep the ratio, cover the target box
                r = min(h / th, w / tw)
                nw, nh = max(tw, round(w / r)), max(th, round(h / r))
        else:  # longest: fit inside the target box
            r = max(h / th, w / tw)
            nw, nh = max(1, round(w / r)), max(1, round(h / r))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), self._resample)
        return _center_crop_or_pad(img, th, tw, self.fill)


def _center_crop_or_pad(img: Image.Image, th: int, tw: int, fill) -> Image.Image:
    w, h = img.size
    if w < tw or h < th:
        canvas = Image.new("RGB", (max(w, tw), max(h, th)), fill)
        canvas.paste(img, ((max(w, tw) - w) // 2, (max(h, th) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img.crop((left, top, left + tw, top + th))


def image_transform(
    image_size,
    *,
    is_train: bool,
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    scale=(0.9, 1.0),
    ratio=(3 / 4, 4 / 3),
    fill=(0, 0, 0),
) -> ImageTransform:
    """The train or eval preprocessing of CLIP/open_clip as a callable ``(PIL image) -> (3, H, W)``.

    Args:
        image_size: int (square) or (height, width).
        is_train: random resized crop (``scale``: area fraction range, ``ratio``: aspect range)
            when true; otherwise the deterministic ``resize_mode`` ("shortest", "longest", "squash").
        mean, std: per-channel normalisation (``OPENAI_CLIP_*`` or ``SIGLIP_*``).
        interpolation: "bicubic", "bilinear", "nearest", "lanczos" or "box".
        fill: RGB 0-255 of the padding of ``resize_mode="longest"``.

    Equivalent torchvision (eval, "shortest"): ``Compose([Resize(s, BICUBIC), CenterCrop(s),
    ToTensor(), Normalize(mean, std)])`` after converting to RGB.
    """
    size = _size_hw(image_size)
    if not isinstance(is_train, bool):
        raise TypeError(f"is_train: expected a bool, got {is_train!r}")
    mean, std = _triple("mean", mean), _triple("std", std)
    if min(std) <= 0:
        raise ValueError(f"std: expected positive values, got {std}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode: expected one of {RESIZE_MODES}, got {resize_mode!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: expected one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
    scale = _range("scale", scale, lambda lo: 0 < lo <= 1)
    if scale[1] > 1:
        raise ValueError(f"scale: expected 0 < min <= max <= 1, got {scale}")
    ratio = _range("ratio", ratio, lambda lo: lo > 0)
    try:
        fill = tuple(int(v) for v in fill)
    except (TypeError, ValueError):
        raise TypeError(f"fill: expected 3 ints in [0, 255], got {fill!r}") from None
    if len(fill) != 3 or not all(0 <= v <= 255 for v in fill):
        raise ValueError(f"fill: expected 3 ints in [0, 255], got {fill!r}")
    return ImageTransform(size, is_train, mean, std, resize_mode, interpolation, scale, ratio, fill)
