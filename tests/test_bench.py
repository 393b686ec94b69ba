"""The benchmark machinery: records, statuses, memory measurement, result files, CLI (tiny sizes, CPU)."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from fastclip.bench import report
from fastclip.bench.cli import parse_batches
from fastclip.bench.loss import LossSweep, flop_floor, run_loss_sweep
from fastclip.bench.memory import cpu_peak_extra_bytes, replay_memory_events
from fastclip.bench.plot import plot_document
from fastclip.bench.providers import Provider, get_provider
from fastclip.cli import main as fastclip_main


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny ops gain nothing from a second thread, and on a shared 2-core machine two OpenMP threads
    # waiting on each other made these tests 5-7x slower (measured: 2.6 s vs 18.8 s for one case).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_sweep(**kw) -> LossSweep:
    base = dict(
        providers=["fastclip-torch", "reference", "open_clip"],
        batches=[32, 64],
        dims=[16],
        dtypes=["float32"],
        losses=["clip", "siglip"],
        device="cpu",
        warmup=1,
        min_repeats=2,
        max_repeats=2,
        time_budget_s=0.01,
        matmul_size=256,
    )
    base.update(kw)
    return LossSweep(**base)


@pytest.fixture(scope="module")
def tiny_doc():
    return run_loss_sweep(tiny_sweep(), progress=False, log=lambda s: None)


def test_document_schema_and_records(tiny_doc):
    report.validate_document(tiny_doc)
    assert set(tiny_doc) == set(report.DOC_KEYS)
    assert tiny_doc["torch"] == torch.__version__
    assert tiny_doc["matmul_tflops"] > 0
    recs = tiny_doc["records"]
    assert len(recs) == 2 * 2 * 3  # losses x batches x providers
    for r in recs:
        assert r["status"] == "ok", r
        assert r["dtype"] == "float32" and r["dim"] == 16 and r["batch"] in (32, 64)
        assert r["fwd_bwd_ms_min"] <= r["fwd_bwd_ms"] <= r["fwd_bwd_ms_max"]
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["repeats"] == 2
        expected = flop_floor(r["loss"], r["batch"], r["dim"]) / (r["fwd_bwd_ms"] * 1e-3) / 1e12
        assert r["tflops"] == pytest.approx(expected, rel=1e-3)
    json.dumps(tiny_doc)  # serializable as is


def test_reference_memory_sees_the_logits(tiny_doc):
    # The materialized loss holds B×B fp32 logits (several copies): the profiler replay must see them.
    for r in tiny_doc["records"]:
        if r["provider"] == "reference":
            assert r["peak_mem_bytes"] >= r["batch"] ** 2 * 4, r


def test_flop_floor():
    assert flop_floor("clip", 10, 3) == 8 * 100 * 3
    assert flop_floor("siglip", 10, 3) == 6 * 100 * 3
    with pytest.raises(ValueError, match="loss"):
        flop_floor("triplet", 10, 3)


def test_memory_replay():
    assert replay_memory_events([(2.0, -100), (1.0, 300), (3.0, 50)]) == (300, 250)
    n = 1 << 20  # 4 MiB of fp32, allocated and freed inside; 1 MiB kept

    def f():
        tmp = torch.ones(n)
        keep = tmp[: n // 4].clone()
        del tmp
        return keep

    peak, out = cpu_peak_extra_bytes(f)
    assert out.numel() == n // 4
    assert 5 * n <= peak <= 5 * n + 65536


def _raiser(exc: Exception, from_batch: int):
    def fn(loss, x, y, scale, bias):
        if x.shape[0] >= from_batch:
            raise exc
        return (x * y).sum() * scale

    return fn


def test_oom_and_error_are_records_not_crashes():
    cfg = tiny_sweep(providers=["oomer", "broken", "reference"], batches=[16, 32, 64], losses=["clip"])
    extra = {
        "oomer": Provider("oomer", _raiser(RuntimeError("CUDA out of memory. Tried to allocate 1 GiB"), 32)),
        "broken": Provider("broken", _raiser(ValueError("bad shapes\nsecond line"), 16)),
    }
    doc = run_loss_sweep(cfg, progress=False, log=lambda s: None, extra_providers=extra)
    report.validate_document(doc)
    by = {(r["provider"], r["batch"]): r for r in doc["records"]}
    assert by[("oomer", 16)]["status"] == "ok"
    assert by[("oomer", 32)]["status"] == "oom" and "out of memory" in by[("oomer", 32)]["message"]
    assert by[("oomer", 64)]["status"] == "oom" and by[("oomer", 64)]["message"] == "not run: oom at B=32"
    assert by[("broken", 16)]["status"] == "error"
    assert by[("broken", 16)]["message"] == "ValueError: bad shapes"
    assert by[("broken", 64)]["message"] == "not run: error at B=16"
    for b in (16, 32, 64):
        assert by[("reference", b)]["status"] == "ok"
    for st in ("oom", "error"):
        r = next(r for r in doc["records"] if r["status"] == st)
        assert r["fwd_bwd_ms"] is None and r["peak_mem_bytes"] is None and r["tflops"] is None
    assert "oom" in report.records_table(doc["records"])


def test_cpu_timing_interleaves_providers_and_survives_late_failures():
    calls = []

    def logging_provider(name, fail_at_call=None):
        def fn(loss, x, y, scale, bias):
            calls.append(name)
            if fail_at_call is not None and calls.count(name) >= fail_at_call:
                raise RuntimeError("boom")
            return ((x * y).sum(-1) * scale).mean()

        return Provider(name, fn)

    cfg = tiny_sweep(
        providers=["A", "B", "C"], batches=[8], losses=["clip"], warmup=1, min_repeats=3, max_repeats=3
    )
    extra = {
        "A": logging_provider("A"),
        "B": logging_provider("B"),
        "C": logging_provider("C", fail_at_call=4),
    }
    doc = run_loss_sweep(cfg, progress=False, log=lambda s: None, extra_providers=extra)
    # prepare (warm-up + memory run) provider by provider, then timed iterations round-robin
    assert calls == [
        "A",
        "A",
        "B",
        "B",
        "C",
        "C",
        "A",
        "B",
        "C",
        "A",
        "B",
        "C",
        "A",
        "B",
    ]  # C fails at its 4th
    by = {r["provider"]: r for r in doc["records"]}
    assert by["A"]["status"] == by["B"]["status"] == "ok" and by["A"]["repeats"] == 3
    assert by["C"]["status"] == "error" and by["C"]["message"] == "RuntimeError: boom"


def test_files_json_csv_and_plots(tiny_doc, tmp_path):
    stem = str(tmp_path / report.result_stem("loss", "cpu", tiny_doc["date"]))
    assert os.path.basename(stem).startswith("loss_") and stem.endswith("_cpu")
    report.write_json(tiny_doc, stem + ".json")
    with open(stem + ".json") as f:
        assert json.load(f) == tiny_doc
    report.write_csv(tiny_doc["records"], stem + ".csv", {"device": tiny_doc["device"]})
    with open(stem + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(tiny_doc["records"])
    assert set(report.REQUIRED_RECORD_KEYS) <= set(rows[0]) and rows[0]["device"] == tiny_doc["device"]
    assert float(rows[0]["fwd_bwd_ms"]) == pytest.approx(tiny_doc["records"][0]["fwd_bwd_ms"])
    pytest.importorskip("matplotlib")
    paths = plot_document(tiny_doc, stem)
    assert paths == [stem + "_time.png", stem + "_memory.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_report_redraws_from_json(tiny_doc, tmp_path, capsys):
    path = str(tmp_path / "run.json")
    report.write_json(tiny_doc, path)
    assert fastclip_main(["bench", "report", path, "--markdown", "--plot"]) == 0
    out = capsys.readouterr().out
    assert (
        "| loss | dtype | D | B | provider |" in out and "| clip | fp32 | 16 | 64 | fastclip-torch |" in out
    )
    assert (tmp_path / "run_time.png").exists() and (tmp_path / "run_memory.png").exists()
    (tmp_path / "bad.json").write_text('{"records": []}')
    assert fastclip_main(["bench", "report", str(tmp_path / "bad.json")]) == 2


def test_ratios_and_targets():
    def rec(provider, ms, mem, loss="clip"):
        return {"loss": loss, "provider": provider, "batch": 16384, "dim": 256, "dtype": "float32",
                "fwd_ms": ms / 2, "bwd_ms": ms / 2, "fwd_bwd_ms": ms, "fwd_bwd_ms_min": ms, "fwd_bwd_ms_max": ms,
                "peak_mem_bytes": mem, "tflops": 1.0, "status": "ok"}  # fmt: skip

    recs = [rec("reference", 100.0, 1000), rec("fastclip-torch", 120.0, 50),
            rec("reference", 100.0, 1000, "siglip"), rec("fastclip-torch", 140.0, 50, "siglip")]  # fmt: skip
    rows = report.ratio_rows(recs)
    assert [round(q["time_ratio"], 2) for q in rows] == [1.2, 1.4]
    assert [q["mem_ratio"] for q in rows] == [0.05, 0.05]
    checks = report.target_checks(recs)
    assert checks[0].startswith("[met] CPU target, clip") and checks[1].startswith(
        "[short] CPU target, siglip"
    )
    assert "1.20x" in report.ratio_table(recs)


def test_inf_cl_wrapper_averages_the_two_directions():
    # A stand-in with cal_inf_loss's contract (mean over rows of lse(scale * q k^T) - positive logit):
    # the wrapper's two calls, averaged, must give the CLIP loss.
    from fastclip.bench.providers import _inf_cl, _inf_cl_head_dim
    from fastclip.reference import clip_loss_reference

    seen = []

    def cal_inf_loss(q, k, labels=None, scale=None, head_dim=256):
        # Inf-CL 1.2.1 all-reduces the gradient of a given scale: without a process group its
        # backward raises, so a single-process bench must not pass one.
        if scale is not None and not torch.distributed.is_initialized():
            raise RuntimeError("Default process group has not been initialized")
        seen.append(head_dim)
        logits = (1.0 if scale is None else scale) * q.double() @ k.double().T
        return (torch.logsumexp(logits, 1) - logits.diagonal()).mean()

    x, y = torch.randn(12, 384, dtype=torch.float64), torch.randn(12, 384, dtype=torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    got = _inf_cl(cal_inf_loss)("clip", x, y, s, None)
    torch.testing.assert_close(got, clip_loss_reference(x, y, s))
    (g,) = torch.autograd.grad(got, s)  # the scale's gradient flows through the wrapper's product
    (want,) = torch.autograd.grad(clip_loss_reference(x, y, s), s)
    torch.testing.assert_close(g, want)
    assert seen == [128, 128]  # 384 is not a multiple of 256
    assert [_inf_cl_head_dim(d) for d in (512, 768, 1024, 1152)] == [256, 256, 256, 128]
    with pytest.raises(ValueError, match="siglip"):
        _inf_cl(cal_inf_loss)("siglip", x, y, s, None)


def test_bad_input():
    with pytest.raises(ValueError, match="providers"):
        tiny_sweep(providers=["nope"]).validate()
    with pytest.raises(ValueError, match="batches"):
        tiny_sweep(batches=[0]).validate()
    with pytest.raises(ValueError, match="dtype"):
        tiny_sweep(dtypes=["int8"]).validate()
    with pytest.raises(ValueError, match="max_repeats"):
        tiny_sweep(min_repeats=3, max_repeats=2).validate()
    with pytest.raises(ValueError, match="provider"):
        get_provider("nope", torch.device("cpu"))
    prov, reason = get_provider("fastclip-triton", torch.device("cpu"))
    assert prov is None and "CUDA" in reason
    with pytest.raises(Exception, match="LO:HI"):
        parse_batches("12,x")
    with pytest.raises(ValueError, match="keys"):
        report.validate_document({"records": []})


def test_parse_batches():
    assert parse_batches("4096,8192") == [4096, 8192]
    assert parse_batches("1024:8192") == [1024, 2048, 4096, 8192]


def test_cli_loss_end_to_end(tmp_path, capsys):
    rc = fastclip_main(["bench", "loss", "--device", "cpu", "--providers", "fastclip-torch,reference",
                        "--batch", "32", "--dim", "8", "--loss", "siglip", "--repeats", "1", "--no-progress",
                        "--out", str(tmp_path), "--name", "run"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "fastclip-torch/reference" in out and "siglip" in out
    with open(tmp_path / "run.json") as f:
        doc = json.load(f)
    assert [r["provider"] for r in doc["records"]] == ["fastclip-torch", "reference"]
    assert (tmp_path / "run.csv").exists()
    assert fastclip_main(["bench", "loss", "--device", "cpu", "--dtype", "int8", "--no-save"]) == 2


# ------------------------------------------------------------------------------------------------
# fastclip bench train


def test_train_step_records():
    from fastclip.bench.train import TrainBench, run_train_bench, train_table

    cfg = TrainBench(model="tiny", device="cpu", batch=8, warmup=0, steps=1, find_max_batch=False)
    doc = run_train_bench(cfg, log=lambda s: None)
    assert [r["loss_impl"] for r in doc["records"]] == ["fastclip", "reference"]
    for r in doc["records"]:
        assert r["status"] == "ok", r
        assert r["samples_per_s"] > 0 and r["peak_mem_bytes"] > 0 and r["step_ms_min"] <= r["step_ms_max"]
        assert r["loss"] == r["loss"]  # finite number, not NaN
    assert "samples/s" in train_table(doc)
    json.dumps(doc)


def test_max_batch_search(monkeypatch):
    from fastclip.bench import train

    limit = 1000
    monkeypatch.setattr(train, "fits", lambda step, model, opt, b, dev, cap, dtype: (b <= limit, b, ""))
    monkeypatch.setattr(train, "cleanup", lambda device: None)
    cfg = train.TrainBench(model="tiny", start_batch=64, max_batch=10**6, search_seconds=60)
    res = train.find_max_batch(None, None, None, torch.device("cpu"), cfg, log=lambda s: None)
    assert limit - limit // 8 <= res["max_batch"] <= limit < res["first_failing"]
    assert [t["batch"] for t in res["tried"]][:5] == [64, 128, 256, 512, 1024]
    res = train.find_max_batch(None, None, None, torch.device("cpu"), cfg, granule=128, log=lambda s: None)
    assert res["max_batch"] % 128 == 0 and limit - 128 < res["max_batch"] <= limit
    cfg.max_batch = 300
    res = train.find_max_batch(None, None, None, torch.device("cpu"), cfg, log=lambda s: None)
    assert res["max_batch"] == 256 and res["limit"] == "max_batch cap 300"
    limit = 10
    res = train.find_max_batch(None, None, None, torch.device("cpu"), cfg, log=lambda s: None)
    assert res["max_batch"] == 0 and res["limit"].startswith("memory: even the first")


def test_train_bad_input():
    from fastclip.bench.train import TrainBench, build

    with pytest.raises(ValueError, match="batch"):
        TrainBench(model="tiny", batch=0).validate()
    with pytest.raises(ValueError, match="precision"):
        TrainBench(model="tiny", precision="fp8").validate()
    with pytest.raises(ValueError, match="model"):
        build("no-such-model", torch.device("cpu"))


def test_max_batch_with_gradient_caching_uses_less_memory():
    # One attempt per search (start = max = 32): the wiring of both searches and the measured memory.
    from fastclip.bench.train import TrainBench, run_train_bench

    cfg = TrainBench(model="tiny", device="cpu", batch=8, warmup=0, steps=1, micro_batch=8, start_batch=32,
                     max_batch=32, mem_cap_bytes=2**30, search_seconds=30, loss_impls=["fastclip"])  # fmt: skip
    doc = run_train_bench(cfg, log=lambda s: None)
    plain, cached = doc["max_batch"]
    assert plain["status"] == "ok" and cached["status"] == "ok", doc["max_batch"]
    assert not plain["grad_cache"] and cached["grad_cache"] and cached["micro_batch"] == 8
    assert plain["max_batch"] == cached["max_batch"] == 32 and plain["limit"] == "max_batch cap 32"
    (p,), (c,) = plain["tried"], cached["tried"]
    # Activations of 8 samples at a time instead of 32: clearly less memory for the same step.
    assert c["mem_bytes"] < 0.8 * p["mem_bytes"], (c, p)


# ------------------------------------------------------------------------------------------------
# CUDA paths (CUDA events, CUDA peak memory, the Triton provider); skipped without a GPU


@pytest.mark.gpu
def test_gpu_loss_sweep_records():
    cfg = tiny_sweep(providers=["fastclip-triton", "fastclip-torch", "reference"], batches=[1024, 4096, 16384], dims=[256],
                     dtypes=["bfloat16"], device="cuda", warmup=2, min_repeats=3, max_repeats=3)  # fmt: skip
    doc = run_loss_sweep(cfg, progress=False, log=lambda s: None)
    report.validate_document(doc)
    by = {(r["loss"], r["batch"], r["provider"]): r for r in doc["records"]}
    assert len(by) == 2 * 3 * 3
    for (_loss, b, _provider), r in by.items():
        assert r["status"] == "ok", r
        assert r["repeats"] == 3 and 0 < r["fwd_bwd_ms_min"] <= r["fwd_bwd_ms"] <= r["fwd_bwd_ms_max"]
        assert r["peak_mem_bytes"] >= 2 * b * 256 * 2  # at least the two bf16 input gradients
    for loss in ("clip", "siglip"):
        # B×B bf16 logits are 32 MiB at 4096: the reference holds them.
        assert by[(loss, 4096, "reference")]["peak_mem_bytes"] > 4096**2 * 2
        # The fused backward's G workspace is min(B², 2**26) bf16 elements (kernels/config.py): as
        # large as the logits up to B = 8192, bounded at 128 MiB beyond. So compare at 16384, where
        # the reference's B×B buffers (512 MiB each in bf16) dominate.
        assert (
            by[(loss, 16384, "fastclip-triton")]["peak_mem_bytes"]
            < by[(loss, 16384, "reference")]["peak_mem_bytes"] / 4
        )


@pytest.mark.gpu
def test_gpu_train_step_and_search():
    from fastclip.bench.train import TrainBench, run_train_bench

    cfg = TrainBench(model="tiny", device="cuda", batch=64, precision="bf16", warmup=1, steps=2, micro_batch=64,
                     start_batch=128, max_batch=256, search_seconds=30)  # fmt: skip
    doc = run_train_bench(cfg, log=lambda s: None)
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 for r in doc["records"]), doc["records"]
    assert [(m["loss_impl"], m["grad_cache"]) for m in doc["max_batch"]] == [
        ("fastclip", False), ("fastclip", True), ("reference", True)]  # fmt: skip
    for m in doc["max_batch"]:
        assert m["status"] == "ok" and m["max_batch"] == 256 and m["limit"] == "max_batch cap 256", m
