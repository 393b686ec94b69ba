"""Metrics and logging: ``metrics.jsonl`` (one JSON object per line, each with ``step``), TensorBoard,
the progress bar. Only rank 0 writes.

    log = MetricsLog(out_dir, rank=0, tensorboard=False)
    log.log({"step": 10, "loss": 2.3})
    note = log.truncate_to(40)      # on resume: rows after step 40 go to metrics.jsonl.bak

A torn last line (a disk that filled during an append, a kill mid-write) does not stop a resume: it
is set aside with the rows after the resumed step and reported.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from fastclip.train.config import ConfigError

METRICS = "metrics.jsonl"


def read_rows(path: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """(rows, bad): the JSON objects with an int ``step``, and (line number, text) of every other line."""
    rows, bad = [], []
    if not os.path.isfile(path):
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
            else:
                bad.append((i, line.rstrip("\n")))
    return rows, bad


class MetricsLog:
    def __init__(self, out_dir: str, rank: int, tensorboard: bool = False):
        self.path = os.path.join(out_dir, METRICS)
        self.rank, self.history, self.tb = rank, [], None
        self._tensorboard, self._out = tensorboard, out_dir

    def open(self) -> None:
        """Start TensorBoard (rank 0, when configured)."""
        if self.rank != 0 or not self._tensorboard:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                f"log.tensorboard: true needs the tensorboard package ({exc}); pip install tensorboard"
            ) from None
        self.tb = SummaryWriter(os.path.join(self._out, "tensorboard"))

    def log(self, row: dict) -> None:
        if self.rank != 0:
            return
        row = {k: (float(v) if isinstance(v, (float, torch.Tensor)) else v) for k, v in row.items()}
        self.history.append(row)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as exc:  # a full or read-only disk: the error names the file (a write's does not)
            raise OSError(exc.errno, exc.strerror, self.path) from None
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def truncate_to(self, step: int) -> str | None:
        """Keep the rows up to ``step`` (rewritten atomically); rows after it and unreadable lines are
        appended to ``metrics.jsonl.bak``. Returns a note of what was set aside, or None."""
        rows, bad = read_rows(self.path)
        kept = [r for r in rows if r["step"] <= step]
        later = [r for r in rows if r["step"] > step]
        self.history = kept
        if not later and not bad:
            return None
        with open(self.path + ".bak", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in later)
            f.writelines(text + "\n" for _, text in bad)
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        parts = []
        if later:
            parts.append(f"{len(later)} row(s) after step {step}")
        if bad:
            lines = ", ".join(str(i) for i, _ in bad[:5])
            parts.append(f"{len(bad)} unreadable line(s) (line {lines}; a torn write?)")
        return f"{self.path}: moved {' and '.join(parts)} to {os.path.basename(self.path)}.bak"

    def last_eval(self) -> dict:
        """The newest evaluation row of the file, without ``step`` ({} when there is none)."""
        rows, _ = read_rows(self.path)
        evals = [r for r in rows if "loss" not in r and len(r) > 1]
        return {k: v for k, v in evals[-1].items() if k != "step"} if evals else {}

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress_bar(cfg, rank: int, step: int):
    """A tqdm bar over samples on rank 0 when ``log.progress`` (else None)."""
    if rank != 0 or not cfg.log.progress:
        return None
    from tqdm.auto import tqdm

    t = cfg.train
    return tqdm(
        total=t.steps * t.batch_size, initial=step * t.batch_size, unit="sample", unit_scale=True,
        desc=f"train {cfg.model.name}", dynamic_ncols=True, file=sys.stderr,
    )  # fmt: skip
