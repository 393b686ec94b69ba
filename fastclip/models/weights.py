"""Weight files and strict loading: read a state dict from safetensors / torch files (``weights_only``)
or a Hugging Face directory, write fastclip's safetensors, and copy converted tensors into a model
all-or-nothing (names and shapes checked first; :class:`WeightLoadError` lists what does not fit).
"""

from __future__ import annotations

import json
import os

import torch

from fastclip.models.jsonfile import read_json_object
from fastclip.models.model import CLIP

FORMAT_KEY = "fastclip_config"
TORCH_EXTS = (".bin", ".pt", ".pth")


class WeightLoadError(ValueError):
    """The weights do not fit the model: carries ``missing``, ``unexpected`` and ``mismatched`` keys."""

    def __init__(self, message, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)


# ----------------------------------------------------------------------------------------------- files


def read_state_dict(path) -> tuple[dict, dict]:
    """(tensors, metadata) from a .safetensors or a torch file (weights_only), or a Hugging Face
    directory's weights (single or sharded). Training checkpoints {"state_dict": ...} and DDP
    ``module.`` prefixes are unwrapped."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_hf_dir_weights(path), {}
    if not os.path.isfile(path):
        raise ValueError(f"path: expected an existing file or directory, got {path!r}")
    meta: dict = {}
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        sd = {}
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                for k in f.keys():
                    sd[k] = f.get_tensor(k)
        except Exception as exc:  # safetensors raises its own error type for corrupt files
            raise ValueError(f"path: {path!r} is not a readable safetensors file ({exc})") from exc
    elif path.endswith(TORCH_EXTS):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"path: {path!r} could not be read with torch.load(weights_only=True) ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}). Only plain tensor state dicts are accepted; "
                "TorchScript archives (OpenAI's original .pt) must be converted to a state dict first."
            ) from exc
        sd = obj
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict):
            raise ValueError(
                f"path: expected a state dict (dict of tensors) in {path!r}, got {type(sd).__name__}"
            )
    else:
        raise ValueError(
            f"path: expected a .safetensors, .bin, .pt or .pth file or a directory, got {path!r}"
        )
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    # OpenAI state dicts carry three python ints (input_resolution, context_length, vocab_size): drop them.
    for k in bad:
        if k in ("input_resolution", "context_length", "vocab_size"):
            sd.pop(k)
        else:
            raise ValueError(
                f"path: expected only tensors in the state dict, key {k!r} holds {type(sd[k]).__name__}"
            )
    return sd, meta


def shard_files(index: str, weight_map) -> list[str]:
    """The shard file names of an index's ``weight_map``: each a relative path inside the index's directory.
    An absolute path or one with a ``..`` part (weights read from outside the model directory) raises
    ``ValueError`` naming the index and the entry."""
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: expected a 'weight_map' object of file names")
    files = sorted(set(weight_map.values()))
    for name in files:
        parts = name.replace("\\", "/").split("/")  # "" first: a leading slash; "C:": a drive
        if parts[0] == "" or ":" in parts[0] or ".." in parts or os.path.isabs(name):
            raise ValueError(
                f"{index}: weight_map names {name[:200]!r}, outside the model directory; expected a file "
                "name relative to it (no absolute path, no '..')"
            )
    return files


def _read_hf_dir_weights(path: str) -> dict:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            weight_map = read_json_object(index, "a shard index object").get("weight_map")
            files = shard_files(index, weight_map)
            sd = {}
            for name in files:
                sd.update(read_state_dict(os.path.join(path, name))[0])
            return sd
        if os.path.isfile(os.path.join(path, single)):
            return read_state_dict(os.path.join(path, single))[0]
    raise ValueError(
        f"path: no weights in directory {path!r} (expected model.safetensors, pytorch_model.bin or a sharded index)"
    )


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file``, then the mode of any other new file (0666 less the umask):
    safetensors writes through a temporary file created 0600, so its files were unreadable to others
    beside 0644 JSON and YAML files."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    save_file(tensors, path, metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def save_fastclip(model: CLIP, path) -> None:
    """Write the model's weights as safetensors, with its config (JSON) in the file's metadata."""
    if not isinstance(model, CLIP):
        raise TypeError(f"model: expected a fastclip CLIP model, got {type(model).__name__}")
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors(sd, path, metadata={"format": "pt", FORMAT_KEY: json.dumps(model.config.to_dict())})


# ----------------------------------------------------------------------------------------------- loading


def _fix_scalars(sd: dict) -> dict:
    for k in ("logit_scale", "logit_bias"):
        if k in sd and sd[k].dim() == 0:
            sd[k] = sd[k].reshape(1)
    return sd


def expected_shapes(config) -> dict:
    """``{name: shape}`` of the state dict a model of ``config`` has, computed without allocating it
    (the model is built on the ``meta`` device)."""
    with torch.device("meta"):
        model = CLIP(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(own: dict, sd: dict, unconverted=(), source: str = "weights", hint: str = "") -> dict:
    """Check ``sd`` (fastclip names) against a model's ``{name: shape}`` ``own``: every name and shape.
    Returns ``sd`` with 0-dim logit scale/bias reshaped to (1,); raises :class:`WeightLoadError` listing
    what does not fit (``hint``, when given, is its first line after the source)."""
    sd = _fix_scalars(dict(sd))
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(set(k for k in sd if k not in own) | set(unconverted))
    mismatched = sorted(
        f"{k}: expected {tuple(own[k])}, got {tuple(sd[k].shape)}"
        for k in own
        if k in sd and tuple(own[k]) != tuple(sd[k].shape)
    )
    if missing or unexpected or mismatched:

        def block(title, items):
            if not items:
                return ""
            shown = "\n    ".join(items[:25])
            more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
            return f"\n  {title} ({len(items)}):\n    {shown}{more}"

        raise WeightLoadError(
            f"{source}: {hint + '; ' if hint else ''}the weights do not match the model; nothing was loaded."
            + block("missing keys (in the model, not in the file)", missing)
            + block("unexpected keys (in the file, not in the model)", unexpected)
            + block("shape mismatches", mismatched),
            missing,
            unexpected,
            mismatched,
        )
    return sd


def load_state_dict_checked(model: CLIP, sd: dict, unconverted=(), source: str = "weights") -> None:
    """Copy ``sd`` (fastclip names) into ``model`` after checking every name and shape; raises
    :class:`WeightLoadError` (and copies nothing) on any mismatch."""
    own = model.state_dict()
    sd = check_state_dict({k: tuple(v.shape) for k, v in own.items()}, sd, unconverted, source)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightLoadError(f"{source}: non-finite values (NaN/Inf) in {bad[:10]}; nothing was loaded.")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k].to(dtype=v.dtype))
