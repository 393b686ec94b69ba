"""Checkpoints: atomic DeepSpeed checkpoints with the trainer's state, verified on load; safetensors export.

Layout of ``OUTPUT_DIR/checkpoints``::

    latest                  one line: the name of the newest *complete* checkpoint (a sibling step_ dir)
    step_00000100/
        ds/...              DeepSpeed's files (model, optimizer and scheduler states, all ZeRO stages)
        rank_00000.safetensors   per-rank state: RNG states (tensors), data position (JSON metadata)
        trainer.json        step, world size, ZeRO stage, config
        MANIFEST.json       every other file of the directory with its size and SHA-256, written last

A checkpoint is written into ``step_XXXXXXXX.partial`` and renamed when every rank has finished
and the manifest is written; ``latest`` is then replaced atomically (write + ``os.replace``). A run
killed while saving leaves a ``.partial`` directory that nothing reads. Loading checks the manifest
first: a missing, truncated, altered or unlisted file, or an entry that is not a plain name inside
the step directory, raises :class:`CheckpointError` and nothing is loaded. What is and is not trusted
is in docs/training.md ("What is trusted"): the manifest detects damage, not a deliberate forger, so
no file is read in a way that can run code (safetensors, JSON, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil

from fastclip.train.config_values import shown
from fastclip.train.rank_state import RankStateError, load_rank_state, rank_file, save_rank_state

MANIFEST = "MANIFEST.json"
LATEST = "latest"
TRAINER = "trainer.json"
DS_TAG = "ds"
STEP_RE = re.compile(r"step_\d{8}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; nothing was loaded from it."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (e.g. a full disk); the previous checkpoint is kept."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


# ---- manifest ------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    """Every non-directory entry under ``root`` (symlinks included, not followed), as "a/b" names."""
    out = []
    for dirpath, dirnames, names in os.walk(root):
        names = names + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(ckpt_dir: str) -> None:
    entries = {}
    for rel in _files(ckpt_dir):
        full = os.path.join(ckpt_dir, rel)
        entries[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full)}
    _atomic_write(os.path.join(ckpt_dir, MANIFEST), json.dumps({"files": entries}, indent=1))


def _check_entry(manifest: str, rel, meta) -> None:
    parts = rel.split("/") if isinstance(rel, str) else []
    if (
        not parts
        or rel.startswith("/")
        or "\\" in rel
        or "\0" in rel
        or any(p in ("", ".", "..") for p in parts)
        or re.match(r"^[A-Za-z]:", rel)
    ):
        raise CheckpointError(
            f"{manifest}: entry {shown(rel)}: expected a plain relative name inside the step directory "
            "(no '..', no absolute path)"
        )
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{manifest}: entry {shown(rel)}: expected {{'size': int, 'sha256': hex}}, got {shown(meta)}"
        )
    size, digest = meta.get("size"), meta.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CheckpointError(
            f"{manifest}: entry {shown(rel)}: key 'size': expected an int >= 0, got {shown(size)}"
        )
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CheckpointError(
            f"{manifest}: entry {shown(rel)}: key 'sha256': expected 64 hex digits, got {shown(digest)}"
        )


def _read_manifest(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{ckpt_dir}: no {MANIFEST}; the checkpoint is incomplete (a save was interrupted?)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({_json_problem(exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        got = type(data.get("files")).__name__ if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path}: unreadable manifest (expected an object with key 'files' mapping names to "
            f"{{size, sha256}}, got {got})"
        )
    for rel, meta in data["files"].items():
        _check_entry(path, rel, meta)
    return data["files"]


def verify(ckpt_dir: str) -> dict:
    """Check the manifest and every file (size and SHA-256); returns trainer.json. Raises CheckpointError.

    The manifest must list exactly the files of the directory, each a plain name inside it; the files
    the loader reads (trainer.json, one rank state per rank, DeepSpeed's files) must be among them."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint not found: {ckpt_dir!r}")
    entries = _read_manifest(ckpt_dir)
    real_root = os.path.realpath(ckpt_dir)
    problems = []
    for rel, meta in entries.items():
        full = os.path.join(ckpt_dir, rel)
        if os.path.islink(full) or os.path.realpath(full) != os.path.join(real_root, *rel.split("/")):
            problems.append(f"{rel}: a link; expected a regular file inside the step directory")
        elif not os.path.isfile(full):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(full) != meta["size"]:
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, expected {meta['size']}")
        elif _sha256(full) != meta["sha256"]:
            problems.append(f"{rel}: content differs from the manifest (SHA-256)")
    unlisted = [rel for rel in _files(ckpt_dir) if rel not in entries]
    if unlisted:
        problems.append(f"files not listed in {MANIFEST}: {', '.join(unlisted[:5])}")
    if problems:
        raise CheckpointError(f"{ckpt_dir}: corrupted checkpoint, nothing loaded: " + "; ".join(problems))
    meta = _read_trainer_json(ckpt_dir, TRAINER in entries)
    needed = [TRAINER] + [os.path.basename(rank_file(ckpt_dir, r)) for r in range(meta["world_size"])]
    missing = [n for n in needed if n not in entries]
    if not any(rel.startswith(DS_TAG + "/") for rel in entries):
        missing.append(f"{DS_TAG}/ (DeepSpeed's files)")
    if missing:
        old = " (written by an older fastclip with pickled rank state?)" if "rank_00000.pt" in entries else ""
        raise CheckpointError(
            f"{ckpt_dir}: corrupted checkpoint, nothing loaded: the manifest lacks {', '.join(missing)}{old}"
        )
    for r in range(meta["world_size"]):  # a forged rank state is refused here, before anything starts
        _read_rank_state(ckpt_dir, r)
    return meta


def _json_problem(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


_JSON_INT_MAX = 2**53  # positions, counts and seeds beyond this are no run's (and overflow int64 maths)


def _read_rank_state(ckpt_dir: str, rank: int) -> dict:
    """The rank state of ``rank``, checked to be usable: JSON within bounds, RNG states that the
    generators accept. Raises :class:`CheckpointError` naming the file and the key."""
    path = rank_file(ckpt_dir, rank)
    try:
        state = load_rank_state(path)
    except RankStateError as exc:
        raise CheckpointError(str(exc)) from None
    except RecursionError:
        raise CheckpointError(f"{path}: metadata 'fastclip': JSON nested too deeply") from None
    _check_json_numbers(path, "data", state["data"])
    _check_rng(path, state["rng"])
    return state


def _check_json_numbers(path: str, where: str, value) -> None:
    """Every number of the data state: finite, an int within +-2**53 (>= 0 unless a seed)."""
    todo = [(where, value)]
    while todo:
        key, v = todo.pop()
        if len(todo) > 100_000 or key.count(".") + key.count("[") > 32:
            raise CheckpointError(f"{path}: key {shown(key)}: nested too deeply for a data-stream state")
        if isinstance(v, dict):
            todo += [(f"{key}.{k}", x) for k, x in v.items()]
        elif isinstance(v, list):
            todo += [(f"{key}[{i}]", x) for i, x in enumerate(v)]
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        elif isinstance(v, int):
            if key.endswith(".seed"):  # train.seed, any int64
                lo, hi, text = -(2**63), 2**63 - 1, "[-2**63, 2**63)"
            else:
                lo, hi, text = 0, _JSON_INT_MAX, "[0, 2**53]"
            if not lo <= v <= hi:
                raise CheckpointError(f"{path}: key {shown(key)}: expected an int in {text}, got {shown(v)}")
        elif isinstance(v, float) and not math.isfinite(v):
            raise CheckpointError(f"{path}: key {shown(key)}: expected a finite number, got {v!r}")


def _check_rng(path: str, rng: dict) -> None:
    """Each RNG state set on a fresh generator of its kind (the process's own are not touched)."""
    import random

    import numpy as np
    import torch

    s = rng["scalars"]
    checks = (
        ("rng.torch", lambda: torch.Generator().set_state(rng["torch"])),
        ("rng.numpy", lambda: np.random.RandomState().set_state(
            (s["numpy_kind"], rng["numpy"].numpy().astype(np.uint32), s["numpy_pos"],
             s["numpy_has_gauss"], s["numpy_cached_gaussian"]))),
        ("rng.python", lambda: random.Random().setstate(
            (s["python_version"], tuple(int(v) for v in rng["python"].tolist()), s["python_gauss_next"]))),
    )  # fmt: skip
    for key, apply in checks:
        try:
            apply()
        except (RuntimeError, ValueError, TypeError, OverflowError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path}: tensor {key!r}: not a usable RNG state ({shown(first)})"
            ) from None
    if "cuda" in rng and torch.cuda.is_available():
        size = torch.cuda.get_rng_state().numel()
        if rng["cuda"].dtype != torch.uint8 or rng["cuda"].numel() != size:
            raise CheckpointError(
                f"{path}: tensor 'rng.cuda': expected {size} bytes of CUDA RNG state, got "
                f"{rng['cuda'].numel()} {rng['cuda'].dtype}"
            )


def _read_trainer_json(ckpt_dir: str, listed: bool) -> dict:
    path = os.path.join(ckpt_dir, TRAINER)
    if not listed or not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: corrupted checkpoint, nothing loaded: {TRAINER}: missing")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: not JSON ({_json_problem(exc)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected an object, got {type(meta).__name__}")
    for key, lo in (("step", 0), ("world_size", 1), ("zero_stage", 0)):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise CheckpointError(f"{path}: key {key!r}: expected an int >= {lo}, got {shown(v)}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"{path}: key 'config': expected the run's config (an object), got {shown(meta.get('config'))}"
        )
    return meta


# ---- finding checkpoints -------------------------------------------------------------------------


def resolve(path: str) -> str:
    """A checkpoint directory, or a checkpoints root with a ``latest`` marker -> the checkpoint directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    if os.path.lexists(os.path.join(path, LATEST)):
        return _read_latest(path)
    if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, TRAINER)):
        return path
    raise CheckpointError(
        f"{path!r} is neither a checkpoint (no {MANIFEST}) nor a directory with a {LATEST!r} marker"
    )


def _read_latest(root: str) -> str:
    marker = os.path.join(root, LATEST)
    if os.path.islink(marker) or not os.path.isfile(marker):
        # a link (to a directory or file anywhere) or a directory is never followed: the marker is a
        # one-line file written by the trainer, like the text form that names '../../etc'
        what = f"a link to {os.readlink(marker)!r}" if os.path.islink(marker) else "not a regular file"
        raise CheckpointError(
            f"{marker}: {what}; expected a one-line file naming a step directory next to it (step_XXXXXXXX)"
        )
    with open(marker, "rb") as f:
        raw = f.read(256)
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        name = repr(raw[:40])
    if not STEP_RE.fullmatch(name):
        raise CheckpointError(
            f"{marker}: names {name!r}; expected the name of a step directory next to it (step_XXXXXXXX)"
        )
    target = os.path.join(root, name)
    if os.path.islink(target):  # never followed, wherever it points
        raise CheckpointError(
            f"{marker} points at {name!r}, which is a link to {os.readlink(target)!r}; "
            "expected a step directory next to it (links are not followed)"
        )
    if not os.path.isdir(target):
        what = "which does not exist" if not os.path.lexists(target) else "which is not a directory"
        raise CheckpointError(f"{marker} points at {name!r}, {what}")
    return target


def find_latest(root: str) -> str | None:
    """The checkpoint ``root/latest`` names, or None when there is no marker (a fresh run). A marker
    that is a link or not a regular file raises :class:`CheckpointError` (never a silent fresh run)."""
    if not os.path.lexists(os.path.join(root, LATEST)):
        return None
    return _read_latest(root)


def step_dirs(root: str) -> dict[int, str]:
    """Complete step directories of ``root`` by step number."""
    if not os.path.isdir(root):
        return {}
    return {int(n[5:]): os.path.join(root, n) for n in os.listdir(root) if STEP_RE.fullmatch(n)}


# ---- save / load ---------------------------------------------------------------------------------


def save(engine, root, step, rank, world_size, data_state, meta, *, barrier, any_rank, keep) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``barrier()`` synchronises the ranks, ``any_rank(flag) -> bool`` is True on every rank when any
    rank passed True. A write that fails (full disk, I/O error) on any rank removes the partial
    directory and raises :class:`CheckpointWriteError` on every rank; ``latest`` still names the
    previous checkpoint."""
    final = os.path.join(root, step_name(step))
    partial = final + ".partial"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    barrier()
    failure = None
    try:
        engine.save_checkpoint(partial, tag=DS_TAG, save_latest=False)
        save_rank_state(rank_file(partial, rank), step=step, data=data_state)
    except (OSError, RuntimeError) as exc:
        if not _is_write_failure(exc):
            raise
        failure = _describe_write_failure(exc, root)
    if any_rank(failure is not None):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        previous = find_latest(root) if os.path.lexists(os.path.join(root, LATEST)) else None
        kept = f"previous checkpoint kept ({previous})" if previous else "no earlier checkpoint exists"
        what = failure or "another rank could not write its files"
        raise CheckpointWriteError(f"{what} while saving checkpoint at step {step}; {kept}")
    barrier()
    _fault_point("during_checkpoint", step)
    if rank == 0:
        _atomic_write(
            os.path.join(partial, TRAINER),
            json.dumps({**meta, "step": step, "world_size": world_size}, indent=1),
        )
        write_manifest(partial)
        if os.path.isdir(final):  # a re-save of the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(partial, final)
        _atomic_write(os.path.join(root, LATEST), step_name(step) + "\n")
        _prune(root, keep, step)
    barrier()
    return final


def load(engine, ckpt_dir: str, rank: int, world_size: int, zero_stage: int, meta: dict | None = None):
    """Verify (unless ``meta`` from :func:`verify` is given), then load model, optimizer and scheduler
    into ``engine``; returns (trainer.json, rank state)."""
    meta = verify(ckpt_dir) if meta is None else meta
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"{ckpt_dir}: saved with world size {meta['world_size']}, resuming with {world_size}; "
            "resume with the same number of processes (or export the weights and start a new run)"
        )
    if meta["zero_stage"] != zero_stage:
        raise CheckpointError(
            f"{ckpt_dir}: saved with ZeRO stage {meta['zero_stage']}, resuming with stage {zero_stage}"
        )
    state = _read_rank_state(ckpt_dir, rank)
    if state["step"] != meta["step"]:
        raise CheckpointError(
            f"{ckpt_dir}: rank {rank} state is for step {state['step']}, not {meta['step']}"
        )
    from fastclip.train.safe_load import make_engine_loads_safe

    make_engine_loads_safe(engine)
    path, _ = engine.load_checkpoint(
        ckpt_dir,
        tag=DS_TAG,
        load_module_strict=True,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: DeepSpeed could not load the checkpoint")
    return meta, state


# ---- internals ------------------------------------------------------------------------------


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Messages of torch's file writer (used by DeepSpeed's torch.save) when a write fails: its C++
# stream reports no errno.
_TORCH_WRITE_ERRORS = (
    "basic_ios::clear",
    "PytorchStreamWriter failed",
    "unexpected pos",
    "file write failed",
)


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    return any(s in str(exc) for s in _TORCH_WRITE_ERRORS)


def _free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def _describe_write_failure(exc: BaseException, root: str) -> str:
    err = getattr(exc, "errno", None)
    full = err in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc)
    if not full and not isinstance(exc, OSError):  # torch's writer: judge by the space left
        full = _free_bytes(root) < 64 * 2**20
    if full:
        return "disk full"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"write error ({first})"


def _prune(root: str, keep: int, current: int) -> None:
    """Keep the ``keep`` newest checkpoints up to ``current`` (the one just written)."""
    older = sorted(s for s in step_dirs(root) if s <= current)
    for s in older[:-keep]:
        shutil.rmtree(os.path.join(root, step_name(s)), ignore_errors=True)


def _fault_point(phase: str, step: int) -> None:
    """Test hook: FASTCLIP_TEST_KILL="phase:step" kills the process here (a crash, no clean-up)."""
    spec = os.environ.get("FASTCLIP_TEST_KILL")
    if spec and spec == f"{phase}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
