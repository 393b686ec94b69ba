"""Export: the fp32 weights of a checkpoint (any ZeRO stage) as one safetensors file, in one process,
without the launcher; nothing in the checkpoint is unpickled beyond tensors and allow-listed classes.

    export_safetensors("runs/a/checkpoints", "runs/a/weights.safetensors")
    load_pretrained("runs/a/weights.safetensors")      # the model config travels in the file's metadata

The model's config (the run's ``model_config.json``, found next to the checkpoints root) is written into the
file's metadata as ``fastclip_config``, as :func:`fastclip.models.save_fastclip` does, after checking it
against the weights' names and shapes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys

import torch

from fastclip.train.checkpoint import DS_TAG, CheckpointError, resolve, verify
from fastclip.train.config_values import shown

MODEL_CONFIG = "model_config.json"  # written by the trainer into the run directory


def find_model_config(ckpt_dir: str) -> str | None:
    """The run's ``model_config.json`` for a checkpoint directory: in it, in the checkpoints root above it,
    or in the run directory above that (``DIR/checkpoints/step_X`` -> ``DIR/model_config.json``)."""
    here = os.path.abspath(ckpt_dir)
    for _ in range(3):
        candidate = os.path.join(here, MODEL_CONFIG)
        if os.path.isfile(candidate):
            return candidate
        here = os.path.dirname(here)
    return None


def _config_metadata(model_config, state: dict, ckpt_dir: str) -> dict:
    """``{"fastclip_config": JSON}`` for ``model_config`` (a ModelConfig, a dict, a path to a JSON file, or
    None: the run's model_config.json, if any), checked against the weights; {} when there is none. A
    config given that does not fit raises; a run's model_config.json that does not (a model of the
    caller's own, see ``train(cfg, model=...)``) is left out with a one-line note on stderr."""
    from fastclip.models.configs import ModelConfig, config_from_file_dict
    from fastclip.models.jsonfile import read_json
    from fastclip.models.weights import FORMAT_KEY, check_state_dict, expected_shapes

    where = "model_config"
    if model_config is None:
        found = find_model_config(ckpt_dir)
        if found is None:
            return {}
        try:
            return _config_metadata(found, state, ckpt_dir)
        except (CheckpointError, TypeError, ValueError) as exc:  # e.g. a run with a model of the caller's own
            print(f"fastclip export: the weights are written without a model config: {exc}", file=sys.stderr)
            return {}
    if isinstance(model_config, (str, os.PathLike)):
        where = os.fspath(model_config)
        model_config = read_json(where)
    if isinstance(model_config, dict):
        model_config = config_from_file_dict(model_config, where)
    if not isinstance(model_config, ModelConfig):
        raise TypeError(
            "model_config: expected a ModelConfig, a dict, a path to a model_config.json or None, got "
            f"{type(model_config).__name__}"
        )
    try:
        check_state_dict(expected_shapes(model_config), state, source=ckpt_dir)
    except ValueError as exc:
        raise CheckpointError(f"{where} does not describe the checkpoint's weights: {exc}") from exc
    return {FORMAT_KEY: json.dumps(model_config.to_dict())}


def export_safetensors(ckpt_dir: str, out_path: str, model_config=None) -> str:
    """Plain fp32 weights of a checkpoint (any ZeRO stage) -> a safetensors file. Works offline, one process.

    ``model_config``: the model's config for the file's metadata (a ModelConfig, a dict or a path to a
    JSON file); None takes the run's ``model_config.json`` (see :func:`find_model_config`), and without
    one the file carries no config (``load_pretrained`` then needs a model name).
    """
    from fastclip.train.safe_load import load_pickle, safe_zero_to_fp32

    for name, value in (("ckpt_dir", ckpt_dir), ("out_path", out_path)):
        if not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name}: expected a path (str or os.PathLike), got {type(value).__name__}")
    ckpt_dir, out_path = os.fspath(ckpt_dir), os.fspath(out_path)
    if os.path.isdir(out_path):
        raise CheckpointError(
            f"{out_path}: is a directory; expected the path of the file to write, e.g. "
            f"{os.path.join(out_path, 'model.safetensors')}"
        )
    ckpt_dir = resolve(ckpt_dir)
    verify(ckpt_dir)
    ds_dir = os.path.join(ckpt_dir, DS_TAG)
    zero_files = [
        n for n in os.listdir(ds_dir) if "optim_states" in n and n.startswith(("zero_", "bf16_zero_"))
    ]
    if zero_files:
        with (
            open(os.devnull, "w") as null,
            contextlib.redirect_stdout(null),
            contextlib.redirect_stderr(null),
            safe_zero_to_fp32() as z,
        ):
            state = z.get_fp32_state_dict_from_zero_checkpoint(
                ckpt_dir, tag=DS_TAG
            )  # chatty: prints progress
    else:  # ZeRO stage 0: DeepSpeed stores the module's state dict as it is
        model_file = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
        loaded = load_pickle(model_file)
        if not isinstance(loaded, dict) or not isinstance(loaded.get("module"), dict):
            raise CheckpointError(f"{model_file}: key 'module': expected the model's state dict")
        state = loaded["module"]
    state = {
        k: v.detach().float().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)
    }
    config_meta = _config_metadata(model_config, state, ckpt_dir)
    _write(out_path, state, {"format": "pt", "source": os.path.abspath(ckpt_dir), **config_meta})
    return out_path


def _write(out_path: str, state: dict, metadata: dict) -> None:
    """``save_file`` into ``OUT.tmp``, then renamed: a failure (a read-only or full filesystem) is one
    :class:`OSError` naming ``out_path`` and the reason, and leaves no file behind; the file gets the
    mode of any other new file (safetensors writes 0600 through a temporary file)."""
    from safetensors import SafetensorError

    from fastclip.models.weights import save_safetensors

    tmp = out_path + ".tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        save_safetensors(state, tmp, metadata=metadata)
        os.replace(tmp, out_path)
    except (OSError, SafetensorError) as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        code, reason = getattr(exc, "errno", None), getattr(exc, "strerror", None)
        found = re.search(r"I/O error: (.+?) \(os error (\d+)\)", str(exc))  # safetensors' wording
        if reason is None and found:
            reason, code = found.group(1), int(found.group(2))
        err = OSError(f"cannot write {out_path}: {reason or shown(str(exc).strip())}")
        err.errno = code
        raise err from None
