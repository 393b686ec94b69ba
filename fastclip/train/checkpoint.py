"""Checkpoints: atomic DeepSpeed checkpoints with the trainer's state, verified on load; safetensors export.

Layout of ``OUTPUT_DIR/checkpoints``::

    latest                  one line: the name of the newest *complete* checkpoint
    step_00000100/
        ds/...              DeepSpeed's files (model, optimizer and scheduler states, all ZeRO stages)
        rank_00000.pt       per-rank state: RNG states, data position
        trainer.json        step, world size, ZeRO stage, config
        MANIFEST.json       every file above with its size and SHA-256, written last

A checkpoint is written into ``step_XXXXXXXX.partial`` and renamed when every rank has finished
and the manifest is written; ``latest`` is then replaced atomically (write + ``os.replace``). A run
killed while saving leaves a ``.partial`` directory that nothing reads. Loading checks the manifest
first: a missing, truncated or altered file raises :class:`CheckpointError` and nothing is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil

import numpy as np
import torch

MANIFEST = "MANIFEST.json"
LATEST = "latest"
DS_TAG = "ds"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; nothing was loaded from it."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), root)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def write_manifest(ckpt_dir: str) -> None:
    entries = {rel: {"size": os.path.getsize(os.path.join(ckpt_dir, rel)), "sha256": _sha256(os.path.join(ckpt_dir, rel))} for rel in _files(ckpt_dir)}  # fmt: skip
    _atomic_write(os.path.join(ckpt_dir, MANIFEST), json.dumps({"files": entries}, indent=1))


def verify(ckpt_dir: str) -> dict:
    """Check every file of the manifest (size and SHA-256); returns trainer.json. Raises CheckpointError."""
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint not found: {ckpt_dir!r}")
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{ckpt_dir}: no {MANIFEST}; the checkpoint is incomplete (a save was interrupted?)"
        )
    try:
        with open(path) as f:
            entries = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable manifest ({exc})") from None
    problems = []
    for rel, meta in entries.items():
        full = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(full):
            problems.append(f"{rel}: missing")
        elif os.path.getsize(full) != meta["size"]:
            problems.append(f"{rel}: {os.path.getsize(full)} bytes, expected {meta['size']}")
        elif _sha256(full) != meta["sha256"]:
            problems.append(f"{rel}: content differs from the manifest (SHA-256)")
    if problems:
        raise CheckpointError(f"{ckpt_dir}: corrupted checkpoint, nothing loaded: " + "; ".join(problems))
    with open(os.path.join(ckpt_dir, "trainer.json")) as f:
        return json.load(f)


def resolve(path: str) -> str:
    """A checkpoint directory, or a checkpoints root with a ``latest`` marker -> the checkpoint directory."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path!r}")
    marker = os.path.join(path, LATEST)
    if os.path.isfile(marker):
        with open(marker) as f:
            name = f.read().strip()
        target = os.path.join(path, name)
        if not name or not os.path.isdir(target):
            raise CheckpointError(f"{marker} points at {name!r}, which does not exist")
        return target
    if os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isfile(os.path.join(path, "trainer.json")):
        return path
    raise CheckpointError(
        f"{path!r} is neither a checkpoint (no {MANIFEST}) nor a directory with a {LATEST!r} marker"
    )


def find_latest(root: str) -> str | None:
    """The checkpoint ``root/latest`` names, or None when there is no marker (a fresh run)."""
    if not os.path.isfile(os.path.join(root, LATEST)):
        return None
    return resolve(root)


# ---- per-rank state -------------------------------------------------------------------------


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(
    engine, root: str, step: int, rank: int, world_size: int, data_state: dict, meta: dict, barrier, keep: int
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    final = os.path.join(root, step_name(step))
    partial = final + ".partial"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    barrier()
    engine.save_checkpoint(partial, tag=DS_TAG, save_latest=False)
    torch.save(
        {"rng": rng_state(), "data": data_state, "step": step}, os.path.join(partial, f"rank_{rank:05d}.pt")
    )
    barrier()
    _fault_point("during_checkpoint", step)
    if rank == 0:
        _atomic_write(
            os.path.join(partial, "trainer.json"),
            json.dumps({**meta, "step": step, "world_size": world_size}, indent=1),
        )
        write_manifest(partial)
        if os.path.isdir(final):  # a re-save of the same step (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(partial, final)
        _atomic_write(os.path.join(root, LATEST), step_name(step) + "\n")
        _prune(root, keep)
    barrier()
    return final


def load(engine, ckpt_dir: str, rank: int, world_size: int, zero_stage: int) -> tuple[dict, dict]:
    """Verify, then load model, optimizer and scheduler into ``engine``; returns (trainer.json, rank state)."""
    meta = verify(ckpt_dir)
    if meta.get("world_size") != world_size:
        raise CheckpointError(
            f"{ckpt_dir}: saved with world size {meta.get('world_size')}, resuming with {world_size}; "
            "resume with the same number of processes (or export the weights and start a new run)"
        )
    if meta.get("zero_stage") != zero_stage:
        raise CheckpointError(
            f"{ckpt_dir}: saved with ZeRO stage {meta.get('zero_stage')}, resuming with stage {zero_stage}"
        )
    rank_file = os.path.join(ckpt_dir, f"rank_{rank:05d}.pt")
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
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


def export_safetensors(ckpt_dir: str, out_path: str) -> str:
    """Plain fp32 weights of a checkpoint (any ZeRO stage) -> a safetensors file. Works offline, one process."""
    from safetensors.torch import save_file

    ckpt_dir = resolve(ckpt_dir)
    verify(ckpt_dir)
    ds_dir = os.path.join(ckpt_dir, DS_TAG)
    zero_files = [
        n for n in os.listdir(ds_dir) if "optim_states" in n and n.startswith(("zero_", "bf16_zero_"))
    ]
    if zero_files:
        import contextlib

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
            contextlib.redirect_stderr(null),
        ):
            state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=DS_TAG)  # chatty: prints progress
    else:  # ZeRO stage 0: DeepSpeed stores the module's state dict as it is
        model_file = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
        state = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    state = {k: v.detach().float().contiguous().clone() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    save_file(state, tmp, metadata={"format": "pt", "source": os.path.abspath(ckpt_dir)})
    os.replace(tmp, out_path)
    return out_path


# ---- internals ------------------------------------------------------------------------------


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: str, keep: int) -> None:
    done = sorted(n for n in os.listdir(root) if n.startswith("step_") and not n.endswith(".partial"))
    for name in done[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _fault_point(phase: str, step: int) -> None:
    """Test hook: FASTCLIP_TEST_KILL="phase:step" kills the process here (a crash, no clean-up)."""
    spec = os.environ.get("FASTCLIP_TEST_KILL")
    if spec and spec == f"{phase}:{step}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
