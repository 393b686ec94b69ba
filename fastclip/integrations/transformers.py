"""Hugging Face transformers' dual encoders computing their ``return_loss=True`` loss with fastclip: one line.

    import fastclip.integrations.transformers as fct

    handle = fct.patch(model)           # this instance; or fct.patch(CLIPModel); or fct.patch() for all
    out = model(**batch, return_loss=True)   # out.loss: the fused loss, transformers' numbers
    handle.undo()                       # or: with fct.patch(model): ...

Why a patch: ``CLIPModel.forward`` (and SigLIP's, AltCLIP's, ...) builds the B x B matrix
``logits_per_text`` inside ``forward`` and takes the loss from it; transformers has no hook to swap
the loss. ``patch`` replaces ``forward`` (of one instance, or of a class) by a forward that, when
``return_loss`` is true, runs the model's own towers, projections and normalization, then the fused
loss (:func:`fastclip.clip_loss` / :func:`fastclip.siglip_loss`) on the normalized embeddings, which
never builds the B x B matrix. Calls without ``return_loss`` run transformers' forward untouched.

Covered (transformers 5.x; the argument lists of their forwards are checked when patching):

=============================  =======  ==========================================================
class                          loss     embeddings the loss sees
=============================  =======  ==========================================================
``CLIPModel``                  softmax  ``get_image_features`` / ``get_text_features`` pooled, projected
``ChineseCLIPModel``           softmax  as CLIP (text: first token, ``token_type_ids`` passed on)
``AltCLIPModel``               softmax  towers' ``[1]`` (pooler output), then the projections
``VisionTextDualEncoderModel`` softmax  towers' ``[1]`` (pooler output), then the projections
``SiglipModel``                sigmoid  towers' ``pooler_output`` (no projection), ``logit_bias``
``Siglip2Model``               sigmoid  as SigLIP; ``pixel_attention_mask`` / ``spatial_shapes``
=============================  =======  ==========================================================

Each normalizes as its own forward does and uses ``logit_scale.exp()`` unclamped (as transformers
does); the loss equals transformers' to float32 rounding, with the gradients of every parameter,
``logit_scale`` and ``logit_bias`` included. Subclasses are covered when they do not override
``forward`` (one that does is refused: fastclip cannot know what it computes).

The output keeps its class and fields. ``logits_per_image`` / ``logits_per_text`` are never used for
the loss; whether they are computed at all is ``logits=``:

* ``"eval"`` (default): computed when the model is in eval mode (``model.eval()``, as Trainer's
  evaluation and any zero-shot classification run), ``None`` in training mode. A training step
  then holds no B x B tensor at all.
* ``"always"``: computed in every call (e.g. to log in-batch accuracy during training; the matrix is
  built for the caller, with autograd, as transformers builds it).
* ``"never"``: ``None`` whenever ``return_loss`` is true.

A tuple output (``return_dict=False``) is positional, so it always carries the logits (a missing
field would shift the others). Calls without ``return_loss`` are transformers' own forward, logits
included.

Distributed: the loss is local (this process's batch, transformers' behaviour) unless
``global_loss=True``; then, with an initialized process group of more than one process, it is the
loss over every rank's batch (:mod:`fastclip.distributed`, ``dist_impl="gather"`` all-gathers the
embeddings, ``"ring"`` passes them around a ring): every rank returns the loss of the concatenated
global batch, and each rank's gradients are its share, so that DDP's gradient average (Trainer,
accelerate) is the gradient of that global loss. Without a process group (or with one process) it
is the local loss. Every rank must call with the same local batch size.

Undo: ``handle.undo()`` (or leaving the ``with`` block) restores transformers' forward. Patching a
model or class that is already patched (by this module, directly or through its class) raises
``RuntimeError``, as does ``undo()`` of a handle already undone; a ``with`` block whose handle was
undone inside it does not undo again. A forward captured while patched (e.g. by a wrapper that
stored ``model.forward``) runs transformers' own code once the handle is undone.

``import fastclip`` never imports transformers; this module imports it only inside ``patch``.

Layout: the covered models (where each lives, its loss, how it reaches its embeddings) are
:mod:`fastclip.integrations._transformers_models`; the forward that ``patch`` installs is
:mod:`fastclip.integrations._transformers_forward`; this module resolves targets, installs and undoes.
"""

from __future__ import annotations

import importlib
import inspect
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

# The model table and the patched forward live in their own modules; their names stay importable here.
from fastclip.integrations._transformers_forward import (  # noqa: F401
    _SIGLIP_DIST_IMPL,
    _distributed_world,
    _fused_forward,
    _loss,
    _make_forward,
    _Options,
    _State,
)
from fastclip.integrations._transformers_models import (  # noqa: F401
    FAMILIES,
    SUPPORTED,
    _encode_altclip,
    _encode_clip,
    _encode_dual_encoder,
    _encode_siglip,
    _Family,
    _norm_l2,
    _norm_sum_pow,
)

__all__ = ["LOGITS_MODES", "SUPPORTED", "TransformersPatch", "is_patched", "patch"]

#: What ``logits=`` accepts (see the module's docstring).
LOGITS_MODES = ("eval", "always", "never")
#: What ``dist_impl=`` accepts: the CLIP family's "gather" / "ring"; SigLIP's ring is "bidir".
DIST_IMPLS = ("gather", "ring")
_NAME = "fastclip.integrations.transformers.patch"

# ----------------------------------------------------------------------------------------------------
# Targets: classes and instances.

_lock = threading.RLock()


def _family_base(cls: type) -> type | None:
    """The first class in ``cls``'s MRO that is one of transformers' covered classes."""
    for klass in cls.__mro__:
        family = FAMILIES.get(klass.__name__)
        if family is not None and klass.__module__ == family.module:
            return klass
    return None


def _is_ours(fn) -> bool:
    return getattr(fn, "_fastclip_state", None) is not None and fn._fastclip_state.active


def _original_forward(base: type) -> Callable:
    fn = base.__dict__["forward"]
    while getattr(fn, "_fastclip_state", None) is not None:  # a patched (or stale) forward of ours
        fn = fn.__wrapped__
    return fn


def _describe(target) -> str:
    return target.__name__ if isinstance(target, type) else f"an instance of {type(target).__name__}"


def _resolve(target) -> tuple[type, _Family, type, Callable]:
    """(transformers' class, its family, its output class, its original forward) for a class/instance."""
    cls = target if isinstance(target, type) else type(target)
    base = _family_base(cls)
    if base is None:
        hint = ""
        if not isinstance(target, type):  # a wrapper (DDP, PEFT): name the model inside
            for how in ("module", "get_base_model"):
                inner = getattr(target, how, None)
                inner = inner() if how == "get_base_model" and callable(inner) else inner
                if isinstance(inner, torch.nn.Module) and _family_base(type(inner)) is not None:
                    call = ".module" if how == "module" else ".get_base_model()"
                    hint = f"; it wraps a {type(inner).__name__}: patch that ({call})"
                    break
        raise TypeError(
            f"{_NAME}: expected one of {', '.join(SUPPORTED)} (a class, a subclass or an instance), "
            f"got {_describe(target)}{hint}"
        )
    family = FAMILIES[base.__name__]
    original = _original_forward(base)
    params = tuple(inspect.signature(original).parameters)
    if params != family.params:
        raise TypeError(
            f"{_NAME}: {base.__name__}.forward of this transformers release takes {params}; fastclip knows "
            f"{family.params} (transformers 5.x) and does not patch a forward it has not been written for"
        )
    # A subclass with its own forward computes something fastclip cannot know.
    for klass in cls.__mro__:
        if klass is base:
            break
        fn = klass.__dict__.get("forward")
        if fn is not None and getattr(fn, "_fastclip_state", None) is None:
            raise TypeError(
                f"{_NAME}: {klass.__name__} overrides {base.__name__}.forward; fastclip can only replace "
                f"transformers' own forward"
            )
    output_cls = getattr(importlib.import_module(family.module), family.output)
    return base, family, output_cls, original


def _patched_by(target) -> str | None:
    """Who already patches ``target`` (a description), or None."""
    if not isinstance(target, type):
        fn = target.__dict__.get("forward")
        if _is_ours(getattr(fn, "__func__", None)):
            return "this instance is already patched"
        cls = type(target)
    else:
        cls = target
    for klass in cls.__mro__:
        if _is_ours(klass.__dict__.get("forward")):
            where = "" if klass is target else f" through {klass.__name__}"
            return f"{_describe(target)} is already patched{where}"
    return None


@dataclass
class _Installed:
    target: Any  # class or instance
    forward: Callable  # what was installed
    previous: Any  # the class's own __dict__ forward (None: inherited) / None for instances


def _install(target, state: _State) -> _Installed:
    base, family, output_cls, original = _resolve(target)
    forward = _make_forward(original, family, output_cls, state)
    if isinstance(target, type):
        previous = target.__dict__.get("forward")
        target.forward = forward
        return _Installed(target, forward, previous)
    target.forward = types.MethodType(forward, target)  # an instance attribute: nn.Module calls it
    return _Installed(target, forward, None)


def _uninstall(item: _Installed) -> None:
    target = item.target
    if isinstance(target, type):
        current = target.__dict__.get("forward")
        if current is not item.forward:
            warnings.warn(
                f"fastclip.integrations.transformers: {target.__name__}.forward was replaced by {current!r} after "
                "patch(); it is left as it is (it runs transformers' forward where it calls the patched one)",
                RuntimeWarning,
                stacklevel=4,
            )
        elif item.previous is None:
            delattr(target, "forward")
        else:
            target.forward = item.previous
        return
    current = target.__dict__.get("forward")
    if getattr(current, "__func__", None) is item.forward:
        del target.__dict__["forward"]
    # else: something (e.g. accelerate's autocast wrapper) wrapped the patched forward afterwards; the
    # wrapper stays, and the patched forward inside it now runs transformers' own code (state inactive).


class TransformersPatch:
    """What :func:`patch` returns: ``undo()`` (or the end of a ``with`` block) restores transformers' forward."""

    def __init__(self, state: _State, installed: list[_Installed]) -> None:
        self._state = state
        self._installed = installed

    @property
    def active(self) -> bool:
        """Whether the patch is in place (``undo()`` not called yet)."""
        return self._state.active

    @property
    def targets(self) -> tuple[str, ...]:
        """What this handle patches: class names, or ``"<instance of X>"``."""
        return tuple(
            t.target.__name__ if isinstance(t.target, type) else f"<instance of {type(t.target).__name__}>"
            for t in self._installed
        )

    @property
    def options(self) -> dict:
        o = self._state.options
        return dict(global_loss=o.global_loss, dist_impl=o.dist_impl, logits=o.logits, impl=o.impl,
                    chunk_size=o.chunk_size)  # fmt: skip

    def undo(self) -> None:
        """Restore transformers' forward on every target of this handle. Raises if already undone."""
        with _lock:
            if not self._state.active:
                raise RuntimeError(
                    f"fastclip.integrations.transformers: this patch of {self._where()} was already undone"
                )
            self._state.active = False
            for item in self._installed:
                _uninstall(item)

    def _where(self) -> str:
        return ", ".join(self.targets) or "nothing"

    def __enter__(self) -> TransformersPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._state.active:
            self.undo()

    def __repr__(self) -> str:
        state = "active" if self._state.active else "undone"
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"<fastclip.integrations.transformers patch, {state}: {self._where()}; {opts}>"


def _check_options(global_loss, dist_impl, logits, impl, chunk_size) -> None:
    if not isinstance(global_loss, bool):
        raise TypeError(f"{_NAME}: global_loss: expected a bool, got {global_loss!r}")
    if dist_impl not in DIST_IMPLS:
        raise ValueError(f"{_NAME}: dist_impl: expected one of {DIST_IMPLS}, got {dist_impl!r}")
    if logits not in LOGITS_MODES:
        raise ValueError(f"{_NAME}: logits: expected one of {LOGITS_MODES}, got {logits!r}")
    from fastclip.ops.inputs import loss_options

    loss_options(impl=impl, chunk_size=chunk_size, check_finite=False, allow_reference=False)


def _import_transformers() -> None:
    try:
        importlib.import_module("transformers")
    except ImportError as exc:
        if (getattr(exc, "name", None) or "").split(".")[0] == "transformers":
            raise ModuleNotFoundError(
                f"{_NAME}() needs transformers, which is not installed", name="transformers"
            ) from exc
        raise ImportError(
            f"{_NAME}(): transformers is installed but does not import: {type(exc).__name__}: {exc}"
        ) from exc


def _all_classes() -> list[type]:
    classes = []
    for name, family in FAMILIES.items():
        try:
            module = importlib.import_module(family.module)
        except ImportError:  # an older release without this model: nothing to patch there
            continue
        cls = getattr(module, name, None)
        if cls is not None:
            classes.append(cls)
    return classes


def patch(
    model_or_class=None,
    *,
    global_loss: bool = False,
    dist_impl: str = "gather",
    group=None,
    logits: str = "eval",
    impl: str = "auto",
    chunk_size: int | None = None,
) -> TransformersPatch:
    """Make ``model(..., return_loss=True)`` compute its loss with fastclip's fused loss.

    Args:
        model_or_class: a model instance (only that object), a class (every instance of it and of its
            subclasses) among :data:`SUPPORTED` or a subclass of one, or None: every covered class this
            transformers release has.
        global_loss: the loss over every rank's batch (``torch.distributed``), equal to the loss of
            the concatenated batch in one process; False (default): this process's batch.
        dist_impl: with ``global_loss``: ``"gather"`` (all-gather, default) or ``"ring"``.
        group: the process group (default: WORLD).
        logits: ``"eval"`` (default), ``"always"`` or ``"never"``: when the output's
            ``logits_per_image``/``logits_per_text`` are computed (module docstring).
        impl, chunk_size: the fused loss's implementation (``"auto"``, ``"torch"``, ``"triton"``) and
            rows per chunk (None: fastclip's default workspace), as for :func:`fastclip.clip_loss`.

    Returns a :class:`TransformersPatch`: ``undo()``, or use it as a context manager.

    Raises:
        TypeError: not a covered model/class (or a subclass overriding ``forward``); a bad option type.
        ValueError: a bad option value.
        RuntimeError: the target (or, for None, one of the classes) is already patched.
    """
    _check_options(global_loss, dist_impl, logits, impl, chunk_size)
    _import_transformers()
    targets = _all_classes() if model_or_class is None else [model_or_class]
    with _lock:
        for target in targets:
            _resolve(target)  # all errors before anything is replaced
            already = _patched_by(target)
            if already is not None:
                raise RuntimeError(f"{_NAME}: {already}; undo that patch first")
        state = _State(_Options(global_loss, dist_impl, group, logits, impl, chunk_size))
        installed = [_install(target, state) for target in targets]
        return TransformersPatch(state, installed)


def is_patched(model_or_class) -> bool:
    """Whether ``model_or_class`` (an instance or a class) runs a patched forward now."""
    with _lock:
        return _patched_by(model_or_class) is not None
