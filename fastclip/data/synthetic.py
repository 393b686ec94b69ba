"""The built-in synthetic dataset: one coloured shape per image (colour, shape, size, position, all
random) and a caption from its attributes.

Some colour–shape combinations never occur in training: zero-shot classification over all
combinations, on images of the held-out combinations only, measures whether the model composed
"colour" and "shape" rather than memorising pairs. Batch ``k`` of a split is a pure function of
(seed, split, k), so resuming at any position is exact and O(1).
"""

from __future__ import annotations

import random

import torch

from fastclip.data.common import DataError
from fastclip.data.table import EvalSet
from fastclip.transforms import OPENAI_CLIP_MEAN as MEAN
from fastclip.transforms import OPENAI_CLIP_STD as STD

COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.3, 0.95),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.8),
    "orange": (1.0, 0.55, 0.05),
    "cyan": (0.1, 0.85, 0.9),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
SIZES = ("small", "large")
POSITIONS = {  # (cx, cy) in [0, 1]
    "left": (0.3, 0.5),
    "right": (0.7, 0.5),
    "top": (0.5, 0.3),
    "bottom": (0.5, 0.7),
    "center": (0.5, 0.5),
}
CAPTIONS = (
    "a {size} {color} {shape} at the {position}",
    "a photo of a {color} {shape}",
    "a {color} {shape} on the {position}",
    "the {shape} is {color}",
    "a {size} {shape} , {color}",
    "a {color} {shape}",
    "an image of a {size} {color} {shape}",
    "a {color} shape",
    "a {size} {shape}",
    "a {shape} at the {position}",
)
TEMPLATES = ("a photo of a {}", "a {}", "an image of a {}")


class SyntheticShapes:
    """Procedural image–caption pairs; batch ``k`` of a split is a pure function of (seed, split, k).

    ``held_out``: colour–shape pairs that never appear in the "train" split; the "heldout" split
    draws only those, the "seen" split only the others. Classes are all colour–shape pairs
    (``classnames``: "red circle", ...), ``labels`` index into them.
    """

    def __init__(self, image_size: int, seed: int = 0, mean=MEAN, std=STD):
        if not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"image_size: expected an int >= 8, got {image_size!r}")
        self.image_size = image_size
        self.seed = int(seed)
        self.colors = list(COLORS)
        self.shapes = list(SHAPES)
        nc, ns = len(self.colors), len(self.shapes)
        # One held-out shape per colour, spread so every shape keeps most of its colours.
        self.held_out = {(c, (c * 5) % ns) for c in range(nc)}
        pairs = [(c, s) for c in range(nc) for s in range(ns)]
        self._pairs = {
            "train": [p for p in pairs if p not in self.held_out],
            "heldout": sorted(self.held_out),
            "seen": [p for p in pairs if p not in self.held_out],
        }
        self.classnames = [f"{c} {s}" for c in self.colors for s in self.shapes]
        self.templates = list(TEMPLATES)
        self._rgb = torch.tensor([COLORS[c] for c in self.colors])
        self._mean = torch.tensor(mean).view(1, 3, 1, 1)
        self._std = torch.tensor(std).view(1, 3, 1, 1)
        lin = (torch.arange(image_size, dtype=torch.float32) + 0.5) / image_size
        self._yy, self._xx = torch.meshgrid(lin, lin, indexing="ij")

    def vocabulary(self) -> list[str]:
        words = set()
        for text in (*CAPTIONS, *TEMPLATES):
            words.update(text.replace("{}", "").split())
        for group in (self.colors, self.shapes, SIZES, POSITIONS):
            words.update(group)
        return sorted(w for w in words if "{" not in w)

    def batch(self, split: str, index: int, size: int):
        """Batch ``index`` of ``split``: images (size, 3, H, W) normalised, captions, labels (size,)."""
        images, captions, labels, _ = self._draw(split, index, size)
        return images, captions, labels

    def batch_with_negatives(self, split: str, index: int, size: int, negatives: int):
        """:meth:`batch` (the same images and captions) plus ``negatives`` hard-negative captions per
        sample: the caption's template with its colour or its shape changed (whichever the template
        names; one of them at random when it names both) to another pair of ``split`` (so the held-out
        pairs never appear in training text), distinct from each other where possible. Returns images,
        captions as lists [caption, negative_1, ..., negative_K], and ids (size, 1 + K) int64: the
        colour-shape class of the caption (the sample's label) and of each negative. Drawn from their own
        generator, a pure function of (seed, split, index)."""
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
            raise ValueError(f"negatives: expected an int >= 0, got {negatives!r}")
        images, captions, labels, attrs = self._draw(split, index, size)
        code = {"train": 0, "heldout": 1, "seen": 2}[split]
        rng = random.Random(f"fastclip-synthetic-negatives-{self.seed}-{code}-{int(index)}")
        allowed = set(self._pairs[split])
        ns, names = len(self.shapes), list(POSITIONS)
        texts, ids = [], []
        for caption, (k, c, s, b, p) in zip(captions, attrs):
            template = CAPTIONS[k]
            fields = [f for f in ("color", "shape") if "{" + f + "}" in template]
            options = {}
            for f in fields:
                alt = (
                    [(c2, s) for c2 in range(len(self.colors)) if c2 != c]
                    if f == "color"
                    else [(c, s2) for s2 in range(ns) if s2 != s]
                )
                options[f] = [pair for pair in alt if pair in allowed]
            row, row_ids, used = [caption], [c * ns + s], set()
            for _ in range(negatives):
                f = rng.choice([f for f in fields if options[f]])
                fresh = [pair for pair in options[f] if pair not in used] or options[f]
                c2, s2 = rng.choice(fresh)
                used.add((c2, s2))
                row.append(
                    template.format(
                        color=self.colors[c2], shape=self.shapes[s2], size=SIZES[b], position=names[p]
                    )
                )
                row_ids.append(c2 * ns + s2)
            texts.append(row)
            ids.append(row_ids)
        return images, texts, torch.tensor(ids, dtype=torch.int64).view(size, 1 + negatives)

    def _draw(self, split: str, index: int, size: int):
        if split not in self._pairs:
            raise ValueError(f"split: expected one of {list(self._pairs)}, got {split!r}")
        code = {"train": 0, "heldout": 1, "seen": 2}[split]
        g = torch.Generator().manual_seed(((self.seed * 3 + code) << 32) + int(index))
        pairs = torch.tensor(self._pairs[split])
        pick = pairs[torch.randint(len(pairs), (size,), generator=g)]
        color, shape = pick[:, 0], pick[:, 1]
        big = torch.randint(2, (size,), generator=g)
        pos = torch.randint(len(POSITIONS), (size,), generator=g)
        caption_kind = torch.randint(len(CAPTIONS), (size,), generator=g)
        images = self._render(color, shape, big, pos, g)
        names = list(POSITIONS)
        attrs = list(zip(caption_kind.tolist(), color.tolist(), shape.tolist(), big.tolist(), pos.tolist()))
        captions = [
            CAPTIONS[k].format(color=self.colors[c], shape=self.shapes[s], size=SIZES[b], position=names[p])
            for k, c, s, b, p in attrs
        ]
        labels = color * len(self.shapes) + shape
        return images, captions, labels, attrs

    def _render(self, color, shape, big, pos, g):
        n = color.shape[0]
        centers = torch.tensor(list(POSITIONS.values()))[pos]  # (n, 2)
        centers = centers + (torch.rand(n, 2, generator=g) - 0.5) * 0.12
        radius = torch.where(big.bool(), 0.24, 0.14) * (0.85 + 0.3 * torch.rand(n, generator=g))
        dx = (self._xx - centers[:, 0, None, None]) / radius[:, None, None]  # (n, H, W) in radii
        dy = (self._yy - centers[:, 1, None, None]) / radius[:, None, None]
        r = torch.sqrt(dx * dx + dy * dy)
        masks = torch.stack(
            [
                r < 1.0,  # circle
                torch.maximum(dx.abs(), dy.abs()) < 0.85,  # square
                (dy < 0.8) & (dx.abs() < (dy + 1.0) * 0.55),  # triangle, apex up
                ((dx.abs() < 0.3) & (dy.abs() < 1.0)) | ((dy.abs() < 0.3) & (dx.abs() < 1.0)),  # cross
                (r < 1.0) & (r > 0.6),  # ring
                (dx.abs() < 1.0) & (dy.abs() < 0.35),  # bar
            ],
            dim=1,
        )  # (n, S, H, W)
        mask = masks[torch.arange(n), shape].unsqueeze(1).float()  # (n, 1, H, W)
        rgb = (self._rgb[color] + 0.08 * torch.randn(n, 3, generator=g)).clamp(0, 1)  # colour jitter
        background = 0.1 + 0.25 * torch.rand(n, 1, 1, 1, generator=g)
        img = background + mask * (rgb[:, :, None, None] - background)
        img = (img + 0.04 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        return (img - self._mean) / self._std


class SyntheticStream:
    """Per-rank stream over the synthetic "train" split; the global batch at step k is identical for
    any world size, and each rank takes its slice."""

    def __init__(
        self, dataset: SyntheticShapes, global_batch: int, rank: int, world_size: int,
        *, negatives: int = 0, ids: bool = False,
    ):  # fmt: skip
        self.dataset, self.global_batch, self.rank, self.world_size = dataset, global_batch, rank, world_size
        self.local = global_batch // world_size
        self.negatives, self.ids = negatives, bool(ids)
        self.position = 0  # batches consumed

    def next_batch(self):
        """(images, captions) of this rank; with ``negatives`` K > 0 each caption is a list
        [caption, K hard negatives]; with ``ids``, a third item: the (b, 1 + K) int64 class ids of the
        captions (column 0: the sample's, then its negatives')."""
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        if self.negatives or self.ids:
            images, captions, ids = self.dataset.batch_with_negatives(
                "train", self.position, self.global_batch, self.negatives
            )
        else:
            images, captions, _ = self.dataset.batch("train", self.position, self.global_batch)
        self.position += 1
        if not self.negatives:
            captions = [row[0] for row in captions] if self.ids else captions
        if self.ids:
            return images[lo:hi], captions[lo:hi], ids[lo:hi]
        return images[lo:hi], captions[lo:hi]

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "synthetic")
        self.position = int(state["position"])


def synthetic_eval_sets(dataset: SyntheticShapes, size: int) -> list[EvalSet]:
    """Two sets: "heldout" (only the held-out colour–shape pairs) and "seen" (fresh images of the others)."""
    out = []
    for split in ("heldout", "seen"):
        images, captions, labels = dataset.batch(split, 0, size)
        out.append(EvalSet(split, images, captions, labels, dataset.classnames, dataset.templates))
    return out


def _check_state(state, kind) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind or not isinstance(state.get("position"), int):
        raise DataError(f"data state: expected {{'kind': {kind!r}, 'position': int}}, got {state!r}")
