"""``benchmarks/device_check.sh --dry-run``: the GPU device check, end to end on CPU (Triton
interpreter, tiny sizes), so that a GPU session spends its time measuring, not debugging."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")


def test_usage_errors_exit_2(tmp_path):
    for args in ([], ["--wheels"], [str(tmp_path), "extra"], [str(tmp_path), "--bogus"]):
        proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage:" in proc.stderr, (args, proc.stderr)


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_the_results(tmp_path):
    from fastclip.bench.report import validate_document

    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for the dry run
    proc = subprocess.run(
        ["bash", SCRIPT, str(out), "--dry-run"], env=env, capture_output=True, text=True, timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    status = dict(ln.split() for ln in (out / "status.txt").read_text().splitlines())
    assert status == {p: "0" for p in ("env", "correctness", "target", "phases", "million", "pytest_gpu")}
    doc = json.loads((out / "results.json").read_text())
    validate_document(doc)
    got = {(r["loss"], r["provider"], r["status"]) for r in doc["records"]}
    assert got == {(loss, p, "ok") for loss in ("clip", "siglip") for p in ("fastclip-triton", "reference")}
    assert all(r["repeats"] >= 5 for r in doc["records"])
    full = json.loads((out / "device_check.json").read_text())
    assert full["correctness"]["failed"] == 0 and full["correctness"]["repeat"]["ok"] is True
    assert {"tile kernel", "dX GEMM", "dY GEMM"} <= set(full["phases"]["clip_grad"])
    assert [r["finite"] for r in full["million"]["rows"]] == [True, True]
    lines = proc.stdout.splitlines()
    for prefix in (
        "correctness:",
        "target clip",
        "target siglip",
        "phases clip_grad",
        "million clip",
        "pytest -m gpu:",
    ):
        assert sum(ln.startswith(prefix) for ln in lines) == 1, prefix
    for name in ("device_check.log", "versions.txt", "results.csv", "pytest_gpu.log"):
        assert (out / name).stat().st_size > 0, name
