"""Reading the JSON files of model directories (configs, shard indexes, tokenizer files) with one-line
errors that name the file: ``json.load`` alone raises a bare ``JSONDecodeError`` that does not.

    cfg = read_json("dir/open_clip_config.json")     # ValueError "dir/open_clip_config.json: not valid JSON (...)"
"""

from __future__ import annotations

import json
import os


def parse_json(text, where: str):
    """``json.loads(text)``; a ``ValueError`` starting with ``where`` (a file name, or a file and a key)
    when ``text`` is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{where}: not valid JSON (not UTF-8 text: {exc.reason} at byte {exc.start})"
        ) from exc
    except RecursionError as exc:
        raise ValueError(f"{where}: not valid JSON (nested too deeply)") from exc


def json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words ("an array", "a string", ...)."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def read_json(path) -> object:
    """The parsed content of the JSON file ``path``; ``ValueError`` naming the file when it cannot be read
    or is not JSON."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    return parse_json(raw, path)


def read_json_object(path, what: str = "a JSON object") -> dict:
    """:func:`read_json` of a file that must hold a JSON object (``what`` describes it in the error)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{os.fspath(path)}: expected {what}, got {json_kind(data)}")
    return data
