"""Config values: conversion of file and command-line values to the field types, and the checks
:meth:`fastclip.train.config.Config.validate` runs; each error names the key, the expectation and the value."""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


SHOWN_CHARS = 200  # the most of a value an error message prints


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said (a huge list in a config
    must not make a huge error line). Builds at most ``limit`` characters of a large container."""
    text = _bounded_repr(value, limit + 1)
    if len(text) <= limit:
        return text
    if isinstance(value, str):
        size = f"{len(value)} characters"
    else:
        size = f"{len(value)} items" if isinstance(value, (list, tuple, dict)) else "longer"
    return f"{text[:limit]}... ({type(value).__name__}, {size})"


def _bounded_repr(value: Any, budget: int) -> str:
    if isinstance(value, (list, tuple)):
        open_, close = ("[", "]") if isinstance(value, list) else ("(", ")")
        parts, used = [], 1
        for v in value:
            if used >= budget:
                parts.append("...")
                break
            r = _bounded_repr(v, budget - used)
            parts.append(r)
            used += len(r) + 2
        return open_ + ", ".join(parts) + close
    if isinstance(value, dict):
        parts, used = [], 1
        for k, v in value.items():
            if used >= budget:
                parts.append("...")
                break
            r = f"{_bounded_repr(k, budget - used)}: {_bounded_repr(v, budget - used)}"
            parts.append(r)
            used += len(r) + 2
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, str) and len(value) > budget:
        return repr(value[:budget])
    return repr(value)


# Names other trainers use for a key, by meaning (not spelling): "learning_rate" is "optim.lr".
# Looked up by the key's last part, lower case, "-" as "_".
ALIASES = {
    "learning_rate": "optim.lr", "base_lr": "optim.lr", "max_lr": "optim.lr",
    "wd": "optim.weight_decay", "decay": "optim.weight_decay",
    "beta": "optim.betas", "adam_betas": "optim.betas", "beta1": "optim.betas", "beta2": "optim.betas",
    "epsilon": "optim.eps", "adam_eps": "optim.eps", "adam_epsilon": "optim.eps",
    "warmup": "optim.warmup_steps", "warmup_iters": "optim.warmup_steps", "lr_warmup": "optim.warmup_steps",
    "clip_grad": "optim.grad_clip", "grad_clip_norm": "optim.grad_clip", "max_grad_norm": "optim.grad_clip",
    "gradient_clipping": "optim.grad_clip", "grad_norm": "optim.grad_clip",
    "min_lr": "optim.min_lr_ratio", "lr_min": "optim.min_lr_ratio",
    "max_steps": "train.steps", "num_steps": "train.steps", "total_steps": "train.steps",
    "iterations": "train.steps", "iters": "train.steps", "train_steps": "train.steps",
    "batch": "train.batch_size", "bs": "train.batch_size", "global_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size",
    "micro_batch": "train.micro_batch_size", "accum_batch_size": "train.micro_batch_size",
    "zero": "train.zero_stage", "stage": "train.zero_stage", "zero_optimization": "train.zero_stage",
    "dtype": "train.precision", "amp": "train.precision", "mixed_precision": "train.precision",
    "random_seed": "train.seed", "num_threads": "train.threads", "torch_threads": "train.threads",
    "dist_backend": "train.backend",
    "num_workers": "data.workers", "loader_workers": "data.workers", "prefetch_factor": "data.prefetch",
    "train_data": "data.train", "val_data": "data.eval", "eval_data": "data.eval",
    "model_name": "model.name", "arch": "model.name", "architecture": "model.name",
    "eval_every": "eval.every", "val_frequency": "eval.every", "eval_steps": "eval.every",
    "eval_interval": "eval.every", "zeroshot_templates": "eval.templates", "prompts": "eval.templates",
    "save_every": "checkpoint.every", "save_steps": "checkpoint.every", "checkpoint_every": "checkpoint.every",
    "save_frequency": "checkpoint.every", "keep_last": "checkpoint.keep", "save_total_limit": "checkpoint.keep",
    "resume_from": "checkpoint.resume", "resume_from_checkpoint": "checkpoint.resume",
    "log_every": "log.every", "log_interval": "log.every", "logging_steps": "log.every",
    "report_to": "log.tensorboard", "timeout": "dist.timeout_s",
    "output": "output_dir", "out_dir": "output_dir", "logs": "output_dir", "logdir": "output_dir",
    "save_dir": "output_dir",
}  # fmt: skip


def meant(name: str, known) -> str | None:
    """The known key meant by ``name`` by meaning alone: the same key in another section ("train.lr" ->
    "optim.lr") or another trainer's name for it ("learning_rate" -> "optim.lr"); None if neither."""
    known = list(known)
    tail = str(name).rsplit(".", 1)[-1].lower().replace("-", "_")
    elsewhere = [k for k in known if k.rsplit(".", 1)[-1] == tail]  # "train.lr": the key of another section
    if len(elsewhere) == 1:
        return elsewhere[0]
    if ALIASES.get(tail) in known:
        return ALIASES[tail]
    return None


def suggestion(name: str, known) -> str | None:
    """The known key (or section) meant by ``name``: an alias by meaning first, then the closest spelling.

    The one suggestion of the trainer's config names: files, overrides and ``fastclip train`` options
    (:func:`fastclip.train.cli.suggest_option`) all ask it."""
    known = list(known)
    by_meaning = meant(name, known)
    if by_meaning is not None:
        return by_meaning
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    if not close and "." in str(name):  # compare the key part alone ("train.stepz" -> "train.steps")
        tail = str(name).split(".", 1)[1]
        tails = {k.split(".", 1)[-1]: k for k in known}
        close = [tails[m] for m in difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.6)]
    return close[0] if close else None


def unknown(what: str, name: str, known) -> str:
    close = suggestion(name, known)
    hint = f" (did you mean {close!r}?)" if close else ""
    return f"unknown config {what} {shown(name)}{hint}"


def unknown_many(problems: list[str]) -> str:
    """One message for several unknown keys/sections (each from :func:`unknown`)."""
    if len(problems) == 1:
        return problems[0]
    parts = [p.replace("unknown config ", "", 1) for p in problems]
    return f"{len(problems)} unknown config names: " + "; ".join(parts)


def coerce(name: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{name}: expected one of {tname(tp)}, got {shown(value)}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}: expected true or false, got {shown(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{name}: expected an int, got {shown(value)}")
        try:
            out = int(value) if not isinstance(value, float) else None
        except ValueError:
            out = None
        if out is None and isinstance(value, float) and value.is_integer():
            out = int(value)
        if out is None:
            raise ConfigError(f"{name}: expected an int, got {shown(value)}")
        return out
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {shown(value)}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {shown(value)}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {shown(value)}")
        return value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {shown(value)}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {shown(value)}")
        return dict(value)
    raise AssertionError(f"unsupported config type {tp!r} for {name}")


def key_list(name: str, value, known: list[str]) -> list[str] | None:
    """None, "a.b", "a.b,c.d" or ["a.b", ...] -> a list of known config keys (or ConfigError)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{name}: expected a list of config keys such as [train.steps], got {shown(value)}")
    for key in items:
        if key not in known:
            raise ConfigError(f"{name}: {unknown('key', key, known)}")
    return items


def tname(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args) + " or none"


def choice(name, value, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name}: expected one of {list(choices)}, got {shown(value)}{hint}")


def minimum(name, value, lo) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}: expected an int >= {lo}, got {shown(value)}")


def positive_float(name, value) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
        raise ConfigError(f"{name}: expected a finite number > 0, got {shown(value)}")


def nonneg_float(name, value) -> None:
    if not (isinstance(value, (int, float)) and value >= 0 and value != float("inf")):
        raise ConfigError(f"{name}: expected a finite number >= 0, got {shown(value)}")


def read_file(path: str) -> dict:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:  # a binary file, or text in another encoding
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"config file {path!r}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at line {line}); "
            "save it as UTF-8"
        ) from None
    is_json = str(path).endswith(".json")
    try:
        data = json.loads(text) if is_json else load_yaml(text)
    except ConfigError as exc:
        raise ConfigError(f"config file {path!r}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path!r} does not parse: nested too deeply") from None
    except Exception as exc:  # the parser's message says where
        raise ConfigError(f"config file {path!r} does not parse: {shown_text(str(exc))}") from exc
    if data is None and (is_json or _has_content(text)):  # an explicit null, not an empty file
        raise ConfigError(f"config file {path!r}: expected a mapping of sections, got null")
    return {} if data is None else data


def _has_content(text: str) -> bool:
    """Whether a YAML text holds more than comments and document markers (an empty file: the defaults)."""
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#") and s not in ("---", "..."):
            return True
    return False


def shown_text(text: str, limit: int = 2 * SHOWN_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` without anchors and aliases (``&a``, ``*a``, merge keys ``<<: *a``).

    A config has no use for them, and nested aliases expand exponentially when the values are built:
    a 377-byte file of nine aliases per level held 1.9 GB and kept growing. Refused while composing,
    before any value is built, with the line of the first one."""
    return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)


class _NoAliasLoader(yaml.SafeLoader):
    def compose_node(self, parent, index):
        event = self.peek_event()
        anchor = getattr(event, "anchor", None)
        if isinstance(event, yaml.AliasEvent) or anchor is not None:
            kind, sign = ("alias", "*") if isinstance(event, yaml.AliasEvent) else ("anchor", "&")
            raise ConfigError(
                f"line {event.start_mark.line + 1}: YAML {kind} {sign}{shown_text(str(anchor), 40)} refused "
                "(anchors and aliases are not accepted in configs; write the values out)"
            )
        return super().compose_node(parent, index)


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars/lists/maps ("1e-3", "true", "[0.9, 0.95]", "none"); anchors
    and aliases refused (:func:`load_yaml`)."""
    if text.strip().lower() in ("none", "null", "~"):
        return None
    try:
        return load_yaml(text)
    except ConfigError:
        raise
    except Exception:
        return text
