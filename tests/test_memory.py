"""The memory contract of the "torch" implementation: nothing of size B×B, forward or backward.

Two independent instruments, both deterministic (no timing):
* a dispatch mode that records the largest tensor any ATen op returns (what autograd saves and every
  intermediate the implementation makes), which must stay at one chunk;
* the peak resident memory of a fresh process (VmHWM after clear_refs) above its inputs, compared
  with the materialized reference at a size where B×B dominates.
Each test also shows its instrument sees the B×B matrices of the reference, so it can fail.
"""

import os
import subprocess
import sys

import pytest
from utils import LargestOutput, features, scalar

from fastclip import clip_loss, siglip_loss


def _run(fn, b, d, **kw):
    x, y, s, bias = features(b, d), features(b, d, seed=1), scalar(10.0), scalar(-5.0)
    loss = fn(x, y, s, bias, **kw)
    loss.backward()


@pytest.mark.parametrize("fn", [clip_loss, siglip_loss])
def test_no_tensor_of_b_by_b_elements(fn):
    b, d, chunk = 1024, 32, 64
    with LargestOutput() as mode:
        _run(fn, b, d, impl="torch", chunk_size=chunk)
    assert mode.largest <= chunk * b, f"largest tensor {mode.largest} elements > one chunk ({chunk * b})"
    with LargestOutput() as ref_mode:
        _run(fn, b, d, impl="reference")
    assert ref_mode.largest >= b * b  # the instrument sees the materialized matrix


def _peak_bytes(loss, impl, b, d):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    probe = os.path.join(os.path.dirname(__file__), "_hwm_probe.py")
    out = subprocess.run(
        [sys.executable, probe, loss, impl, str(b), str(d)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_peak_memory_is_a_small_fraction_of_the_reference(loss):
    """Peak RSS above the inputs (VmHWM after clear_refs, docs/design.md "Platform facts") at B=4096, chunks of 128 rows."""
    b, d = 4096, 16
    ours = _peak_bytes(loss, "torch", b, d)
    ref = _peak_bytes(loss, "reference", b, d)
    assert ref >= 2 * b * b * 4  # at least two fp32 B×B matrices live in the reference
    assert ours <= 0.1 * ref, f"peak {ours} B is more than 10% of the reference's {ref} B"
