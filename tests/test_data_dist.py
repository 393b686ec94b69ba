"""webdataset loading across processes (gloo, 2 ranks x 2 loader workers each, lockstep like training):
every sample of an epoch is read exactly once across ranks and workers (counted); with resampling and
fewer shards than readers, no rank stalls."""

from __future__ import annotations

import datetime
import io
import json
import os
import types

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastclip.data.write import write_shards

N_SAMPLES = 30


def _cfg(**kw):
    base = dict(image_key="image", caption_key="caption", workers=2, shuffle_buffer=4, resampled=False)
    return types.SimpleNamespace(**{**base, **kw})


def _rank(rank, world, tmpdir, spec, small_spec):
    import multiprocessing

    from fastclip.data import WebDatasetStream

    # Ranks started by torchrun fork their loader workers (Linux's default); these ranks were spawned,
    # which would make every worker import torch again (seconds each on a busy 2-core machine).
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmpdir}/rendezvous", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    out = {}
    # 1. one epoch, no resampling: local batch 1, so the position after a sample names its epoch
    s = WebDatasetStream(spec, _cfg(), 8, world, rank, world, seed=11)
    seen, steps = [], 0
    while True:
        done = torch.tensor([int(all(p["epoch"] >= 1 for p in s.positions))])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)  # every rank steps until all readers left epoch 0
        if done.item():
            break
        reader = s.batches % s.readers
        _, (caption,) = s.next_batch()
        steps += 1
        if s.positions[reader]["epoch"] == 0:
            seen.append(caption)
    s.close()
    everyone = [None] * world
    dist.all_gather_object(everyone, seen)
    out["epoch0"] = sum(everyone, [])
    out["steps"] = steps
    # 2. resampling with 3 shards for 4 readers: 40 lockstep steps with a collective each
    r = WebDatasetStream(small_spec, _cfg(resampled=True), 8, 2 * world, rank, world, seed=3)
    caps = []
    for _ in range(40):
        _, c = r.next_batch()
        caps += c
        dist.all_reduce(torch.ones(1))
    r.close()
    out["resampled"] = len(caps)
    with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


def _shards(root, n, shard_size):
    from PIL import Image

    root.mkdir()
    rows = ["image,caption"]
    for i in range(n):
        Image.new("RGB", (12, 12), (i * 8 % 256, 40, 90)).save(root / f"{i}.png")
        rows.append(f"{i}.png,sample {i}")
    (root / "t.csv").write_text("\n".join(rows) + "\n")
    write_shards(str(root / "t.csv"), str(root / "shards"), shard_size, log=io.StringIO())
    return str(root / "shards" / "*.tar")


def test_two_ranks_two_workers_each_sample_once_and_resampling_never_stalls(tmp_path):
    spec = _shards(tmp_path / "a", N_SAMPLES, 3)  # 10 shards for 4 readers
    small = _shards(tmp_path / "b", 9, 3)  # 3 shards for 4 readers: only with resampling
    mp.start_processes(_rank, args=(2, str(tmp_path), spec, small), nprocs=2, join=True, start_method="spawn")
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    epoch0 = results[0]["epoch0"]
    assert sorted(epoch0) == sorted(f"sample {i}" for i in range(N_SAMPLES))  # each exactly once
    assert results[0]["epoch0"] == results[1]["epoch0"] and results[0]["steps"] == results[1]["steps"]
    assert [r["resampled"] for r in results] == [80, 80]
