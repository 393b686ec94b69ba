"""Test setup: the Triton interpreter on machines without CUDA, and the ``gpu`` marker's skip.

TRITON_INTERPRET must be set before triton is imported (triton.jit reads it when a kernel is
decorated), so it is set here, before any fastclip import.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
