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
    for args in (
        [],
        ["--wheels"],
        [str(tmp_path), "extra"],
        [str(tmp_path), "--bogus"],
        [str(tmp_path), "--bundle"],
        [str(tmp_path), "--parts"],
    ):
        proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "usage:" in proc.stderr, (args, proc.stderr)


def test_bundle_must_be_a_tar_gz_outside_out(tmp_path):
    out = tmp_path / "o"
    for bundle, words in ((tmp_path / "b.zip", "expected a file name ending in .tar.gz"),
                          (out / "b.tar.gz", "must lie outside OUT")):  # fmt: skip
        proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run", "--bundle", str(bundle)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert not bundle.exists()


def test_parts_selects_what_runs(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, str(tmp_path / "x"), "--parts", "env,bogus"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert proc.returncode == 2 and "--parts: expected names from" in proc.stderr and "'bogus'" in proc.stderr
    out = tmp_path / "vit"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run", "--parts", "env,vit"],
                          env=env, capture_output=True, text=True, timeout=200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert dict(ln.split() for ln in (out / "status.txt").read_text().splitlines()) == {
        "env": "0",
        "vit": "0",
    }
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith("vit tiny bf16 batch 8 sdpa ") for ln in lines) == 2, proc.stdout[-3000:]
    assert sum(ln.startswith("packed attention: ") for ln in lines) == 1
    assert not any(ln.startswith(("correctness:", "target ", "pytest -m gpu:")) for ln in lines)
    vit = json.loads((out / "part_vit.json").read_text())
    assert all(r["samples_per_s"] > 0 and r["peak_mem_bytes"] > 0 for r in vit["rows"])
    assert vit["packed"]["mask_ms"] > 0


def test_family_part_dry_run(tmp_path):
    """The contrastive family's part: Triton epilogue against torch per variant and dtype, then the
    K = 0, 1, 7 timings (the interpreter's Triton is checked, not timed)."""
    out = tmp_path / "family"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run", "--parts", "family"],
                          env=env, capture_output=True, text=True, timeout=200)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert (out / "status.txt").read_text().split() == ["family", "0"]
    part = json.loads((out / "part_family.json").read_text())
    assert part["status"] == "ok" and len(part["checks"]) == 6
    assert {r["negatives"] for r in part["rows"]} == {0, 1, 7}
    assert all(r["fwd_bwd_ms"] > 0 and r["peak_mem_bytes"] > 0 for r in part["rows"])


def _collect(*args):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import device_report
    finally:
        sys.path.pop(0)
    return device_report.main(["collect", *map(str, args)])


def test_collect_refuses_links_escapes_and_a_used_folder(tmp_path, capsys):
    import io
    import tarfile

    def bundle(name, member):
        path = tmp_path / name
        with tarfile.open(path, "w:gz") as tar:
            tar.addfile(tarfile.TarInfo("./status.txt"), io.BytesIO(b""))
            tar.addfile(member, io.BytesIO(b"x") if member.isfile() else None)
        return path

    link = tarfile.TarInfo("./results.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    up = tarfile.TarInfo("../escape.txt")
    up.size = 1
    for path in (bundle("link.tar.gz", link), bundle("up.tar.gz", up)):
        assert _collect(path, tmp_path / ("d_" + path.name[:-7])) == 2
        assert "refusing member" in capsys.readouterr().err
        assert not (tmp_path / ("d_" + path.name[:-7])).exists()
    assert not (tmp_path / "escape.txt").exists()
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar")
    assert _collect(tmp_path / "junk.tar.gz", tmp_path / "d_junk") == 2
    assert "not a gzip tar archive" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert _collect(bundle("ok.tar.gz", tarfile.TarInfo("./part_env.json")), used) == 2
    assert "expected a new or empty folder" in capsys.readouterr().err
    assert (used / "keep.txt").read_text() == "mine" and len(list(used.iterdir())) == 1
    assert _collect(tmp_path / "missing.tar.gz", tmp_path / "d_missing") == 2


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_the_results(tmp_path):
    from fastclip.bench.report import validate_document

    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for the dry run
    bundle = tmp_path / "back" / "dc.tar.gz"
    proc = subprocess.run(
        ["bash", SCRIPT, str(out), "--dry-run", "--bundle", str(bundle)],
        env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    status = dict(ln.split() for ln in (out / "status.txt").read_text().splitlines())
    assert status == {
        p: "0"
        for p in (
            "env",
            "correctness",
            "target",
            "phases",
            "million",
            "pytest_gpu_kernels",
            "pytest_gpu_rest",
        )
    }
    doc = json.loads((out / "results.json").read_text())
    validate_document(doc)
    got = {(r["loss"], r["provider"], r["status"]) for r in doc["records"]}
    assert got == {(loss, p, "ok") for loss in ("clip", "siglip") for p in ("fastclip-triton", "reference")}
    assert all(r["repeats"] >= 5 for r in doc["records"])
    full = json.loads((out / "device_check.json").read_text())
    assert full["correctness"]["failed"] == 0 and full["correctness"]["repeat"]["ok"] is True
    assert {"tile kernel", "dX GEMM", "dY GEMM"} <= set(full["phases"]["clip_grad"])
    assert [r["finite"] for r in full["million"]["rows"]] == [True, True]
    assert full["env"]["imported_from"]["fastclip.kernels"].endswith(os.path.join("kernels", "__init__.py"))
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
    (pytest_line,) = [ln for ln in lines if ln.startswith("pytest -m gpu:")]
    assert pytest_line.count(" skipped") == 2, pytest_line  # both parts ran; on CPU each skips all
    for name in (
        "device_check.log",
        "versions.txt",
        "results.csv",
        "pytest_gpu_kernels.log",
        "pytest_gpu_rest.log",
    ):
        assert (out / name).stat().st_size > 0, name
    # The bundle (what comes back from the device machine) holds all of it; collect unpacks and plots.
    assert [p.name for p in bundle.parent.iterdir()] == ["dc.tar.gz"]
    dest = tmp_path / "collected"
    assert _collect(bundle, dest) == 0
    for name in ("results.json", "device_check.json", "device_check.log", "status.txt", "summary.md"):
        assert (dest / name).stat().st_size > 0, name
    assert json.loads((dest / "results.json").read_text()) == doc
    summary = (dest / "summary.md").read_text()
    assert summary.count("\ncorrectness: ") == 1 and summary.count("\nmillion ") == 2
    assert "| clip | bf16 | 32 | 256 | fastclip-triton |" in summary
    pytest.importorskip("matplotlib")
    assert (dest / "results_time.png").stat().st_size > 0 and (dest / "results_memory.png").stat().st_size > 0
