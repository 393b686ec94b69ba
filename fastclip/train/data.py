"""Training data: built-in synthetic shapes, webdataset tar shards, CSV/TSV files.

Every training source is a per-rank stream with ``next_batch() -> (images (b, 3, H, W) float32,
captions list[str])`` and a ``state_dict()`` (its position) that a checkpoint stores, so a resumed
run reads exactly the batches the uninterrupted run would have read.

The synthetic dataset draws one coloured shape per image (colour, shape, size, position, all
random) and a caption from its attributes. Some colour–shape combinations never occur in
training: zero-shot classification over all combinations, on images of the held-out
combinations only, measures whether the model composed "colour" and "shape" rather than
memorising pairs.
"""

from __future__ import annotations

import csv
import glob
import os
import random

import numpy as np
import torch

# CLIP's normalisation; models may carry their own (config.vision.mean/std).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class DataError(ValueError):
    """Training or evaluation data is missing or malformed."""


# ---- synthetic shapes -----------------------------------------------------------------------

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
        captions = [
            CAPTIONS[int(k)].format(
                color=self.colors[int(c)],
                shape=self.shapes[int(s)],
                size=SIZES[int(b)],
                position=names[int(p)],
            )
            for k, c, s, b, p in zip(caption_kind, color, shape, big, pos)
        ]
        labels = color * len(self.shapes) + shape
        return images, captions, labels

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

    def __init__(self, dataset: SyntheticShapes, global_batch: int, rank: int, world_size: int):
        self.dataset, self.global_batch, self.rank, self.world_size = dataset, global_batch, rank, world_size
        self.local = global_batch // world_size
        self.position = 0  # batches consumed

    def next_batch(self):
        images, captions, _ = self.dataset.batch("train", self.position, self.global_batch)
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        self.position += 1
        return images[lo:hi], captions[lo:hi]

    def state_dict(self) -> dict:
        return {"kind": "synthetic", "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "synthetic")
        self.position = int(state["position"])


# ---- image files ----------------------------------------------------------------------------


def load_image(source, image_size: int, mean=MEAN, std=STD) -> torch.Tensor:
    """A path, bytes or PIL image -> (3, S, S) float32: shorter side resized to S, centre crop, normalised."""
    from PIL import Image

    if isinstance(source, (bytes, bytearray)):
        import io

        source = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        source = Image.open(source)
    img = source.convert("RGB")
    w, h = img.size
    scale = image_size / min(w, h)
    img = img.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - image_size) // 2, (h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def read_table(path: str, image_key: str, caption_key: str, label_key: str | None, delimiter=None):
    """Rows of a CSV/TSV file -> (image paths, captions, labels or None). Paths are relative to the file."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path!r}")
    if delimiter is None:
        delimiter = "\t" if path.endswith(".tsv") else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        for key, what in ((image_key, "data.image_key"), (caption_key, "data.caption_key")):
            if key not in header:
                raise DataError(f"{path}: expected a column {key!r} ({what}), found columns {header}")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path}: expected at least one row, found none")
    base = os.path.dirname(os.path.abspath(path))
    images = [os.path.join(base, r[image_key]) for r in rows]
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{path}: {len(missing)} image file(s) not found, e.g. {missing[0]!r}")
    captions = [r[caption_key] for r in rows]
    labels = None
    if label_key and label_key in header:
        try:
            labels = torch.tensor([int(r[label_key]) for r in rows])
        except ValueError as exc:
            raise DataError(f"{path}: column {label_key!r} must hold class indices: {exc}") from None
    return images, captions, labels


class _TableDataset(torch.utils.data.Dataset):
    def __init__(self, images, captions, image_size, mean, std):
        self.images, self.captions, self.image_size, self.mean, self.std = (
            images,
            captions,
            image_size,
            mean,
            std,
        )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return load_image(self.images[i], self.image_size, self.mean, self.std), self.captions[i]


def _collate(items):
    return torch.stack([x for x, _ in items]), [c for _, c in items]


class _PositionSampler(torch.utils.data.Sampler):
    """Batches of indices for one rank, from a global position: epoch e is a permutation seeded by
    (seed, e); global batch k of the epoch is perm[k*G:(k+1)*G] and each rank takes its slice."""

    def __init__(self, n, global_batch, rank, world_size, seed, start):
        self.n, self.global_batch, self.rank, self.world_size, self.seed = (
            n,
            global_batch,
            rank,
            world_size,
            seed,
        )
        self.start = start
        self.per_epoch = n // global_batch

    def __iter__(self):
        local = self.global_batch // self.world_size
        pos = self.start
        while True:
            epoch, k = divmod(pos, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            while k < self.per_epoch:
                lo = k * self.global_batch + self.rank * local
                yield perm[lo : lo + local].tolist()
                k += 1
                pos += 1


class CsvStream:
    """Per-rank stream over a CSV/TSV of (image path, caption); deterministic order, resumable."""

    def __init__(self, path, cfg, image_size, global_batch, rank, world_size, seed, mean=MEAN, std=STD):
        images, captions, _ = read_table(path, cfg.image_key, cfg.caption_key, None, cfg.delimiter)
        if len(images) < global_batch:
            raise DataError(f"{path}: {len(images)} rows is fewer than one global batch ({global_batch})")
        self.dataset = _TableDataset(images, captions, image_size, mean, std)
        self.global_batch, self.rank, self.world_size, self.seed = global_batch, rank, world_size, seed
        self.workers = cfg.workers
        self.position = 0
        self._iter = None

    def _loader(self):
        sampler = _PositionSampler(
            len(self.dataset), self.global_batch, self.rank, self.world_size, self.seed, self.position
        )
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.workers, collate_fn=_collate
        )
        return iter(loader)

    def next_batch(self):
        if self._iter is None:
            self._iter = self._loader()
        batch = next(self._iter)
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"kind": "csv", "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "csv")
        self.position = int(state["position"])
        self._iter = None


def expand_shards(spec: str) -> list[str]:
    """ "a/{000..009}.tar" brace ranges, globs and "::"-separated lists -> existing files (sorted)."""
    import braceexpand

    out = []
    for part in str(spec).split("::"):
        for item in braceexpand.braceexpand(part):
            matches = sorted(glob.glob(item)) if any(ch in item for ch in "*?[") else [item]
            out.extend(matches)
    missing = [p for p in out if not os.path.isfile(p)]
    if not out or missing:
        raise DataError(f"data shards not found: {spec!r}" + (f" (e.g. {missing[0]!r})" if missing else ""))
    return out


class WebDatasetStream:
    """Per-rank stream over webdataset tar shards (``image`` + ``.txt`` per sample).

    Shards are split between ranks (rank r reads shards r, r+W, ...); each epoch shuffles the shard
    order with (seed, epoch) and samples through a seeded buffer. The position is the number of
    samples this rank consumed; resuming replays the stream up to it (reading, not decoding)."""

    def __init__(self, spec, cfg, image_size, global_batch, rank, world_size, seed, mean=MEAN, std=STD):
        shards = expand_shards(spec)
        if len(shards) < world_size:
            raise DataError(
                f"data.train: {len(shards)} shard(s) cannot be split between {world_size} ranks; "
                "write at least one shard per rank"
            )
        self.shards = shards[rank::world_size]
        self.cfg, self.image_size, self.mean, self.std = cfg, image_size, mean, std
        self.local = global_batch // world_size
        self.seed, self.rank = seed, rank
        self.position = 0
        self._iter = None

    def _samples(self, skip: int):
        import webdataset as wds

        image_ext = self.cfg.image_key if self.cfg.image_key != "image" else "jpg;jpeg;png;webp"
        caption_ext = self.cfg.caption_key if self.cfg.caption_key != "caption" else "txt"
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(self.seed * 7919 + epoch * 31 + self.rank).shuffle(order)
            ds = wds.WebDataset(order, shardshuffle=False, nodesplitter=None, empty_check=False)
            if self.cfg.shuffle_buffer:
                ds = ds.shuffle(
                    self.cfg.shuffle_buffer, rng=random.Random(self.seed + epoch * 1000 + self.rank)
                )
            ds = ds.to_tuple(image_ext, caption_ext)
            count = 0
            for image, caption in ds:
                count += 1
                if skip:
                    skip -= 1
                    continue
                if isinstance(caption, bytes):
                    caption = caption.decode("utf-8")
                yield load_image(image, self.image_size, self.mean, self.std), caption.strip()
            if count == 0:
                raise DataError(
                    f"webdataset shards {self.shards[:2]}... hold no ({image_ext}, {caption_ext}) samples"
                )
            epoch += 1

    def next_batch(self):
        if self._iter is None:
            self._iter = self._samples(self.position)
        items = [next(self._iter) for _ in range(self.local)]
        self.position += self.local
        return _collate(items)

    def state_dict(self) -> dict:
        return {"kind": "webdataset", "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "webdataset")
        self.position = int(state["position"])
        self._iter = None


def _check_state(state, kind) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind or not isinstance(state.get("position"), int):
        raise DataError(f"data state: expected {{'kind': {kind!r}, 'position': int}}, got {state!r}")


def check_paths(dc, ec=None) -> None:
    """Fail early (before any process group exists) when a configured data path does not exist."""
    if dc.kind == "csv":
        for key in ("train", "eval"):
            path = getattr(dc, key)
            if path and not os.path.isfile(path):
                raise DataError(f"data.{key}: data file not found: {path!r}")
    elif dc.kind == "webdataset":
        expand_shards(dc.train)
        if dc.eval and not os.path.isfile(dc.eval):
            raise DataError(
                f"data.eval: data file not found: {dc.eval!r} (evaluation data is a CSV/TSV file)"
            )
    if ec is not None and isinstance(ec.classnames, str) and not os.path.isfile(ec.classnames):
        raise DataError(f"eval.classnames: file not found: {ec.classnames!r}")


# ---- evaluation sets ------------------------------------------------------------------------


class EvalSet:
    """Images, captions and (optionally) class labels with class names and prompt templates."""

    def __init__(self, name, images, captions, labels=None, classnames=None, templates=None):
        self.name, self.images, self.captions = name, images, captions
        self.labels, self.classnames, self.templates = labels, classnames, templates

    def __len__(self):
        return len(self.captions)


def synthetic_eval_sets(dataset: SyntheticShapes, size: int) -> list[EvalSet]:
    """Two sets: "heldout" (only the held-out colour–shape pairs) and "seen" (fresh images of the others)."""
    out = []
    for split in ("heldout", "seen"):
        images, captions, labels = dataset.batch(split, 0, size)
        out.append(EvalSet(split, images, captions, labels, dataset.classnames, dataset.templates))
    return out


def table_eval_set(path, cfg, image_size, classnames, templates, mean=MEAN, std=STD) -> EvalSet:
    paths, captions, labels = read_table(path, cfg.image_key, cfg.caption_key, cfg.label_key, cfg.delimiter)
    images = torch.stack([load_image(p, image_size, mean, std) for p in paths])
    if labels is not None:
        if not classnames:
            raise DataError(
                f"{path}: has a {cfg.label_key!r} column; set eval.classnames for zero-shot evaluation"
            )
        bad = labels[(labels < 0) | (labels >= len(classnames))]
        if bad.numel():
            raise DataError(
                f"{path}: label {int(bad[0])} is outside [0, {len(classnames)}) (eval.classnames)"
            )
    return EvalSet("eval", images, captions, labels, classnames, templates or list(TEMPLATES))


def read_classnames(value) -> list[str] | None:
    if value is None or isinstance(value, list):
        return value
    if not os.path.isfile(value):
        raise DataError(f"eval.classnames: file not found: {value!r}")
    with open(value, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise DataError(f"eval.classnames: {value!r} holds no class names")
    return names
