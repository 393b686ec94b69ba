"""The one input-validation path of every loss entry point (functional, module, distributed).

Validation happens once, at the public boundary: :func:`loss_options` checks ``impl``, ``chunk_size``
and ``check_finite`` into a frozen options object (a module does it at construction), and
:func:`prepare_with_options` (CLIP, SigLIP) or :func:`prepare_distill` checks the tensors against it,
settles the feature dtype (mixed dtypes only under autocast, cast as the materialized loss's matmul
would) and resolves ``impl``; :func:`prepare` is both steps at once. Every message names the
argument, the expected and the received value. Nothing here reads a tensor's values unless
``check_finite=True``: no host synchronisation on the default path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastclip import _checks
from fastclip.ops.amp import autocast_active, common_dtype
from fastclip.ops.dispatch import resolve_impl


@dataclass(frozen=True)
class Common:
    """``impl``, ``chunk_size`` and ``check_finite``, defined once for every loss entry point (each
    construction checks them; the entries' signatures show these fields, ``fastclip/ops/signatures.py``)."""

    impl: str = "auto"
    chunk_size: int | None = None
    check_finite: bool = False

    def __post_init__(self):
        _checks.check_impl(self.impl)
        object.__setattr__(self, "chunk_size", _checks.check_chunk_size(self.chunk_size))
        _checks.check_bool("check_finite", self.check_finite)


@dataclass
class LossInputs:
    """Checked inputs: features of one dtype, scale and bias as tensors on their device."""

    x: torch.Tensor  # (n, D) image features
    y: torch.Tensor  # (N, D) text features
    scale: torch.Tensor  # 0-dim or (1,)
    bias: torch.Tensor | None
    impl: str
    chunk_size: int | None


def settle_pair(a, b, name_a="image_features", name_b="text_features", *, same_batch: bool = True):
    """A checked feature pair of one dtype. Under autocast both are cast as the materialized loss's
    matmul would cast them (:func:`fastclip.ops.amp.compute_dtype`: autocast's dtype, fp32 features
    included); mixed dtypes are accepted there only (a bf16 tower beside an fp32 one): outside
    autocast that matmul would fail, so a mismatch raises. The cast is differentiable: each gradient
    returns in its input's dtype."""
    _checks.check_features(a, b, same_batch=same_batch, same_dtype=False, name_a=name_a, name_b=name_b)
    if a.dtype != b.dtype and not autocast_active(a.device):
        raise TypeError(
            f"{name_b}: expected dtype {a.dtype} (as {name_a}), got {b.dtype} "
            "(mixed dtypes are accepted under torch.autocast only)"
        )
    dtype = common_dtype(a, b)
    return a.to(dtype), b.to(dtype)


def loss_options(*, impl="auto", chunk_size=None, check_finite=False, allow_reference: bool = True) -> Common:
    """``impl``, ``chunk_size`` and ``check_finite`` checked once, at the boundary, into the frozen
    options every entry below takes. ``allow_reference=False``: a multi-rank entry, where
    ``impl="reference"`` is refused."""
    options = Common(impl, chunk_size, check_finite)
    return options if allow_reference else no_reference(options)


def no_reference(options: Common) -> Common:
    """``options`` of a multi-rank entry, which has no ``impl="reference"``."""
    if options.impl == "reference":
        raise ValueError(
            "impl: expected 'auto', 'triton' or 'torch' here, got 'reference' "
            "(the materialized losses are in fastclip.reference)"
        )
    return options


def prepare(
    image_features,
    text_features,
    logit_scale,
    logit_bias,
    *,
    impl: str,
    chunk_size,
    check_finite,
    bias_required: bool = False,
    same_batch: bool = True,
    allow_reference: bool = True,
) -> LossInputs:
    """:func:`prepare_with_options` of options checked here."""
    options = loss_options(
        impl=impl, chunk_size=chunk_size, check_finite=check_finite, allow_reference=allow_reference
    )
    return prepare_with_options(
        image_features, text_features, logit_scale, logit_bias, options,
        bias_required=bias_required, same_batch=same_batch,
    )  # fmt: skip


def prepare_with_options(
    image_features,
    text_features,
    logit_scale,
    logit_bias,
    options: Common,
    *,
    bias_required: bool = False,
    same_batch: bool = True,
) -> LossInputs:
    """The tensors checked against checked ``options`` (:func:`loss_options`); ``impl`` resolved."""
    x, y = settle_pair(image_features, text_features, same_batch=same_batch)
    device = x.device
    scale = _checks.check_scalar("logit_scale", logit_scale, device=device)
    if logit_bias is None and bias_required:
        raise ValueError("logit_bias: expected a 0-dim or 1-element tensor (SigLIP needs a bias), got None")
    bias = None if logit_bias is None else _checks.check_scalar("logit_bias", logit_bias, device=device)
    impl = resolve_impl(options.impl, device, dtype=x.dtype)
    if options.check_finite:
        _checks.check_all_finite("image_features", image_features)
        _checks.check_all_finite("text_features", text_features)
        _checks.check_all_finite("logit_scale", scale)
        if bias is not None:
            _checks.check_all_finite("logit_bias", bias)
    return LossInputs(x, y, scale, bias, impl, options.chunk_size)


DISTILL_NAMES = ("image_features", "text_features", "dist_image_features", "dist_text_features")


@dataclass
class DistillInputs:
    """Checked inputs of the distillation loss: student and teacher pairs of one dtype each (the
    teacher's feature dim may differ), the scales as tensors on the features' device."""

    x: torch.Tensor
    y: torch.Tensor
    scale: torch.Tensor
    xt: torch.Tensor
    yt: torch.Tensor
    dist_scale: torch.Tensor
    impl: str
    chunk_size: int | None

    @property
    def tensors(self) -> tuple:
        return self.x, self.y, self.scale, self.xt, self.yt, self.dist_scale


def prepare_distill(x, y, s, xt, yt, t, options: Common) -> DistillInputs:
    """:func:`prepare_with_options` for the distillation loss's six inputs (messages name the argument)."""
    x, y = settle_pair(x, y, *DISTILL_NAMES[:2])
    xt, yt = settle_pair(xt, yt, *DISTILL_NAMES[2:])
    if xt.shape[0] != x.shape[0]:
        raise ValueError(
            f"dist_image_features: expected batch size {x.shape[0]} (as image_features), got {xt.shape[0]}"
        )
    if xt.device != x.device:
        raise ValueError(
            f"dist_image_features: expected device {x.device} (as image_features), got {xt.device}"
        )
    s = _checks.check_scalar("logit_scale", s, device=x.device)
    t = _checks.check_scalar("dist_logit_scale", t, device=x.device)
    if options.check_finite:
        for name, v in zip((*DISTILL_NAMES, "logit_scale", "dist_logit_scale"), (x, y, xt, yt, s, t)):
            _checks.check_all_finite(name, v)
    # float64 anywhere runs on the chunked PyTorch path (the kernels take 16/32-bit inputs).
    dtype = torch.float64 if torch.float64 in (x.dtype, xt.dtype) else x.dtype
    impl = resolve_impl(options.impl, x.device, dtype=dtype)
    return DistillInputs(x, y, s, xt, yt, t, impl, options.chunk_size)


def nan_if_not_finite(loss: torch.Tensor, *tensors) -> torch.Tensor:
    """Turn ``loss`` into NaN when any input holds NaN/Inf (no host sync; O(n·D) reads).

    The fused paths take maxima over tiles, and a maximum can step over a NaN; a non-finite scale
    can turn into an infinite rather than a NaN loss. This makes "non-finite inputs give a NaN loss,
    never a finite or infinite wrong number" hold for every implementation.
    """
    return torch.where(all_finite(*tensors), loss, torch.full_like(loss, float("nan")))


def all_finite(*tensors) -> torch.Tensor:
    """A 0-dim bool tensor: every element of every given tensor (None skipped) is finite. No host sync."""
    present = [t for t in tensors if t is not None]
    ok = torch.ones((), dtype=torch.bool, device=present[0].device)
    for t in present:
        t = t.detach()
        if t.dim() == 0:
            ok = ok & torch.isfinite(t)
        elif t.numel():
            # min and max carry any NaN and every infinity, and read t once without the (n, D)
            # temporaries of isfinite(t) (two bool masks and |t|: ~2x the bytes of a bf16 t).
            lo, hi = torch.aminmax(t)
            ok = ok & torch.isfinite(lo) & torch.isfinite(hi)
    return ok
