"""The trainer on webdataset shards written by `fastclip data shards`: data_wait_frac and data_skipped
in metrics.jsonl, and a resumed run that continues the uninterrupted run's losses exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from fastclip.bench.data import make_image_shards

ARGS = ["--model.overrides", json.dumps({"patch_size": 8, "vision_depth": 1, "text_depth": 1})]
ARGS += ["--train.batch_size", "16", "--train.threads", "1", "--log.every", "1", "--log.progress", "false"]
ARGS += [
    "--log.plot",
    "false",
    "--eval.every",
    "0",
    "--checkpoint.export",
    "false",
    "--data.kind",
    "webdataset",
]
ARGS += ["--data.workers", "1", "--data.shuffle_buffer", "8", "--optim.warmup_steps", "2"]


def _train(out, spec, tok, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "fastclip.cli", "train", "--output-dir", str(out), *ARGS]
    cmd += ["--data.train", spec, "--data.tokenizer", tok, *extra]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]


def test_webdataset_training_logs_data_wait_and_resumes_exactly(tmp_path, capsys):
    made = make_image_shards(str(tmp_path / "data"), 48, size=64, shard_size=8)
    capsys.readouterr()
    full = _train(
        tmp_path / "full", made["shards"], made["tokenizer"], "--train.steps", "6", "--checkpoint.every", "3"
    )
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert all(0.0 <= r["data_wait_frac"] <= 1.0 and r["data_skipped"] == 0 for r in full)
    # the same run, stopped after the step-3 checkpoint, then resumed
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    (part / "checkpoints" / "latest").write_text("step_00000003\n")
    resumed = _train(part, made["shards"], made["tokenizer"], "--train.steps", "6", "--checkpoint.every", "3")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed[3:]] == [r["loss"] for r in full[3:]]
