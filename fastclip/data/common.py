"""Pieces every data source shares: the error type, image decoding with skip-and-count, seeds,
worker counts and batch collation."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings

import torch


class DataError(ValueError):
    """Training or evaluation data is missing or malformed."""


# Errors that mean "this image cannot be decoded": the sample is skipped and counted.
def _decode_errors() -> tuple:
    from PIL import Image, UnidentifiedImageError

    return (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def decode_image(data, draft: int | None = None):
    """Bytes or a path -> a fully loaded PIL image. Raises the decoder's error for a corrupt image.

    ``draft``: a JPEG is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT, much faster) as long
    as both sides stay >= ``draft`` pixels; other formats are decoded at full size."""
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation/palette warnings: a corrupt image raises below
        try:
            img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
        except UnidentifiedImageError:
            raise UnidentifiedImageError("not an image in a format Pillow reads") from None
        if draft and img.format == "JPEG" and min(img.size) >= 2 * draft:
            img.draft("RGB", (draft, draft))
        img.load()
    if img.width < 1 or img.height < 1:
        raise ValueError(f"empty image ({img.width}x{img.height})")
    return img


def draft_size(transform) -> int | None:
    """The smallest shorter side that the transform's output does not lose resolution from (a JPEG may
    be decoded down to it), or None when any reduction would (resize_mode "longest")."""
    import math

    th, tw = transform.size
    if transform.is_train:
        lo, hi = transform.ratio
        smallest = math.sqrt(transform.scale[0] * min(lo, 1.0 / hi, 1.0))  # shortest crop side / image side
        return math.ceil(max(th, tw) / smallest)
    return None if transform.resize_mode == "longest" else max(th, tw)


def seed_of(*parts) -> int:
    """A 63-bit seed from integers/strings, stable across processes and Python runs (no hash())."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def sample_generator(*parts) -> torch.Generator:
    """The generator of one sample's random augmentation: a pure function of ``parts``."""
    return torch.Generator().manual_seed(seed_of(*parts))


def default_workers() -> int:
    """CPUs available to this rank minus one (for the training process), at least 1 on a multi-core
    machine, 0 (load in the training process) on a single core. Ranks of one node share its CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    per_rank = max(1, cpus // local)
    if cpus <= 1:
        return 0
    return max(1, per_rank - 1)


def resolve_workers(value) -> int:
    if value is None or value == "auto":
        return default_workers()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"data.workers: expected an int >= 0 or null (auto), got {value!r}")
    return value


class SkipLog:
    """Counts samples skipped for unreadable images or captions and reports the first few on stderr."""

    def __init__(self, limit: int = 5):
        self.count, self.limit, self.reasons = 0, limit, []

    def add(self, where: str, why: str) -> None:
        self.count += 1
        if len(self.reasons) < self.limit:
            self.reasons.append(f"{where}: {why}")

    def drain(self) -> list[str]:
        out, self.reasons = self.reasons, []
        return out


def report_skips(reasons: list[str], total: int, rank: int) -> None:
    for r in reasons:
        print(f"fastclip data (rank {rank}): skipped a sample: {r} ({total} skipped in all)", file=sys.stderr)


def collate(items, tokenizer=None):
    """[(image (3, H, W), caption)] -> (images (n, 3, H, W), captions list or token ids (n, L))."""
    images = torch.stack([x for x, _ in items])
    captions = [c for _, c in items]
    return images, (tokenizer(captions) if tokenizer is not None else captions)
