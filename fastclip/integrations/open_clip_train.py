"""open_clip's trainer with fastclip's losses, in one command.

    python -m fastclip.integrations.open_clip_train <open_clip_train arguments>
    torchrun --nproc-per-node 8 -m fastclip.integrations.open_clip_train -- <open_clip_train arguments>

is ``python -m open_clip_train.main <arguments>`` (the same arguments, passed on unchanged) with
open_clip's loss classes replaced by fastclip's (:func:`fastclip.integrations.open_clip.patch`)
before open_clip_train builds its loss. Under ``torchrun`` every process runs this module, so every
rank patches. ``--`` before the trainer's arguments keeps torchrun's own parser off them (it
refuses open_clip_train's ``--logs`` as an ambiguous abbreviation of its ``--logs-specs``) and
torchrun drops it; without torchrun this module drops one leading ``--``, so the same argument list
works both ways.

Nothing else changes: the arguments, the data, the model, the logs and the exit status are
open_clip_train's (a ``-1`` returned by its ``main``, as for an existing experiment name, exits 1).
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _arguments(argv) -> list[str]:
    if argv is None:
        argv = sys.argv[1:]
    if isinstance(argv, str) or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"argv: expected a list of str (open_clip_train's arguments), got {argv!r}")
    argv = list(argv)
    return argv[1:] if argv[:1] == ["--"] else argv


def _prepare():
    """Patch, then import open_clip_train's ``main`` (raises ImportError naming what is missing)."""
    from fastclip.integrations.open_clip import patch

    handle = patch()
    try:
        from open_clip_train.main import main as train_main
    except ImportError as exc:
        handle.unpatch()
        raise ImportError(
            "python -m fastclip.integrations.open_clip_train needs open_clip_train, which did not import "
            f"({type(exc).__name__}: {exc}); it comes with open_clip_torch and needs its training "
            "dependencies (pip install open_clip_torch braceexpand webdataset pandas)"
        ) from exc
    return handle, train_main


def _run(handle, train_main, argv: list[str]) -> int:
    with handle:
        if _is_rank_zero():
            names = ", ".join(sorted({n.rsplit(".", 1)[1] for n in handle.replaced})) or "losses"
            print(f"fastclip: open_clip_train runs with fastclip's {names}", file=sys.stderr, flush=True)
        result = train_main(argv)
    return 1 if result == -1 else 0


def main(argv: list[str] | None = None) -> int:
    """Patch open_clip's losses, run ``open_clip_train.main.main(argv)``, undo the patch; returns the exit status.

    ``argv``: open_clip_train's arguments (default ``sys.argv[1:]``); one leading ``"--"`` is dropped.
    Raises ``ImportError`` when open_clip or open_clip_train does not import.
    """
    argv = _arguments(argv)
    handle, train_main = _prepare()
    return _run(handle, train_main, argv)


def _cli() -> int:
    argv = _arguments(None)
    try:
        handle, train_main = _prepare()
    except ImportError as exc:  # one line, not a traceback: nothing has run yet
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return _run(handle, train_main, argv)


if __name__ == "__main__":
    # Run as a file path (python .../open_clip_train.py, torchrun .../open_clip_train.py), Python puts
    # this file's directory first on sys.path, where open_clip.py beside it would shadow open_clip.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.exit(_cli())
