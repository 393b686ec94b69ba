"""The output directory of a run: checked before anything starts, never shared by two runs, and the
config compared with the checkpoint's on resume.

    check_output_dir(cfg.output_dir)                    # a directory (or creatable), not a file
    moved = set_aside(out, "previous")                  # a fresh run in a used directory: old files -> previous-<time>/
    check_config_change(saved_cfg, cfg.to_dict(), allowed, ckpt_dir)
"""

from __future__ import annotations

import json
import os
import time

from fastclip.train.config import ConfigError

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
    """{key: (saved, current)} for keys that affect training and differ."""
    a, b = _flat(saved), _flat(current)
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


def write_run_files(out: str, cfg, model_config) -> None:
    import dataclasses

    import yaml

    with open(os.path.join(out, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    mc = (
        dataclasses.asdict(model_config)
        if dataclasses.is_dataclass(model_config)
        else dict(vars(model_config))
    )
    with open(os.path.join(out, "model_config.json"), "w") as f:
        json.dump(mc, f, indent=1)
