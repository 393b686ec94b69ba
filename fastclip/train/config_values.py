"""Config values: conversion of file and command-line values to the field types, and the checks
:meth:`fastclip.train.config.Config.validate` runs; each error names the key, the expectation and the value."""

from __future__ import annotations

import difflib
import json
import os
import types
import typing
from typing import Any, Union


class ConfigError(ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


def unknown(what: str, name: str, known) -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.5)
    if not close and "." in str(name):  # compare the key part alone ("train.stepz" -> "train.steps")
        tail = str(name).split(".", 1)[1]
        tails = {k.split(".", 1)[-1]: k for k in known}
        close = [tails[m] for m in difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.6)]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config {what} {name!r}{hint}"


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
            errors[0] if len(errors) == 1 else f"{name}: expected one of {tname(tp)}, got {value!r}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{name}: expected an int, got {value!r}")
        try:
            out = int(value) if not isinstance(value, float) else None
        except ValueError:
            out = None
        if out is None and isinstance(value, float) and value.is_integer():
            out = int(value)
        if out is None:
            raise ConfigError(f"{name}: expected an int, got {value!r}")
        return out
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    raise AssertionError(f"unsupported config type {tp!r} for {name}")


def key_list(name: str, value, known: list[str]) -> list[str] | None:
    """None, "a.b", "a.b,c.d" or ["a.b", ...] -> a list of known config keys (or ConfigError)."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{name}: expected a list of config keys such as [train.steps], got {value!r}")
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
        raise ConfigError(f"{name}: expected one of {list(choices)}, got {value!r}{hint}")


def minimum(name, value, lo) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{name}: expected an int >= {lo}, got {value!r}")


def positive_float(name, value) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")):
        raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")


def nonneg_float(name, value) -> None:
    if not (isinstance(value, (int, float)) and value >= 0 and value != float("inf")):
        raise ConfigError(f"{name}: expected a finite number >= 0, got {value!r}")


def read_file(path: str) -> dict:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # the parser's message says where
        raise ConfigError(f"config file {path!r} does not parse: {exc}") from exc
    return {} if data is None else data


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars/lists/maps ("1e-3", "true", "[0.9, 0.95]", "none")."""
    import yaml

    if text.strip().lower() in ("none", "null", "~"):
        return None
    try:
        return yaml.safe_load(text)
    except Exception:
        return text
