"""Two training runs in one process with the process group destroyed and made again between them (a
notebook, a sweep, a test suite): DeepSpeed's clone of the world group from the first run must not break
the second (fastclip/train/engine.py, ``_forget_stale_world_clone``)."""

from __future__ import annotations

import torch.distributed as dist

from fastclip.train.config import load_config

TINY = {"patch_size": 8, "vision_depth": 1, "text_depth": 1}


def _config(out):
    return load_config(None, {
        "output_dir": str(out), "train.steps": 2, "train.batch_size": 4, "log.every": 1, "eval.every": 0,
        "data.eval_size": 10, "data.workers": 0, "train.threads": 1, "log.progress": False, "log.plot": False,
        "checkpoint.export": False, "checkpoint.resume": "never", "model.overrides": TINY,
    })  # fmt: skip


def test_a_second_run_after_the_process_group_was_destroyed(tmp_path):
    from fastclip.train.trainer import Trainer

    Trainer(_config(tmp_path / "first")).fit()
    if dist.is_initialized():
        dist.destroy_process_group()  # what a caller may do between runs
    Trainer(_config(tmp_path / "second")).fit()  # failed with "Group ... is not registered" before
    assert (tmp_path / "second" / "metrics.jsonl").exists()
