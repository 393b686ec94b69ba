"""The trainer's view of :mod:`fastclip.data` (kept so ``fastclip.train.data`` stays importable).

Every training source is a per-rank stream with ``next_batch() -> (images, captions or token ids)``
(``(images, texts, ids)`` when the run masks duplicates by id; with hard negatives each sample's texts
are its caption and K negatives) and a JSON ``state_dict()`` that a checkpoint stores; see
:mod:`fastclip.data.streams`.
"""

from __future__ import annotations

import os

from fastclip.data import (
    CsvStream,
    DataError,
    EvalSet,
    SyntheticShapes,
    SyntheticStream,
    WebDatasetStream,
    decode_image,
    expand_shards,
    read_classnames,
    read_table,
    synthetic_eval_sets,
    table_eval_set,
)
from fastclip.data.synthetic import CAPTIONS, COLORS, POSITIONS, SHAPES, SIZES, TEMPLATES
from fastclip.transforms import OPENAI_CLIP_MEAN as MEAN
from fastclip.transforms import OPENAI_CLIP_STD as STD
from fastclip.transforms import image_transform


def load_image(source, image_size: int, mean=MEAN, std=STD):
    """A path or bytes (or PIL image) -> (3, S, S) float32 through the eval transform."""
    from PIL import Image

    img = source if isinstance(source, Image.Image) else decode_image(source)
    return image_transform(image_size, is_train=False, mean=mean, std=std)(img)


def build_data(cfg, model, tokenizer, rank: int, world: int, device=None):
    """(training stream, evaluation sets) for the run: images normalised with the model's
    ``config.vision.mean/std``, captions tokenized in the loader workers, batches pinned on CUDA."""
    dc, seed = cfg.data, cfg.train.seed
    vision = model.config.vision
    size, gb = int(vision.image_size), cfg.train.batch_size
    mean, std = tuple(getattr(vision, "mean", MEAN)), tuple(getattr(vision, "std", STD))
    if dc.kind == "synthetic":  # procedural images, trained from scratch: one fixed normalisation
        shapes = SyntheticShapes(size, seed=seed)
        mc = cfg.model
        stream = SyntheticStream(
            shapes, gb, rank, world, negatives=mc.hard_negatives, ids=mc.duplicates is not None
        )
        return stream, synthetic_eval_sets(shapes, dc.eval_size)
    pin = device is not None and getattr(device, "type", str(device)) == "cuda"
    kind = CsvStream if dc.kind == "csv" else WebDatasetStream
    view = {  # the model's preprocessing: eval resize and resampling filter
        "resize_mode": getattr(vision, "resize_mode", "shortest"),
        "interpolation": getattr(vision, "interpolation", "bicubic"),
    }
    stream = kind(
        dc.train, dc, size, gb, rank, world, seed, mean, std, tokenizer=tokenizer, pin_memory=pin, **view
    )
    sets = []
    if dc.eval:
        classnames = read_classnames(cfg.eval.classnames)
        sets.append(table_eval_set(dc.eval, dc, size, classnames, cfg.eval.templates, mean, std, **view))
    return stream, sets


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
    if getattr(dc, "root", None) is not None and not os.path.isdir(dc.root):
        raise DataError(f"data.root: expected a directory, got {dc.root!r}")
    if ec is not None and isinstance(ec.classnames, str) and not os.path.isfile(ec.classnames):
        raise DataError(f"eval.classnames: file not found: {ec.classnames!r}")


__all__ = [
    "CAPTIONS", "COLORS", "MEAN", "POSITIONS", "SHAPES", "SIZES", "STD", "TEMPLATES",
    "CsvStream", "DataError", "EvalSet", "SyntheticShapes", "SyntheticStream", "WebDatasetStream",
    "build_data", "check_paths", "expand_shards", "load_image", "read_classnames", "read_table", "synthetic_eval_sets",
    "table_eval_set",
]  # fmt: skip
