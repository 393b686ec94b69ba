"""`fastclip bench data`: a tiny run writes shards, measures the loader per worker count and the step."""

from __future__ import annotations

import json
import os

from fastclip.cli import main

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny-webdataset.yaml")


def test_bench_data_writes_the_results_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = main(["bench", "data", "--config", CONFIG, "--make-shards", "24",
               "--data-dir", str(tmp_path / "d"), "--workers", "0,1", "--batches", "1", "--warmup", "1",
               "--step-steps", "1", "--train-steps", "0", "--output", str(out),
               "--set", "train.batch_size=8"])  # fmt: skip
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert [r["workers"] for r in doc["loader"]] == [0, 1]
    assert all(r["images_per_s"] > 0 for r in doc["loader"]) and doc["loader"][0]["speedup_vs_0"] == 1.0
    assert doc["train_step"]["images_per_s"] > 0 and doc["batch"] == 8
    assert len(list((tmp_path / "d" / "shards").glob("*.tar"))) == 1
    assert "load_before" in doc["host"] and "load_after" in doc["host"]
