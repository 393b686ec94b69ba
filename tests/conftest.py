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


_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """An in-process trainer run sets RANK/WORLD_SIZE/MASTER_* for DeepSpeed (fastclip.train.parallel);
    left behind, they make a later test's libraries (accelerate, under SentenceTransformerTrainer)
    start a process group of their own. Each test gets back the environment it started with."""
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
