"""CSV/TSV image–caption tables: reading (with path confinement), the map-style dataset the loader
workers decode from, and evaluation sets.

Image paths in a table are relative to the table's directory; absolute paths are allowed. With
``root`` set (``data.root``), relative paths are taken from ``root`` instead and every image path,
after resolving ``..`` and symbolic links, must lie inside ``root`` — a table from elsewhere then
cannot make the trainer open ``/etc/passwd`` or another user's files.
"""

from __future__ import annotations

import csv
import os

import torch

from fastclip.data.common import (
    DataError,
    SkipLog,
    _decode_errors,
    decode_image,
    draft_size,
    sample_generator,
)
from fastclip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_transform

TEMPLATES = ("a photo of a {}", "a {}", "an image of a {}")
_DECODE_ERRORS = _decode_errors()


def _confine(path: str, row: int, table: str, root: str) -> str:
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        raise DataError(f"{table}: row {row}: image {path!r} lies outside data.root {root!r}")
    return real


def read_table(path, image_key, caption_key, label_key=None, delimiter=None, root=None):
    """Rows of a CSV/TSV file -> (image paths, captions, labels or None).

    Row numbers in messages count the header as row 1, as a spreadsheet shows them."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise DataError(f"data file not found: {path!r}")
    path = os.fspath(path)
    if delimiter is None:
        delimiter = "\t" if path.endswith(".tsv") else ","
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            for key, what in ((image_key, "data.image_key"), (caption_key, "data.caption_key")):
                if key not in header:
                    raise DataError(f"{path}: expected a column {key!r} ({what}), found columns {header}")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: expected UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV/TSV file ({exc})") from None
    if not rows:
        raise DataError(f"{path}: expected at least one row, found none")
    if root is not None:
        if not os.path.isdir(root):
            raise DataError(f"data.root: expected a directory, got {root!r}")
        base = root = os.path.realpath(root)
    else:
        base = os.path.dirname(os.path.abspath(path))
    images, captions = [], []
    for i, r in enumerate(rows, start=2):
        image, caption = r.get(image_key), r.get(caption_key)
        if not image or not image.strip():
            raise DataError(f"{path}: row {i}: empty {image_key!r} (image path)")
        if caption is None or not caption.strip():
            raise DataError(f"{path}: row {i}: empty {caption_key!r} (caption)")
        full = os.path.join(base, image.strip())
        if root is not None:
            full = _confine(full, i, path, root)
        images.append(full)
        captions.append(caption.strip())
    missing = [p for p in images if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{path}: {len(missing)} image file(s) not found, e.g. {missing[0]!r}")
    labels = None
    if label_key and label_key in header:
        try:
            labels = torch.tensor([int(r[label_key]) for r in rows])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: column {label_key!r} must hold class indices: {exc}") from None
    return images, captions, labels


def read_extra_columns(path, negative_keys=None, id_key=None, delimiter=None):
    """The hard-negative captions and ids of a CSV/TSV file's rows (the rows :func:`read_table` reads, in
    its order): (negatives: one list [negative_1, ..., negative_K] per row, or None; ids: int64 (rows,)
    or None). A missing column, an empty negative caption or an id that is not an integer is a
    :class:`DataError` naming the file, the row (the header is row 1) and the column."""
    if not negative_keys and id_key is None:
        return None, None
    path = os.fspath(path)
    if delimiter is None:
        delimiter = "\t" if path.endswith(".tsv") else ","
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            wanted = [(k, "data.negative_keys") for k in negative_keys or []]
            wanted += [(id_key, "data.id_key")] if id_key is not None else []
            for key, what in wanted:
                if key not in header:
                    raise DataError(f"{path}: expected a column {key!r} ({what}), found columns {header}")
            rows = list(reader)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: expected UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a readable CSV/TSV file ({exc})") from None
    negatives = [] if negative_keys else None
    ids = [] if id_key is not None else None
    for i, r in enumerate(rows, start=2):
        if negative_keys:
            row = []
            for key in negative_keys:
                text = r.get(key)
                if text is None or not text.strip():
                    raise DataError(
                        f"{path}: row {i}: empty {key!r} (hard-negative caption, data.negative_keys)"
                    )
                row.append(text.strip())
            negatives.append(row)
        if id_key is not None:
            value = (r.get(id_key) or "").strip()
            try:
                ids.append(int(value))
            except ValueError:
                raise DataError(
                    f"{path}: row {i}: column {id_key!r} (data.id_key) expected an integer id, got {value[:200]!r}"
                ) from None
            if not -(2**63) <= ids[-1] < 2**63:
                raise DataError(
                    f"{path}: row {i}: column {id_key!r} (data.id_key): id {value[:200]} exceeds int64"
                )
    return negatives, (torch.tensor(ids, dtype=torch.int64) if ids is not None else None)


class TableDataset(torch.utils.data.Dataset):
    """Row ``(i, epoch)`` -> (image tensor, caption, skipped[, id]). An unreadable image is replaced by
    the next readable row (deterministically, so a resumed run reads the same), and counted. With
    ``negatives`` (one list of K captions per row) the caption is a list [caption, *negatives]; with
    ``ids`` (int64 (rows,)) the row's id comes fourth."""

    MAX_SKIP = 64

    def __init__(self, images, captions, transform, seed=0, fast_decode=True, *, negatives=None, ids=None):
        self.images, self.captions, self.transform, self.seed = images, captions, transform, seed
        self.draft = draft_size(transform) if fast_decode else None
        self.negatives, self.ids = negatives, ids

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        row, epoch = index if isinstance(index, tuple) else (index, 0)
        skips = SkipLog()
        for k in range(self.MAX_SKIP):
            i = (row + k) % len(self.images)
            try:
                img = decode_image(self.images[i], self.draft)
            except _DECODE_ERRORS as exc:
                skips.add(self.images[i], f"unreadable image ({type(exc).__name__}: {exc})")
                continue
            x = self.transform(img, generator=sample_generator(self.seed, "aug", epoch, i))
            text = self.captions[i] if self.negatives is None else [self.captions[i], *self.negatives[i]]
            if self.ids is not None:
                return x, text, skips, int(self.ids[i])
            return x, text, skips
        raise DataError(
            f"{self.MAX_SKIP} consecutive unreadable images from {self.images[row]!r} on; check the data"
        )


def collate_rows(items, tokenizer=None):
    """Rows of :class:`TableDataset` -> {images, texts, skipped, reasons[, ids]}. Captions with hard
    negatives (lists of 1 + K) are tokenized together into (b, 1 + K, L)."""
    images = torch.stack([it[0] for it in items])
    captions = [it[1] for it in items]
    skipped = sum(it[2].count for it in items)
    reasons = [r for it in items for r in it[2].reasons]
    if tokenizer is None:
        texts = captions
    elif captions and isinstance(captions[0], list):
        group = len(captions[0])
        tokens = tokenizer([t for row in captions for t in row])
        texts = tokens.view(len(captions), group, *tokens.shape[1:])
    else:
        texts = tokenizer(captions)
    out = {"images": images, "texts": texts, "skipped": skipped, "reasons": reasons}
    if items and len(items[0]) > 3:
        out["ids"] = torch.tensor([it[3] for it in items], dtype=torch.int64)
    return out


class EvalSet:
    """Images, captions and (optionally) class labels with class names and prompt templates."""

    def __init__(self, name, images, captions, labels=None, classnames=None, templates=None):
        self.name, self.images, self.captions = name, images, captions
        self.labels, self.classnames, self.templates = labels, classnames, templates

    def __len__(self):
        return len(self.captions)


def table_eval_set(
    path, cfg, image_size, classnames, templates, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
    *, resize_mode="shortest", interpolation="bicubic",
):  # fmt: skip
    """A CSV/TSV evaluation set through the eval transform (``data.resize_mode``, else ``resize_mode``:
    the model's); unreadable images are errors here."""
    mode = getattr(cfg, "resize_mode", None) or resize_mode
    transform = image_transform(
        image_size, is_train=False, mean=mean, std=std, resize_mode=mode, interpolation=interpolation
    )
    paths, captions, labels = read_table(
        path, cfg.image_key, cfg.caption_key, cfg.label_key, cfg.delimiter, getattr(cfg, "root", None)
    )
    tensors = []
    for p in paths:
        try:
            tensors.append(transform(decode_image(p)))
        except _DECODE_ERRORS as exc:
            raise DataError(f"{path}: unreadable image {p!r} ({type(exc).__name__}: {exc})") from None
    images = torch.stack(tensors)
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
