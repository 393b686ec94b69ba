"""Per-rank trainer state in a checkpoint: RNG states as tensors and the data position as JSON, in one
safetensors file (``rank_XXXXX.safetensors``). Loading it runs no code: safetensors holds raw tensors,
the JSON part is parsed with :mod:`json`.

    save_rank_state(path, step=10, data={"kind": "synthetic", "position": 10})
    state = load_rank_state(path)     # {"step": 10, "data": {...}, "rng": {...}}
    set_rng_state(state["rng"])
"""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import torch

from fastclip.train.config_values import shown

_META = "fastclip"


class RankStateError(ValueError):
    """A per-rank state file is unreadable or lacks a key; the message names the file and the key."""


def rng_state() -> dict:
    """The torch, numpy, python (and CUDA) RNG states: tensors plus a few JSON-able scalars."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "python": torch.tensor(internal, dtype=torch.int64),
        "scalars": {
            "numpy_kind": kind,
            "numpy_pos": int(pos),
            "numpy_has_gauss": int(has_gauss),
            "numpy_cached_gaussian": float(cached),
            "python_version": int(version),
            "python_gauss_next": None if gauss_next is None else float(gauss_next),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    s = state["scalars"]
    torch.set_rng_state(state["torch"])
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(
        (s["numpy_kind"], keys, s["numpy_pos"], s["numpy_has_gauss"], s["numpy_cached_gaussian"])
    )
    internal = tuple(int(v) for v in state["python"].tolist())
    random.setstate((s["python_version"], internal, s["python_gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rank_state(path: str, *, step: int, data: dict) -> None:
    """Write the state of this rank (RNG now, ``data``: the data stream's JSON-able position)."""
    from safetensors.torch import save_file

    rng = rng_state()
    try:
        meta = json.dumps({"step": int(step), "data": data, "rng": rng["scalars"]}, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"data: expected a JSON-serialisable data-stream state, got {shown(data)} ({exc})"
        ) from None
    tensors = {f"rng.{k}": v.contiguous() for k, v in rng.items() if k != "scalars"}
    save_file(tensors, path, metadata={_META: meta})


_TENSORS = {"rng.torch": torch.uint8, "rng.numpy": torch.int64, "rng.python": torch.int64}
_SCALARS = {
    "numpy_kind": str,
    "numpy_pos": int,
    "numpy_has_gauss": int,
    "numpy_cached_gaussian": float,
    "python_version": int,
}


def load_rank_state(path: str) -> dict:
    """Read a file written by :func:`save_rank_state`; raises :class:`RankStateError` naming what is wrong."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta_text = (f.metadata() or {}).get(_META)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise RankStateError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta_text is None:
        raise RankStateError(f"{path}: no {_META!r} metadata (step, data position, RNG scalars)")
    try:
        meta = json.loads(meta_text)
    except ValueError as exc:
        raise RankStateError(f"{path}: metadata {_META!r} is not JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise RankStateError(f"{path}: metadata {_META!r}: expected an object, got {type(meta).__name__}")
    if not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise RankStateError(f"{path}: key 'step': expected an int >= 0, got {shown(meta.get('step'))}")
    if not isinstance(meta.get("data"), dict):
        raise RankStateError(
            f"{path}: key 'data': expected the data stream's state (an object), got {shown(meta.get('data'))}"
        )
    scalars = meta.get("rng")
    if not isinstance(scalars, dict):
        raise RankStateError(f"{path}: key 'rng': expected an object of RNG scalars, got {shown(scalars)}")
    for key, tp in _SCALARS.items():
        v = scalars.get(key)
        ok = (isinstance(v, tp) or (tp is float and isinstance(v, int))) and not isinstance(v, bool)
        if not ok or (tp is float and not math.isfinite(v)):
            raise RankStateError(f"{path}: key 'rng.{key}': expected {tp.__name__}, got {shown(v)}")
    gauss = scalars.get("python_gauss_next")
    if gauss is not None and not isinstance(gauss, (int, float)):
        raise RankStateError(
            f"{path}: key 'rng.python_gauss_next': expected a number or null, got {shown(gauss)}"
        )
    for key, dtype in _TENSORS.items():
        t = tensors.get(key)
        if t is None or t.dtype != dtype or t.dim() != 1:
            got = "missing" if t is None else f"{t.dtype} of shape {tuple(t.shape)}"
            raise RankStateError(f"{path}: tensor {key!r}: expected a 1-D {dtype} tensor, got {got}")
    if tensors["rng.numpy"].numel() != 624 or tensors["rng.python"].numel() != 625:
        raise RankStateError(
            f"{path}: tensors 'rng.numpy'/'rng.python': expected 624/625 words, "
            f"got {tensors['rng.numpy'].numel()}/{tensors['rng.python'].numel()}"
        )
    rng = {"torch": tensors["rng.torch"], "numpy": tensors["rng.numpy"], "python": tensors["rng.python"]}
    rng["scalars"] = {**scalars, "python_gauss_next": gauss}
    if "rng.cuda" in tensors:  # the CUDA generator's state (a run on a GPU): what set_rng_state needs
        t = tensors["rng.cuda"]
        if t.dtype != torch.uint8 or t.dim() != 1 or t.numel() == 0:
            raise RankStateError(
                f"{path}: tensor 'rng.cuda': expected a non-empty 1-D torch.uint8 tensor, "
                f"got {t.dtype} of shape {tuple(t.shape)}"
            )
        rng["cuda"] = t
    return {"step": meta["step"], "data": meta["data"], "rng": rng}


def rank_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, f"rank_{rank:05d}.safetensors")
