"""Loss providers compared by ``fastclip bench loss``: one callable per implementation, same inputs.

Every provider is ``fn(loss, x, y, scale, bias) -> 0-dim loss`` where ``loss`` is "clip" or "siglip",
``x``/``y`` are (B, D) features and ``scale``/``bias`` the already-exponentiated scale and the bias, as
open_clip passes them. A provider that cannot run here says why (``available``) instead of failing.

=================  =====================================================================
name               what runs
=================  =====================================================================
fastclip-triton    ``fastclip.clip_loss(..., impl="triton")`` (fused kernels; CUDA only)
fastclip-torch     ``impl="torch"`` (chunked PyTorch, bounded memory)
reference          ``impl="reference"`` (materializes the B×B logits)
open_clip          open_clip's ``ClipLoss`` / ``SigLipLoss`` (its ``loss.py``, loaded alone)
inf_cl             Inf-CL's ``cal_inf_loss``, once per direction and averaged (CLIP only, CUDA only)
=================  =====================================================================
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import torch

PROVIDERS = ("fastclip-triton", "fastclip-torch", "reference", "open_clip", "inf_cl")
LOSSES = ("clip", "siglip")


@dataclass(frozen=True)
class Provider:
    name: str
    fn: Callable
    losses: tuple[str, ...] = LOSSES


@functools.lru_cache(maxsize=1)
def load_open_clip_loss():
    """open_clip's ``loss.py`` as a stand-alone module, or None when open_clip_torch is not installed.

    The package ``open_clip`` imports torchvision at import time; its ``loss.py`` needs only torch, so
    it is loaded from its file without importing the package (same approach as ``tests/utils.py``).
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("_fastclip_bench_open_clip_loss", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def _fastclip(impl: str) -> Callable:
    from fastclip import clip_loss, siglip_loss

    def fn(loss, x, y, scale, bias):
        if loss == "clip":
            return clip_loss(x, y, scale, impl=impl)
        return siglip_loss(x, y, scale, bias, impl=impl)

    return fn


def _open_clip(module) -> Callable:
    clip, siglip = module.ClipLoss(), module.SigLipLoss()

    def fn(loss, x, y, scale, bias):
        return clip(x, y, scale) if loss == "clip" else siglip(x, y, scale, bias)

    return fn


def _inf_cl_head_dim(dim: int) -> int:
    # cal_inf_loss views the features as (B, D // head_dim, head_dim); its default head_dim is 256.
    for h in (256, 128, 64, 32, 16):
        if dim % h == 0:
            return h
    raise ValueError(f"inf_cl: feature dim must be a multiple of 16, got {dim}")


def _inf_cl(cal_inf_loss) -> Callable:
    try:  # releases differ in whether head_dim can be passed
        takes_head_dim = "head_dim" in inspect.signature(cal_inf_loss).parameters
    except (TypeError, ValueError):
        takes_head_dim = False

    def fn(loss, x, y, scale, bias):
        if loss != "clip":
            raise ValueError(f"inf_cl: only the softmax (clip) loss exists, got loss={loss!r}")
        kw = {"head_dim": _inf_cl_head_dim(x.shape[1])} if takes_head_dim else {}
        # As Inf-CLIP's own training loss does: one call per direction, averaged. The scale multiplies
        # the features here rather than going in as scale=: given a scale, cal_inf_loss all-reduces its
        # gradient, which needs a process group (a single-process bench has none). Same arithmetic.
        return (cal_inf_loss(scale * x, y, **kw) + cal_inf_loss(scale * y, x, **kw)) / 2

    return fn


def get_provider(name: str, device: torch.device) -> tuple[Provider | None, str]:
    """``(provider, "")`` when ``name`` can run on ``device``, else ``(None, reason)``."""
    if name not in PROVIDERS:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {name!r}")
    if name == "fastclip-triton":
        from fastclip.ops import triton_available

        if device.type != "cuda":
            return None, "needs a CUDA device (the Triton interpreter on CPU is for tests, not timing)"
        if not triton_available(device):
            return (
                None,
                "fastclip's Triton kernels are not available (fastclip.ops.triton_available is False)",
            )
        return Provider(name, _fastclip("triton")), ""
    if name == "fastclip-torch":
        return Provider(name, _fastclip("torch")), ""
    if name == "reference":
        return Provider(name, _fastclip("reference")), ""
    if name == "open_clip":
        try:
            module = load_open_clip_loss()
        except Exception as exc:  # a broken install should not stop the other providers
            return None, f"open_clip's loss.py failed to load: {type(exc).__name__}: {exc}"
        if module is None:
            return None, "open_clip_torch is not installed"
        return Provider(name, _open_clip(module)), ""
    # inf_cl
    if device.type != "cuda":
        return None, "Inf-CL's kernels need a CUDA device"
    try:
        from inf_cl import cal_inf_loss
    except Exception as exc:
        return None, f"inf_cl does not import: {type(exc).__name__}: {exc}"
    return Provider(name, _inf_cl(cal_inf_loss), losses=("clip",)), ""
