"""Loading DeepSpeed's checkpoint files without running code from them.

DeepSpeed 0.19.8 reads its ``.pt`` files with ``torch.load(weights_only=False)`` (full pickle: a
crafted file runs code) and has no option to do otherwise. Here every such read goes through
``torch.load(weights_only=True)`` with an allow-list of the few DeepSpeed classes its files hold
(:data:`ALLOWED_GLOBALS`); a file that needs anything else is refused with
:class:`UnsafeCheckpointError`, naming the file and the global.

    make_engine_loads_safe(engine)        # engine.load_checkpoint(...) now loads with weights_only=True
    with safe_zero_to_fp32() as z:        # DeepSpeed's ZeRO -> fp32 merge, same restriction
        state = z.get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag="ds")
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re

import torch

# "module.name" of every class DeepSpeed 0.19.8 pickles into its checkpoints (ZeRO 0-3, fp32/bf16/fp16),
# found with torch.serialization.get_unsafe_globals_in_checkpoint on checkpoints of each kind. These
# are plain data classes (an enum, two loss-scaler state holders, a dataclass); unpickling them sets
# attributes, nothing else.
ALLOWED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs Python objects outside the allow-list; nothing was run or loaded."""


def _allowed() -> list:
    out = []
    for dotted in ALLOWED_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that class is simply not allowed
            continue
    return out


def load_pickle(path, map_location="cpu", mmap: bool | None = None):
    """``torch.load(path, weights_only=True)`` with :data:`ALLOWED_GLOBALS`; UnsafeCheckpointError otherwise."""
    with torch.serialization.safe_globals(_allowed()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file needs Python objects beyond tensors and the allowed "
                f"DeepSpeed classes ({_reason(exc)})"
            ) from None


def _reason(exc: BaseException) -> str:
    """The unpickler's own reason (e.g. "Unsupported global: GLOBAL os.system"), without torch's advice."""
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
    text = found.group(1) if found else type(exc).__name__
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text.split(" was not an allowed global")[0].strip()[:200]


def make_engine_loads_safe(engine) -> None:
    """Route ``engine.load_checkpoint``'s file reads through :func:`load_pickle`.

    Targets DeepSpeed 0.19.8: ``DeepSpeedEngine.checkpoint_engine`` (a ``TorchCheckpointEngine``) is
    what ``load_checkpoint`` reads the model, optimizer and ZeRO partition files with
    (``checkpoint_engine.load(path, map_location)``); its ``load`` is replaced on this one instance."""
    ce = getattr(engine, "checkpoint_engine", None)
    if ce is None or not callable(getattr(ce, "load", None)):
        import deepspeed

        raise RuntimeError(
            f"engine.checkpoint_engine.load: expected DeepSpeed's checkpoint engine (written for DeepSpeed "
            f"0.19.8), not found in DeepSpeed {deepspeed.__version__}; refusing to load with full pickle"
        )

    def load(path, map_location=None):
        return load_pickle(path, map_location=map_location)

    ce.load = load


class _SafeTorch:
    """``torch`` as DeepSpeed's zero_to_fp32 module sees it, with ``load`` restricted."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, weights_only=None, **_):
        return load_pickle(f, map_location=map_location, mmap=mmap)


@contextlib.contextmanager
def safe_zero_to_fp32():
    """DeepSpeed's ``deepspeed.utils.zero_to_fp32`` module with its ``torch.load`` calls restricted.

    Targets DeepSpeed 0.19.8, whose zero_to_fp32 calls ``torch.load(..., weights_only=False)`` through
    its module-level ``torch`` name; that name is swapped for the duration of the block."""
    from unittest import mock

    from deepspeed.utils import zero_to_fp32

    with mock.patch.object(zero_to_fp32, "torch", _SafeTorch()):
        yield zero_to_fp32
