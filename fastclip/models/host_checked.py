"""Inputs whose values were checked on the host before they went to the device.

The towers check their inputs' values at every forward (finite pixels, token ids inside the vocabulary);
on CUDA each such check waits for the GPU. A caller that has checked the values of the host tensors it
then copies to the device (the trainer, ``fastclip/train/step_checks.py``) runs the forward inside
:func:`values_checked_on_host`, and the towers skip those two reads; their shape and type checks stay.
"""

from __future__ import annotations

import contextlib
import contextvars

_CHECKED = contextvars.ContextVar("fastclip_values_checked_on_host", default=False)


@contextlib.contextmanager
def values_checked_on_host():
    """Within this block the towers trust their inputs' values (see the module docstring)."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def values_checked() -> bool:
    return _CHECKED.get()
