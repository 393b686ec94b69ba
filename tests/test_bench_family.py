"""``fastclip bench loss --loss mnrl``: the family benchmark writes a valid result file with the fused and
materialized providers side by side, and records a provider that cannot fit as skipped (never started)."""

import json
import subprocess
import sys

from fastclip.bench import family, report


def test_cli_writes_side_by_side_records(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip.cli", "bench", "loss", "--loss", "mnrl", "--batch", "64", "--dim", "8",
         "--negatives", "0,2", "--repeats", "1", "--out", str(tmp_path), "--name", "m"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "m.json").read_text())
    report.validate_document(doc)
    got = {(r["provider"], r["negatives"]) for r in doc["records"]}
    assert got == {(p, k) for p in ("fastclip-torch", "materialized") for k in (0, 2)}
    assert all(
        r["status"] == "ok" and r["fwd_bwd_ms"] > 0 and r["peak_mem_bytes"] > 0 for r in doc["records"]
    )
    assert "B=64 K=2 fastclip-torch / materialized: time" in proc.stdout


def test_a_provider_that_cannot_fit_is_skipped(monkeypatch):
    monkeypatch.setattr(family, "_available_bytes", lambda: 1 << 10)  # 1 KiB free: nothing fits
    doc = family.run_family_bench(
        ["fastclip-torch", "materialized"],
        32,
        4,
        [1],
        "float32",
        __import__("torch").device("cpu"),
        repeats=1,
        log=lambda m: None,
    )
    report.validate_document(doc)
    assert {r["status"] for r in doc["records"]} == {"skipped"}
    assert all("not run: needs at least" in r["message"] for r in doc["records"])
    assert any("not run" in line for line in family.ratio_lines(doc["records"])) or not family.ratio_lines(
        doc["records"]
    )


def test_bad_negatives_argument():
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip.cli", "bench", "loss", "--loss", "mnrl", "--negatives", "1,-2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--negatives: expected ints >= 0" in proc.stderr
