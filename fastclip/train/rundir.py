"""The output directory of a run: checked before anything starts, held by one run at a time, never
shared by two runs, and the config compared with the checkpoint's on resume.

    check_output_dir(cfg.output_dir)                    # a directory (or creatable), not a file
    lock = RunLock.acquire(cfg.output_dir)              # or OutputDirBusy naming the holder's pid
    removed = clean_leftovers(out)                      # latest.tmp<pid>, *.partial of a killed run
    lock.release()
    moved = set_aside(out, "previous")                  # a fresh run in a used directory: old files -> previous-<time>/
    check_config_change(saved_cfg, cfg.to_dict(), allowed, ckpt_dir)
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time

from fastclip.train.config import ConfigError

LOCK = ".fastclip.lock"

# What a run writes into its output directory.
RUN_FILES = (
    "checkpoints",
    "metrics.jsonl",
    "metrics.jsonl.bak",
    "curves.png",
    "model.safetensors",
    "config.yaml",
    "model_config.json",
    "vocab.txt",
    "tensorboard",
)

# Keys that do not change what is trained (logging, evaluation, checkpoint cadence, process set-up,
# loader prefetch): they may differ on resume. Every other key must match the checkpoint's, or be
# named in checkpoint.allow_config_change (data.workers too: the loader's reader plan may depend on it).
FREE_SECTIONS = ("log.", "eval.", "checkpoint.", "dist.")
FREE_KEYS = {"output_dir", "train.threads", "train.backend", "data.prefetch", "data.eval", "data.eval_size",
             "data.label_key"}  # fmt: skip


def check_output_dir(path: str) -> None:
    """``path`` is a directory or can be made one (no file in the way)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return
        p = parent
    if not os.path.isdir(p):
        where = "is a file" if p == os.path.abspath(path) else f"cannot be created: {p!r} is a file"
        raise ConfigError(f"output_dir: expected a directory, got {path!r}, which {where}")


class OutputDirBusy(ConfigError):
    """Another process holds the output directory's lock (a run in progress)."""


class RunLock:
    """An advisory lock (``fcntl.flock``) on ``OUTPUT_DIR/.fastclip.lock``, which holds the holder's pid.

    The kernel releases a flock when its process ends, however it ends: a crashed run leaves the file
    with its pid but no lock (``stale_pid`` tells the next run). A clean release empties the file. The
    file itself stays (removing it would let two runs lock two different files of the same name)."""

    def __init__(self, path: str, fd: int, stale_pid: int | None):
        self.path, self._fd, self.stale_pid = path, fd, stale_pid

    @classmethod
    def acquire(cls, out: str) -> RunLock:
        """Create ``out`` if needed and lock it; raises :class:`OutputDirBusy` naming the holder's pid,
        or :class:`ConfigError` naming the path when the directory cannot be written."""
        import fcntl

        out = os.path.abspath(out)
        path = os.path.join(out, LOCK)
        try:
            os.makedirs(out, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise not_writable(out, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise not_writable(out, exc) from None
            who = f"pid {holder}" if holder else "another process"
            raise OutputDirBusy(
                f"output_dir: {out} is in use by another fastclip run ({who}); wait for it to finish, "
                "stop it, or choose another --output-dir"
            ) from None
        stale = _read_pid(fd)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise not_writable(out, exc) from None
        return cls(path, fd, stale if stale != os.getpid() else None)

    def release(self) -> None:
        """Empty the file and unlock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # closing the only descriptor releases the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def not_writable(path: str, exc: OSError) -> ConfigError:
    """The one-line error for an output directory that cannot be written (read-only, no permission)."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) and exc.filename != path else ""
    return ConfigError(
        f"output_dir: cannot write to {path}: {exc.strerror or exc}{where}; choose a writable --output-dir"
    )


_TMP_RE = re.compile(r"latest\.tmp\d+")


def clean_leftovers(out: str) -> list[str]:
    """Remove what a killed run leaves behind and nothing reads: ``checkpoints/latest.tmp<pid>``
    (a marker write cut before its rename), ``checkpoints/step_X.partial/`` (a save cut before its
    rename) and ``metrics.jsonl.tmp``. Call only while holding the :class:`RunLock`. Returns the names."""
    removed = []
    root = os.path.join(out, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) and not os.path.islink(root) else []
    for n in names:
        full = os.path.join(root, n)
        if _TMP_RE.fullmatch(n) and (os.path.islink(full) or os.path.isfile(full)):
            os.remove(full)
        elif n.endswith(".partial") and not os.path.islink(full) and os.path.isdir(full):
            shutil.rmtree(full)
        else:
            continue
        removed.append(f"checkpoints/{n}")
    tmp = os.path.join(out, "metrics.jsonl.tmp")
    if os.path.isfile(tmp):
        os.remove(tmp)
        removed.append("metrics.jsonl.tmp")
    return removed


def has_run(out: str) -> bool:
    return any(os.path.exists(os.path.join(out, n)) for n in RUN_FILES)


def set_aside(out: str, names=RUN_FILES) -> str | None:
    """Move the given entries of ``out`` (those that exist) into ``out/previous-<time>/``; returns it."""
    present = [n for n in names if os.path.exists(os.path.join(out, n))]
    if not present:
        return None
    dest = _new_previous_dir(out)
    for n in present:
        os.replace(os.path.join(out, n), os.path.join(dest, n))
    return dest


def _new_previous_dir(out: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, i = os.path.join(out, f"previous-{stamp}"), 1
    while os.path.exists(dest):
        i += 1
        dest = os.path.join(out, f"previous-{stamp}-{i}")
    os.makedirs(dest)
    return dest


def set_aside_later_checkpoints(out: str, ckpt_root: str, step: int) -> str | None:
    """Checkpoints after ``step`` (a branch abandoned by resuming earlier) -> ``out/previous-<time>/checkpoints``."""
    from fastclip.train.checkpoint import step_dirs

    later = [d for s, d in sorted(step_dirs(ckpt_root).items()) if s > step]
    if not later:
        return None
    dest = _new_previous_dir(out)
    os.makedirs(os.path.join(dest, "checkpoints"))
    for d in later:
        os.replace(d, os.path.join(dest, "checkpoints", os.path.basename(d)))
    return dest


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(saved: dict, current: dict) -> dict:
    """{key: (saved, current)} for keys that affect training and differ. A key the saved config lacks
    (a checkpoint from before the key existed) counts as its default: adding an option does not stop
    older runs from resuming."""
    from fastclip.train.config import Config

    defaults = _flat(Config().to_dict())
    a, b = {**defaults, **_flat(saved)}, _flat(current)
    out = {}
    for key in sorted(set(a) | set(b)):
        if key in FREE_KEYS or key.startswith(FREE_SECTIONS):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out[key] = (a.get(key, "<absent>"), b.get(key, "<absent>"))
    return out


def check_config_change(saved: dict, current: dict, allowed: list | None, ckpt_dir: str) -> list[str]:
    """Refuse changes to keys that break exact resume unless allowed; returns the allowed changes made."""
    changes = config_changes(saved, current)
    refused = {k: v for k, v in changes.items() if k not in (allowed or [])}
    if refused:
        desc = "; ".join(
            f"{k}: {json.dumps(a)} in the checkpoint, {json.dumps(b)} now" for k, (a, b) in refused.items()
        )
        keys = ",".join(refused)
        raise ConfigError(
            f"{ckpt_dir}: the config differs from the checkpoint's ({desc}); resuming would not continue the "
            f"same run. Restore the values, or accept with --checkpoint.allow_config_change {keys}"
        )
    return [f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items()]


def write_run_files(out: str, cfg, model_config, tokenizer=None) -> None:
    """config.yaml, model_config.json and, for a word tokenizer, vocab.txt (read back by
    ``fastclip.get_tokenizer(out)``): written when training starts, so a run that fails during its set-up
    leaves none of them."""
    import dataclasses

    import yaml

    from fastclip.models.tokenizer import WORD_VOCAB, WordTokenizer

    mc = (
        dataclasses.asdict(model_config)
        if dataclasses.is_dataclass(model_config)
        else dict(vars(model_config))
    )
    files = [
        ("config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False)),
        ("model_config.json", json.dumps(mc, indent=1)),
    ]
    if isinstance(tokenizer, WordTokenizer):
        files.append((WORD_VOCAB, "\n".join(tokenizer.vocab) + "\n"))
    for name, text in files:
        path = os.path.join(out, name)
        try:
            with open(path, "w") as f:
                f.write(text)
        except OSError as exc:  # a full or read-only disk: name the file (a failed write does not)
            raise OSError(exc.errno, exc.strerror, path) from None
