"""webdataset tar shards: paths, reading, the per-reader shard plan and the worker-side sample stream.

Readers. A rank with W loader workers runs W readers (one in the training process when W = 0);
reader ``s = rank * W + w`` of ``S = world * W`` readers reads, in epoch ``e``, the shards
``perm_e[s::S]`` where ``perm_e`` is a permutation of all shards seeded by (seed, e): the readers
of one epoch read disjoint shards that together are all of them. With ``resampled`` a reader's
``d``-th shard is drawn with replacement, seeded by (seed, s, d), as open_clip's
``--dataset-resampled``; there are no epochs.

Position. A reader's position is (epoch, shard slot, sample) — in resampled mode the slot is the
draw index and the epoch is 0 — where "sample" counts the shard's samples that left the shuffle
buffer. The buffer is filled from one shard only and its generator is seeded by (seed, epoch,
reader, slot), so the samples at a position are a pure function of it: resuming opens that one
shard, runs the buffer again over the raw bytes (no decoding) and drops the samples already used.
Resume cost is bounded by one shard, whatever the run's length.

Names. A shard spec is a local path, a brace range or a glob (``a/{000..099}.tar``, ``a/*.tar``,
joined with ``::``); the files it names are opened with ``open()``, whatever their names look like
(a file called ``pipe:cmd;#.tar`` is a file, also when the spec names it literally). Only a spec
that starts with a URL scheme and names no existing file (``https://...``, ``pipe:...``, written by
the user) is handed to webdataset's ``gopen``.
"""

from __future__ import annotations

import glob
import os
import random
import re
import tarfile

import torch

from fastclip.data.common import (
    DataError,
    SkipLog,
    collate,
    decode_image,
    draft_size,
    sample_generator,
    seed_of,
)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: "C:\..." is a path
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)


def is_url(spec: str) -> bool:
    return bool(_SCHEME.match(spec))


def expand_shards(spec: str) -> list[str]:
    """A shard spec -> absolute local paths (existing files) or the user's own URLs, in order.

    "::" separates parts; each part is brace-expanded; a local part with glob characters is globbed
    (sorted). Glob matches are always local files."""
    import braceexpand

    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data.train: expected a shard path, brace range or glob, got {spec!r}")
    out, missing = [], []
    for part in spec.split("::"):
        for item in braceexpand.braceexpand(part):
            if os.path.isfile(item):  # an existing file is read, even when its name looks like a URL
                out.append(os.path.abspath(item))
            elif is_url(item):
                out.append(item)  # written by the user: their scheme, their choice
            elif any(ch in item for ch in "*?["):
                out.extend(os.path.abspath(p) for p in sorted(glob.glob(item)) if os.path.isfile(p))
            else:
                missing.append(item)
    if missing or not out:
        raise DataError(f"data shards not found: {spec!r}" + (f" (e.g. {missing[0]!r})" if missing else ""))
    return out


def open_shard(name: str):
    if os.path.isabs(name):  # expand_shards made every local path absolute
        return open(name, "rb")
    from webdataset.gopen import gopen

    return gopen(name, "rb")


class ShardOpenError(OSError):
    """A shard that could not be opened (a missing or unreadable file, a URL that cannot be fetched)."""


# curl's exit codes (webdataset's gopen fetches http(s) URLs with curl -f): what each means
_CURL_EXITS = {
    6: "could not resolve the host", 7: "could not connect to the host", 22: "HTTP error (status >= 400)",
    28: "timed out", 35: "TLS/SSL connection failed", 52: "the server sent nothing", 56: "the connection broke",
}  # fmt: skip


def open_error(name: str, exc: BaseException) -> str:
    """Why shard ``name`` could not be opened, in a few words (curl's exit code spelled out)."""
    found = re.search(r"exit (\d+)", str(exc))
    if not os.path.isabs(name) and found:  # a URL through gopen: the pipe's exit status
        code = int(found.group(1))
        if "curl" in str(exc):
            return f"curl exit {code}: {_CURL_EXITS.get(code, 'failed')}"
        return f"the command exited with status {code}"
    return getattr(exc, "strerror", None) or f"{type(exc).__name__}: {exc}"


def shard_samples(name: str):
    """Raw samples of one shard: dicts {"__key__", ext: bytes, ...} (webdataset's tar reader and key
    grouping over a file we opened ourselves). A shard that cannot be opened or fetched raises
    :class:`ShardOpenError` (a URL's fetch fails when its stream closes)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        f = open_shard(name)
    except OSError as exc:
        raise ShardOpenError(open_error(name, exc)) from exc
    try:
        with f:
            files = ({**item, "__url__": name} for item in tar_file_iterator(f))
            yield from group_by_keys(files)
    except OSError as exc:
        if os.path.isabs(name) or isinstance(exc, ShardOpenError):
            raise
        raise ShardOpenError(open_error(name, exc)) from exc  # gopen's pipe (curl) failed


class ShardPlan:
    """Which shard a reader reads at a slot (see the module docstring)."""

    def __init__(self, n_shards: int, readers: int, seed: int, resampled: bool):
        self.n, self.readers, self.seed, self.resampled = n_shards, readers, seed, resampled
        self._perm_cache: dict[int, list[int]] = {}

    def slots(self, reader: int, epoch: int) -> int:
        """Shards reader ``reader`` reads in ``epoch`` (resampled: unbounded)."""
        if self.resampled:
            return -1
        return len(range(reader, self.n, self.readers))

    def shard(self, reader: int, epoch: int, slot: int) -> int:
        if self.resampled:
            return random.Random(seed_of(self.seed, "draw", reader, slot)).randrange(self.n)
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = list(range(self.n))
            random.Random(seed_of(self.seed, "epoch", epoch)).shuffle(perm)
            self._perm_cache = {epoch: perm}
        return perm[reader + slot * self.readers]


class ShardReader(torch.utils.data.IterableDataset):
    """The worker side: the readers of one rank, each yielding whole batches (dicts) with its position.

    DataLoader worker ``i`` runs logical reader ``(i + offset) % W``: the DataLoader hands out
    batches round-robin from worker 0, so a loader started after ``k`` batches with
    ``offset = k % W`` continues the round-robin where the previous one stopped."""

    def __init__(
        self, shards, plan, rank, workers, starts, offset, local_batch, transform, seed, cfg, tokenizer
    ):
        self.shards, self.plan, self.rank, self.workers = shards, plan, rank, max(1, workers)
        self.starts, self.offset, self.local_batch = starts, offset, local_batch
        self.transform, self.seed, self.tokenizer = transform, seed, tokenizer
        self.image_exts = _exts(getattr(cfg, "image_key", "image"), IMAGE_EXTS, "image")
        self.caption_exts = _exts(getattr(cfg, "caption_key", "caption"), CAPTION_EXTS, "caption")
        self.buffer = int(getattr(cfg, "shuffle_buffer", 0) or 0)
        self.draft = draft_size(transform) if getattr(cfg, "fast_decode", True) else None

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        logical = ((info.id if info is not None else 0) + self.offset) % self.workers
        reader = self.rank * self.workers + logical
        skips = SkipLog()
        items, pos = [], None
        start = dict(self.starts[logical])
        # Samples of each whole pass over this reader's shards: a pass shorter than one batch means the
        # batch repeats samples (reported once by the stream: "short_pass").
        epoch, in_epoch, whole, short = start["epoch"], 0, start["slot"] == start["sample"] == 0, None
        try:
            for item, pos in self._samples(reader, start, skips):
                if pos["epoch"] != epoch:
                    if whole and in_epoch < self.local_batch and short is None:
                        short = in_epoch
                    epoch, in_epoch, whole = pos["epoch"], 0, True
                in_epoch += 1
                items.append(item)
                if len(items) == self.local_batch:
                    images, texts = collate(items, self.tokenizer)
                    yield {
                        "images": images, "texts": texts, "reader": logical, "state": dict(pos),
                        "skipped": skips.count, "reasons": skips.drain(), "short_pass": short,
                    }  # fmt: skip
                    items, skips.count = [], 0
        except DataError as exc:  # reported by the training process as a one-line error
            yield {"error": str(exc), "reader": logical}

    def _raw(self, reader, epoch, slot, skip):
        """Samples of the shard at (epoch, slot) after the seeded buffer, from sample ``skip`` on."""
        from webdataset.filters import _shuffle

        name = self.shards[self.plan.shard(reader, epoch, slot)]
        samples = shard_samples(name)
        if self.buffer > 1:
            rng = random.Random(seed_of(self.seed, "buffer", epoch, reader, slot))
            samples = _shuffle(samples, self.buffer, self.buffer, rng=rng)
        for j, sample in enumerate(samples):
            if j >= skip:
                yield j, sample

    def _samples(self, reader, pos, skips):
        epoch, slot, skip = pos["epoch"], pos["slot"], pos["sample"]
        empty_run = 0
        while True:
            n_slots = self.plan.slots(reader, epoch)
            while n_slots < 0 or slot < n_slots:
                good, failure = 0, None
                name = self.shards[self.plan.shard(reader, epoch, slot)]
                raw = self._raw(reader, epoch, slot, skip)
                while True:
                    try:
                        j, sample = next(raw)
                    except StopIteration:
                        break
                    except ShardOpenError as exc:  # counted as an unreadable shard
                        failure = f"could not be opened ({exc})"
                        skips.add(name, f"unreadable shard: {failure}")
                        break
                    except SHARD_ERRORS as exc:  # unreadable tar: the rest of this shard is dropped, counted
                        failure = f"is not a readable tar ({type(exc).__name__}: {exc})"
                        skips.add(name, f"unreadable shard ({type(exc).__name__}: {exc})")
                        break
                    item = self._decode(sample, name, (epoch, slot), skips)
                    if item is not None:
                        good += 1
                        yield item, {"epoch": epoch, "slot": slot, "sample": j + 1}
                empty_run = 0 if good else empty_run + 1
                if empty_run >= max(1, self.plan.n) and failure is not None and not good:
                    raise DataError(
                        f"data.train: {empty_run} shard(s) in a row gave no usable sample: {name!r} {failure}"
                    )
                if empty_run >= max(1, self.plan.n):
                    raise DataError(
                        f"data.train: {empty_run} shard(s) in a row gave no usable ({'/'.join(self.image_exts)}, "
                        f"{'/'.join(self.caption_exts)}) sample, e.g. {name!r}; check data.image_key/caption_key"
                    )
                slot, skip = slot + 1, 0
            epoch, slot = epoch + 1, 0

    def _decode(self, sample, name, where_in_run, skips):
        where = f"{name}:{sample.get('__key__')}"
        image = next((sample[e] for e in self.image_exts if e in sample), None)
        caption = next((sample[e] for e in self.caption_exts if e in sample), None)
        if image is None or caption is None:
            skips.add(where, f"no {'image' if image is None else 'caption'} file")
            return None
        try:
            caption = caption.decode("utf-8").strip()
        except UnicodeDecodeError:
            skips.add(where, "caption is not UTF-8")
            return None
        if not caption:
            skips.add(where, "empty caption")
            return None
        try:
            img = decode_image(image, self.draft)
        except DECODE_ERRORS as exc:
            skips.add(where, f"unreadable image ({type(exc).__name__}: {exc})")
            return None
        # (epoch, slot): a shard drawn twice by a resampled reader gets new crops the second time
        g = sample_generator(self.seed, "aug", *where_in_run, name, sample["__key__"])
        return self.transform(img, generator=g), caption


def _exts(key: str, default, what) -> tuple:
    if key in ("image", "caption"):
        return default
    exts = tuple(e.strip().lower().lstrip(".") for e in str(key).split(";") if e.strip())
    if not exts:
        raise DataError(f"data.{what}_key: expected extensions such as 'jpg;png', got {key!r}")
    return exts


def _decode_errors():
    from fastclip.data.common import _decode_errors as errors

    return errors()


DECODE_ERRORS = _decode_errors()
# A truncated or damaged tar, or one holding the same file twice (webdataset's ValueError).
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, ValueError)
