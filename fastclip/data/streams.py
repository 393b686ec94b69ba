"""Per-rank training streams over CSV tables and webdataset shards, loaded by worker processes.

Both have ``next_batch() -> (images (b, 3, H, W) float32, captions list[str] or token ids (b, L))``
(CSV with ``data.negative_keys``: lists [caption, *negatives] or token ids (b, 1 + K, L); with
``data.id_key`` a third item, the rows' int64 ids (b,)),
``state_dict()`` (JSON-serialisable position) and ``load_state_dict()``; ``skipped`` counts samples
dropped for unreadable images. Images are decoded, transformed and (with a tokenizer) captions
tokenized inside torch DataLoader workers (``data.workers``; 0 loads in the training process),
which stay alive for the whole run and keep ``data.prefetch`` batches each in flight; batches are
pinned when training on CUDA.

Exact resume. CSV: batch k of a rank is a pure function of (seed, k) — rows of epoch e are a
permutation seeded by (seed, e), each rank takes its slice of every global batch — so any worker
count continues the same sequence, bit for bit. webdataset: each reader's position (see
:mod:`fastclip.data.shards`) is saved; a resumed run with the same world size and ``data.workers``
reproduces the uninterrupted run's batches exactly, shuffle buffer included (the buffer spans one
shard). Random crops are seeded per sample, so augmentation is reproduced too.
"""

from __future__ import annotations

import functools
import sys

import torch

from fastclip.data.common import DataError, collate, report_skips, resolve_workers
from fastclip.data.shards import ShardPlan, ShardReader, expand_shards
from fastclip.data.table import TableDataset, collate_rows, read_extra_columns, read_table
from fastclip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, image_transform


def train_transform(cfg, image_size, mean, std, *, resize_mode="shortest", interpolation="bicubic"):
    """The training transform a data config asks for: random resized crop (``data.augment``, with
    ``data.crop_scale``) or the eval resize (``data.resize_mode``, else ``resize_mode``: the model's)."""
    augment = bool(getattr(cfg, "augment", True))
    scale = tuple(getattr(cfg, "crop_scale", (0.9, 1.0)))
    mode = getattr(cfg, "resize_mode", None) or resize_mode
    return image_transform(
        image_size,
        is_train=augment,
        mean=mean,
        std=std,
        resize_mode=mode,
        scale=scale,
        interpolation=interpolation,
    )


REPORT_LIMIT = 20  # skipped samples listed on stderr per rank; all are counted


class _LoaderStream:
    kind = ""

    def _init_loader(self, cfg, rank, pin_memory):
        self.rank, self.pin_memory = rank, bool(pin_memory)
        self.workers = resolve_workers(getattr(cfg, "workers", 0))
        self.prefetch = int(getattr(cfg, "prefetch", 2) or 2)
        self.skipped, self._reported = 0, 0
        self._iter = None

    def _dataloader(self, dataset, **kw):
        extra = {"prefetch_factor": self.prefetch, "persistent_workers": True} if self.workers else {}
        return torch.utils.data.DataLoader(
            dataset, num_workers=self.workers, pin_memory=self.pin_memory, **extra, **kw
        )

    def _account(self, item: dict) -> None:
        if "error" in item:
            self.close()
            raise DataError(item["error"])
        if item["skipped"]:
            self.skipped += int(item["skipped"])
            if self._reported < REPORT_LIMIT:
                reasons = item["reasons"][: REPORT_LIMIT - self._reported]
                self._reported += len(reasons)
                report_skips(reasons, self.skipped, self.rank)
                if self._reported >= REPORT_LIMIT:
                    print(
                        f"fastclip data (rank {self.rank}): further skipped samples are counted "
                        "(data_skipped in metrics.jsonl), not listed",
                        file=sys.stderr,
                    )

    def close(self) -> None:
        """Stop the worker processes (a later next_batch starts them again)."""
        self._iter = None


# ---- CSV ------------------------------------------------------------------------------------


class PositionSampler(torch.utils.data.Sampler):
    """Batches of (row, epoch) for one rank from a global batch position: epoch e is a permutation of
    the rows seeded by (seed, e); global batch k of the epoch is perm[k*G:(k+1)*G], each rank takes
    its slice. Rows past the last whole global batch of an epoch are not used in that epoch."""

    def __init__(self, n, global_batch, rank, world_size, seed, start):
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.seed, self.start = seed, start
        self.per_epoch = n // global_batch

    def __iter__(self):
        local = self.global_batch // self.world_size
        epoch, k = divmod(self.start, self.per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            while k < self.per_epoch:
                lo = k * self.global_batch + self.rank * local
                yield [(row, epoch) for row in perm[lo : lo + local].tolist()]
                k += 1
            epoch, k = epoch + 1, 0


class CsvStream(_LoaderStream):
    """Per-rank stream over a CSV/TSV of (image path, caption); see the module docstring."""

    kind = "csv"

    def __init__(
        self, path, cfg, image_size, global_batch, rank, world_size, seed,
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, *, tokenizer=None, pin_memory=False,
        resize_mode="shortest", interpolation="bicubic",
    ):  # fmt: skip
        images, captions, _ = read_table(
            path, cfg.image_key, cfg.caption_key, None, cfg.delimiter, getattr(cfg, "root", None)
        )
        if len(images) < global_batch:
            raise DataError(f"{path}: {len(images)} rows is fewer than one global batch ({global_batch})")
        transform = train_transform(
            cfg, image_size, mean, std, resize_mode=resize_mode, interpolation=interpolation
        )
        negatives, ids = read_extra_columns(
            path, getattr(cfg, "negative_keys", None), getattr(cfg, "id_key", None), cfg.delimiter
        )
        self.dataset = TableDataset(
            images, captions, transform, seed, getattr(cfg, "fast_decode", True), negatives=negatives, ids=ids
        )
        self.global_batch, self.world_size, self.seed = global_batch, world_size, seed
        self.tokenizer = tokenizer
        self._init_loader(cfg, rank, pin_memory)
        self.position = 0  # batches consumed

    def next_batch(self):
        if self._iter is None:
            sampler = PositionSampler(
                len(self.dataset), self.global_batch, self.rank, self.world_size, self.seed, self.position
            )
            collate_fn = functools.partial(collate_rows, tokenizer=self.tokenizer)
            self._iter = iter(self._dataloader(self.dataset, batch_sampler=sampler, collate_fn=collate_fn))
        item = next(self._iter)
        self._account(item)
        self.position += 1
        if "ids" in item:  # data.id_key: the rows' integer ids come third
            return item["images"], item["texts"], item["ids"]
        return item["images"], item["texts"]

    def state_dict(self) -> dict:
        return {"kind": "csv", "position": self.position, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "csv", ("position",))
        self.position = int(state["position"])
        self.skipped = int(state.get("skipped", 0))
        self.close()


# ---- webdataset -----------------------------------------------------------------------------


class WebDatasetStream(_LoaderStream):
    """Per-rank stream over webdataset tar shards (img2dataset layout: ``.jpg``/``.png``/``.webp`` +
    ``.txt`` [+ ``.json``] per ``__key__``); see :mod:`fastclip.data.shards` for the shard plan."""

    kind = "webdataset"

    def __init__(
        self, spec, cfg, image_size, global_batch, rank, world_size, seed,
        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, *, tokenizer=None, pin_memory=False,
        resize_mode="shortest", interpolation="bicubic",
    ):  # fmt: skip
        self.shards = expand_shards(spec)
        self._init_loader(cfg, rank, pin_memory)
        self.resampled = bool(getattr(cfg, "resampled", False))
        self.world_size, self.readers = world_size, max(1, self.workers)
        total = world_size * self.readers
        if not self.resampled and len(self.shards) < total:
            raise DataError(
                f"data.train: {len(self.shards)} shard(s) cannot be split between {world_size} rank(s) x "
                f"{self.readers} reader(s) (data.workers) = {total} readers; write at least {total} shards "
                "(fastclip data shards --shard-size), lower data.workers, or set data.resampled: true"
            )
        self.plan = ShardPlan(len(self.shards), total, seed, self.resampled)
        self.cfg, self.seed, self.tokenizer = cfg, seed, tokenizer
        self.local = global_batch // world_size
        self.transform = train_transform(
            cfg, image_size, mean, std, resize_mode=resize_mode, interpolation=interpolation
        )
        self.batches = 0
        self.positions = [{"epoch": 0, "slot": 0, "sample": 0} for _ in range(self.readers)]
        self._warned_short = False

    def next_batch(self):
        if self._iter is None:
            dataset = ShardReader(
                self.shards, self.plan, self.rank, self.workers, [dict(p) for p in self.positions],
                self.batches % self.readers, self.local, self.transform, self.seed, self.cfg, self.tokenizer,
            )  # fmt: skip
            self._iter = iter(self._dataloader(dataset, batch_size=None))
        item = next(self._iter)
        self._account(item)
        self._warn_short(item.get("short_pass"))
        expected = self.batches % self.readers
        assert item["reader"] == expected, f"batch from reader {item['reader']}, expected {expected}"
        self.positions[expected] = item["state"]
        self.batches += 1
        return item["images"], item["texts"]

    def _warn_short(self, samples) -> None:
        """Once per stream: a whole pass over a reader's shards held fewer samples than one batch."""
        if samples is None or self._warned_short:
            return
        self._warned_short = True
        readers = self.world_size * self.readers
        print(
            f"fastclip data (rank {self.rank}): warning: data.train is smaller than one batch: a pass over "
            f"this reader's shards ({len(self.shards)} shard(s) split between {readers} reader(s)) gave "
            f"{samples} usable sample(s), fewer than the {self.local} of one batch per rank, so every batch "
            "repeats samples; add data, lower train.batch_size, or use fewer data.workers",
            file=sys.stderr,
        )

    def state_dict(self) -> dict:
        return {
            "kind": "webdataset", "batches": self.batches, "readers": [dict(p) for p in self.positions],
            "world_size": self.world_size, "workers": self.readers, "shards": len(self.shards),
            "resampled": self.resampled, "seed": self.seed, "skipped": self.skipped,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        _check_kind(state, "webdataset", ("batches", "readers"))
        for key, mine, what in (
            ("world_size", self.world_size, "the number of ranks"),
            ("workers", self.readers, "data.workers (at least 1)"),
            ("shards", len(self.shards), "the number of shards in data.train"),
            ("resampled", self.resampled, "data.resampled"),
            ("seed", self.seed, "train.seed"),
        ):
            if state.get(key, mine) != mine:
                raise DataError(
                    f"data state: the checkpoint was written with {what} = {state[key]!r}, this run has "
                    f"{mine!r}; the sample order depends on it: use {state[key]!r} to resume"
                )
        readers = state["readers"]
        ok = isinstance(readers, list) and len(readers) == self.readers
        ok = ok and all(
            isinstance(p, dict)
            and all(isinstance(p.get(k), int) and p[k] >= 0 for k in ("epoch", "slot", "sample"))
            for p in readers
        )
        if not ok:
            raise DataError(
                f"data state: expected {self.readers} reader positions {{epoch, slot, sample}}, got {readers!r}"
            )
        self.batches = int(state["batches"])
        self.positions = [{k: int(p[k]) for k in ("epoch", "slot", "sample")} for p in readers]
        self.skipped = int(state.get("skipped", 0))
        self.close()


def _check_kind(state, kind, keys) -> None:
    ok = isinstance(state, dict) and state.get("kind") == kind
    ok = ok and all(
        isinstance(state.get(k), (int, list)) and not isinstance(state.get(k), bool) for k in keys
    )
    if not ok:
        fields = ", ".join(f"{k!r}: ..." for k in keys)
        raise DataError(f"data state: expected {{'kind': {kind!r}, {fields}}}, got {state!r}")


__all__ = ["CsvStream", "PositionSampler", "WebDatasetStream", "collate", "train_transform"]
