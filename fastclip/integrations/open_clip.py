"""open_clip's code, and its trainer open_clip_train, running fastclip's losses: ``patch()``.

    from fastclip.integrations.open_clip import patch

    with patch():                       # or: handle = patch(); ...; handle.unpatch()
        open_clip_train.main.main(argv) # create_loss now builds fastclip's ClipLoss, SigLipLoss, ...

or, without writing code: ``python -m fastclip.integrations.open_clip_train <open_clip_train arguments>``.

Why a patch and not an import line: ``open_clip.factory.create_loss`` (what open_clip_train calls)
reads ``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss`` and ``CoCaLoss`` from ``open_clip.factory``'s
own namespace (its ``from .loss import ...`` line), so replacing ``open_clip.loss.ClipLoss`` alone
changes nothing there. ``patch()`` replaces each of the four names wherever open_clip defines it:
``open_clip.factory``, ``open_clip.loss`` and the package ``open_clip`` (which exports three of
them); names a module does not define are not added. fastclip's classes take open_clip's
constructor arguments (``create_loss``'s calls included) and give open_clip's numbers.

- Undo: ``handle.unpatch()`` or leaving the ``with`` block restores open_clip's classes. Handles
  are counted: with several ``patch()`` calls (nested ``with`` blocks, a library and its user both
  patching), open_clip's classes come back when the last handle is undone.
- Idempotent: a second ``patch()`` replaces nothing again (fastclip's classes are never wrapped
  in themselves); a second ``unpatch()`` of one handle does nothing.
- Objects already built keep their class: patch before the loss is created (open_clip_train
  creates it in ``main``, after parsing its arguments).
- ``import fastclip`` and importing this module never import open_clip; ``patch()`` does, and
  raises ``ModuleNotFoundError`` when open_clip_torch is not installed (``ImportError`` when it is
  installed but does not import, with open_clip's own reason).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings

__all__ = ["LOSS_NAMES", "OpenClipPatch", "is_patched", "patch"]

#: The loss classes replaced, in the order open_clip's ``create_loss`` tries them.
LOSS_NAMES = ("DistillClipLoss", "CoCaLoss", "SigLipLoss", "ClipLoss")
# Where open_clip looks the names up: create_loss reads the factory's globals; users and other
# libraries read open_clip.loss and the package.
_MODULES = ("open_clip.factory", "open_clip.loss", "open_clip")

_lock = threading.RLock()
_handles = 0  # live handles; the originals are restored when this drops back to 0
_replaced: list[tuple[object, str, type, type]] = []  # (module, name, open_clip's class, fastclip's)


def _import_open_clip() -> list:
    if importlib.util.find_spec("open_clip") is None:
        raise ModuleNotFoundError(
            "fastclip.integrations.open_clip.patch() needs open_clip, which is not installed "
            "(pip install open_clip_torch)",
            name="open_clip",
        )
    try:
        modules = [importlib.import_module(m) for m in _MODULES]
    except ImportError as exc:
        raise ImportError(
            f"fastclip.integrations.open_clip.patch(): open_clip is installed but does not import: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    factory = modules[0]
    if not callable(getattr(factory, "create_loss", None)) or "ClipLoss" not in vars(factory):
        version = getattr(modules[2], "__version__", "unknown")
        raise ImportError(
            "fastclip.integrations.open_clip.patch(): expected open_clip.factory to define create_loss "
            f"and import ClipLoss (open_clip_torch 2.x/3.x), got open_clip {version} without them"
        )
    return modules


def _fastclip_losses() -> dict[str, type]:
    from fastclip.losses import ClipLoss, SigLipLoss
    from fastclip.losses_distill import CoCaLoss, DistillClipLoss

    return {
        "ClipLoss": ClipLoss,
        "SigLipLoss": SigLipLoss,
        "DistillClipLoss": DistillClipLoss,
        "CoCaLoss": CoCaLoss,
    }


def _apply() -> None:
    modules = _import_open_clip()
    ours = _fastclip_losses()
    replaced = []
    for module in modules:
        for name in LOSS_NAMES:
            current = vars(module).get(name)
            if current is None or current is ours[name]:
                continue
            replaced.append((module, name, current, ours[name]))
    for module, name, _, new in replaced:
        setattr(module, name, new)
    _replaced[:] = replaced


def _restore() -> None:
    for module, name, original, new in _replaced:
        current = vars(module).get(name)
        if current is new:
            setattr(module, name, original)
        else:
            warnings.warn(
                f"fastclip.integrations.open_clip: {module.__name__}.{name} was replaced by {current!r} after "
                "patch(); it is left as it is",
                RuntimeWarning,
                stacklevel=3,
            )
    _replaced.clear()


class OpenClipPatch:
    """What :func:`patch` returns: ``unpatch()`` (or the end of a ``with`` block) undoes this patch."""

    def __init__(self) -> None:
        self._active = True

    @property
    def active(self) -> bool:
        """Whether this handle still holds the patch (``unpatch()`` not called yet)."""
        return self._active

    @property
    def replaced(self) -> tuple[str, ...]:
        """The names replaced in open_clip, e.g. ``"open_clip.factory.ClipLoss"`` (empty once undone)."""
        with _lock:
            if not self._active:
                return ()
            return tuple(f"{module.__name__}.{name}" for module, name, _, _ in _replaced)

    def unpatch(self) -> None:
        """Give this handle back; open_clip's classes are restored when no handle is left. Idempotent."""
        global _handles
        with _lock:
            if not self._active:
                return
            self._active = False
            _handles -= 1
            if _handles == 0:
                _restore()

    def __enter__(self) -> OpenClipPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.unpatch()

    def __repr__(self) -> str:
        state = "active" if self._active else "undone"
        return f"<fastclip.integrations.open_clip patch, {state}: {len(self.replaced)} names replaced>"


def patch() -> OpenClipPatch:
    """Replace open_clip's ``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss``, ``CoCaLoss`` by fastclip's.

    The names are replaced in ``open_clip.factory`` (where ``create_loss``, and so open_clip_train,
    looks them up), ``open_clip.loss`` and the package ``open_clip``. Returns a handle whose
    ``unpatch()`` (or the end of a ``with`` block) undoes it; see the module's docstring.

    Raises:
        ModuleNotFoundError: open_clip_torch is not installed.
        ImportError: open_clip is installed but does not import, or has no ``factory.create_loss``.
    """
    global _handles
    with _lock:
        if _handles == 0:
            _apply()
        _handles += 1
        return OpenClipPatch()


def is_patched() -> bool:
    """Whether some handle from :func:`patch` is still active in this process."""
    with _lock:
        return _handles > 0
