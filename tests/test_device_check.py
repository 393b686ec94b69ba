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
    assert "distill" in proc.stderr and "trainer" in proc.stderr


def _report():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import device_report
        import device_targets
    finally:
        sys.path.pop(0)
    return device_report, device_targets


def _write(out, name, doc):
    (out / f"part_{name}.json").write_text(json.dumps(doc))


def test_targets_table_from_part_files(tmp_path):
    """The one table: each target, the measured value, met / NOT met / no data, from synthetic parts."""
    _, targets = _report()
    out = tmp_path
    gib = 2**30
    rows = []
    for loss in ("clip", "siglip"):
        for b in (32768, 65536):
            rows += [
                {"loss": loss, "batch": b, "provider": "fastclip-triton", "status": "ok", "fwd_bwd_ms": 20.0,
                 "tflops": 400.0, "peak_mem_bytes": gib // 4, "fraction_of_bxbxd_matmul": 0.5},
                {"loss": loss, "batch": b, "provider": "open_clip", "status": "ok", "fwd_bwd_ms": 30.0,
                 "peak_mem_bytes": 16 * gib},
                {"loss": loss, "batch": b, "provider": "reference", "status": "ok", "fwd_bwd_ms": 10.0,
                 "peak_mem_bytes": 16 * gib},
            ]  # fmt: skip
    rows.append({"loss": "clip", "batch": 32768, "provider": "inf_cl", "status": "ok", "fwd_bwd_ms": 400.0,
                 "peak_mem_bytes": gib})  # fmt: skip
    _write(out, "target", {"batches": [32768, 65536], "rows": rows, "matmul_tflops": {"32768": 800.0},
                           "skipped": {"memeff": "skipped: memeff does not import (ModuleNotFoundError)"}})  # fmt: skip
    fam = [{"negatives": k, "provider": p, "fwd_bwd_ms": ms, "peak_mem_bytes": mem}
           for k in (0, 1, 7) for p, ms, mem in (("fastclip-triton", 19.0, 400), ("materialized", 4.0, 16000),
                                                  ("st_mnrl", 40.0, 16000))]  # fmt: skip
    _write(out, "family", {"rows": fam, "skipped": {}})
    _write(
        out,
        "distill",
        {"check": {"max_rel_err": 4e-3, "rel_err_bf16_reference": [6e-3], "ok": True}, "rows": []},
    )
    _write(out, "million", {"rows": [{"loss": "clip", "seconds": 19.3, "finite": True},
                                     {"loss": "siglip", "error": "not run: time limit"}]})  # fmt: skip
    _write(out, "correctness", {"results": [{"dtype": "float32", "tf32": False, "ok": True},
                                            {"dtype": "float32", "tf32": True, "ok": False}]})  # fmt: skip
    (out / "status.txt").write_text("pytest 0\ntrainer missing\n")
    (out / "times.txt").write_text("install 9\npytest 80 90\ntotal 401\n")
    (out / "pytest.log").write_text("....\n==== 40 passed, 2 skipped in 79.1s ====\n")
    got = {r[0]: r[1:] for r in targets.target_rows(str(out))}
    assert got["clip B=32768: fastclip vs open_clip (time <= 1.0x, memory <= 5%)"][1] == "met"
    assert (
        got["clip B=32768: fastclip vs reference (time <= 1.0x, memory <= 5%)"][1] == "NOT met"
    )  # 2x slower
    assert got["clip B=32768: fastclip vs Inf-CL (time <= 0.5x)"] == ["time 0.05x (20 / 400 ms)", "met"]
    assert got["clip B=32768: fastclip vs memeff (time <= 1.0x)"][0].startswith(
        "skipped: memeff does not import"
    )
    assert got["siglip B=32768: fastclip vs siglip-kernel (time <= 1.0x)"] == ["not measured", "no data"]
    assert got["info_nce K=1 vs materialized MNRL (time <= 1.0x, memory <= 5%)"][1] == "NOT met"
    assert got["info_nce K=7 vs sentence-transformers' MNRL, bf16 autocast (time <= 0.7x)"][1] == "met"
    assert got["distill: fused vs fp32 reference, relative error of loss and gradients <= 2e-2"] == [
        "max 0.004 (bf16 materialized: 0.006)",
        "met",
    ]
    assert got["distill: fastclip vs open_clip DistillClipLoss (time <= 1.0x, memory <= 5%)"][1] == "no data"
    assert got["B=2^20 clip, siglip and info_nce K=1 complete (finite)"][1] == "NOT met"
    assert got["TF32 contract: fp32 IEEE and fp32+TF32 kernels within their error budgets"] == [
        "IEEE 1/1, TF32 0/1; all cases 1/2", "NOT met"]  # fmt: skip
    assert got["pytest -m gpu (trainer test excluded): passes in <= 90 s"][1] == "met"
    assert got["trainer end to end (tests/test_gpu_trainer.py) passes"][1] == "no data"
    assert got["whole check <= 420 s (install included)"] == ["401 s", "met"]
    assert got["matmul rate: fused clip fwd+bwd >= 60% of the BxBxD bf16 matmul"][1] == "NOT met"
    table = targets.format_table(targets.target_rows(str(out)))
    assert (
        table.splitlines()[0].split(" | ")[0].strip() == "target" and len(table.splitlines()) == len(got) + 2
    )
    assert targets.markdown_table([["a|b", "1", "met"]]).splitlines()[-1] == "| a\\|b | 1 | met |"


def test_collect_default_dest_names_the_gpu_and_date(tmp_path):
    import io
    import tarfile

    report, _ = _report()
    bundle = tmp_path / "b.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        for name, text in (
            ("./part_env.json", '{"device": "NVIDIA H200"}'),
            ("./versions.txt", "date: 2026-12-04T16:44:35Z\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    dest = report.default_dest(str(bundle))
    assert os.path.dirname(dest) == os.path.join(ROOT, "benchmarks", "results")
    assert os.path.basename(dest).startswith("h200-2026-12-04")


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
    """Every part of the default list, one call (CPU, interpreter, tiny sizes): the part files, the
    summary lines, the one table at the end, the bundle, and collect unpacking it."""
    from fastclip.bench.report import validate_document

    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for the dry run
    bundle = tmp_path / "back" / "dc.tar.gz"
    proc = subprocess.run(
        ["bash", SCRIPT, str(out), "--dry-run", "--bundle", str(bundle)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    status = dict(ln.split() for ln in (out / "status.txt").read_text().splitlines())
    parts = ("env", "correctness", "target", "family", "distill", "million", "phases", "vit", "pytest")
    assert {p: status.get(p) for p in parts} == {p: "0" for p in parts}, status
    has_trainer = os.path.exists(os.path.join(ROOT, "tests", "test_gpu_trainer.py"))
    assert status["trainer"] == ("0" if has_trainer else "missing")
    times = [ln.split() for ln in (out / "times.txt").read_text().splitlines()]
    assert times[0][0] == "install" and times[-1][0] == "total"
    doc = json.loads((out / "results.json").read_text())
    validate_document(doc)
    got = {(r["loss"], r["batch"], r["provider"], r["status"]) for r in doc["records"]}
    want = {(loss, b, p, "ok") for loss in ("clip", "siglip") for b in (64, 128)
            for p in ("fastclip-triton", "reference", "open_clip")}  # fmt: skip
    assert got == want, got
    full = json.loads((out / "device_check.json").read_text())
    assert full["correctness"]["failed"] == 0 and full["correctness"]["repeat"]["ok"] is True
    assert {"tile kernel", "dX GEMM", "dY GEMM"} <= set(full["phases"]["clip_grad"])
    assert [(r["loss"], r["finite"]) for r in full["million"]["rows"]] == [
        ("clip", True), ("siglip", True), ("info_nce_k1", True)]  # fmt: skip
    assert full["env"]["imported_from"]["fastclip.kernels"].endswith(os.path.join("kernels", "__init__.py"))
    assert set(full["target"]["skipped"]) == {"inf_cl", "siglip_kernel", "memeff"}  # CPU: all need CUDA
    assert all(v.startswith("skipped: ") for v in full["target"]["skipped"].values())
    fam = full["family"]
    assert (
        fam["status"] == "ok"
        and len(fam["checks"]) == 3
        and {r["negatives"] for r in fam["rows"]} == {0, 1, 7}
    )
    assert all(r["fwd_bwd_ms"] > 0 and r["peak_mem_bytes"] > 0 for r in fam["rows"])
    dist = full["distill"]
    assert (
        dist["status"] == "ok"
        and dist["check"]["ok"]
        and {r["provider"] for r in dist["rows"]} >= {"reference"}
    )
    assert all(r["samples_per_s"] > 0 for r in full["vit"]["rows"]) and full["vit"]["packed"]["mask_ms"] > 0
    assert full["vit"]["attention"]["auto_packed=False"] == "sdpa"  # CPU
    lines = proc.stdout.splitlines()
    for prefix in ("correctness:", "target clip bf16 B=64", "target siglip bf16 B=128", "phases clip_grad",
                   "million clip", "family K=7 materialized", "distill check", "pytest -m gpu:"):  # fmt: skip
        assert sum(ln.startswith(prefix) for ln in lines) == 1, prefix
    # The one table, last: a header, a rule, one row per target.
    rows = full["targets"]
    assert len(rows) >= 25 and {r["verdict"] for r in rows} <= {"met", "NOT met", "no data"}
    head = lines.index(
        next(ln for ln in lines if ln.startswith("target ") and ln.rstrip().endswith("verdict"))
    )
    assert len([ln for ln in lines[head + 2 :] if " | " in ln]) == len(rows)
    assert (out / "targets.md").read_text().count("\n| ") == len(rows) + 1
    for name in ("device_check.log", "versions.txt", "results.csv", "pytest.log", "times.txt"):
        assert (out / name).stat().st_size > 0, name
    # The bundle (what comes back from the device machine) holds all of it; collect unpacks and plots.
    assert [p.name for p in bundle.parent.iterdir()] == ["dc.tar.gz"]
    dest = tmp_path / "collected"
    assert _collect(bundle, dest) == 0
    for name in ("results.json", "device_check.json", "device_check.log", "status.txt", "summary.md"):
        assert (dest / name).stat().st_size > 0, name
    assert json.loads((dest / "results.json").read_text()) == doc
    summary = (dest / "summary.md").read_text()
    assert summary.count("\ncorrectness: ") == 1 and summary.count("\nmillion ") == 3
    assert "## Targets of the check" in summary and "| whole check <= 420 s" in summary
    assert "| clip | bf16 | 32 | 128 | fastclip-triton |" in summary
    pytest.importorskip("matplotlib")
    assert (dest / "results_time.png").stat().st_size > 0 and (dest / "results_memory.png").stat().st_size > 0


@pytest.mark.slow
def test_dry_run_tune_part_writes_the_table(tmp_path):
    """The opt-in ``tune`` part on CPU (interpreter, tiny sizes, two candidates per kernel): every
    candidate checked against float64 then timed, two candidates compiled for sm_90 by the parallel
    workers, the winners as JSON and as a ``TUNED`` snippet that kernels/config.py can hold, and the
    issue's targets measured with the shipped and the tuned table (not speed: the plumbing)."""
    from fastclip.kernels import config

    out = tmp_path / "tune"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run", "--parts", "tune"],
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "tune 0" in (out / "status.txt").read_text()
    doc = json.loads((out / "part_tune.json").read_text())
    assert doc["status"] == "ok" and doc["dry_run"] is True
    pre = doc["precompile"]
    assert pre["cap"] == 90 and pre["jobs"] == 2 and pre["ok"] == 2, pre
    rows = doc["rows"]
    assert [r["kernel"] for r in rows] == ["lse", "lse", "tile", "tile", "siglip", "siglip"]
    assert all(r["ms"] > 0 and r["error_vs_budget"] <= 1.0 for r in rows), rows
    assert {r["config"].split("+")[1] if "+" in r["config"] else "" for r in rows} == {"", "exp2"}
    table = json.loads((out / "tuned_table.json").read_text())
    assert sorted(t["key"][1] for t in table) == ["lse", "siglip", "tile"] and table == doc["winners"]
    namespace = {"TileConfig": config.TileConfig}
    exec(doc["tuned_snippet"], namespace)  # the snippet is the Python that kernels/config.py would hold
    assert {k[1]: v.name() for k, v in namespace["TUNED"].items()} == {t["key"][1]: t["name"] for t in table}
    assert [(t["table"], t["loss"]) for t in doc["targets"]] == [
        (tab, loss) for tab in ("shipped", "tuned") for loss in ("clip", "clip", "siglip", "siglip")]  # fmt: skip
    assert all(t["ms"] > 0 for t in doc["targets"])
    assert "TUNED: dict[" in proc.stdout and proc.stdout.count("\ntarget tuned ") == 4
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("tune (tuned table): ")]
    assert len(lines) == 4 and all(ln.rstrip().endswith(("met", "NOT met")) for ln in lines)


@pytest.mark.interpreter
def test_dry_run_tune_family_part_writes_the_table(tmp_path):
    """The opt-in ``tune_family`` part on CPU (interpreter, tiny sizes, two candidates per kernel): each
    of the family's kernels checked against float64 and timed, winners as ``TUNED`` entries of its own
    keys, and the MNRL call timed with the shipped and the tuned table (the plumbing, not speed)."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "tf"
    proc = subprocess.run(["bash", SCRIPT, str(out), "--dry-run", "--parts", "tune_family"],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "part_tune_family.json").read_text())
    assert doc["status"] == "ok" and doc["dry_run"] is True
    assert {r["kernel"] for r in doc["rows"]} == {"family-lse", "family-grad"}
    assert all(r.get("error_vs_budget", 9) <= 1.0 and r.get("ms", 0) > 0 for r in doc["rows"]), doc["rows"]
    table = json.loads((out / "tuned_table_family.json").read_text())
    assert sorted(t["key"][1] for t in table) == ["family-grad", "family-lse"]
    namespace = {"TileConfig": __import__("fastclip.kernels.config", fromlist=["TileConfig"]).TileConfig}
    exec(doc["tuned_snippet"], namespace)
    assert len(namespace["TUNED"]) == 2
    assert [t["table"] for t in doc["timing"]] == ["shipped", "tuned"] and all(
        t["ms"] > 0 for t in doc["timing"]
    )
