"""The data-loading benchmark: images/s of the training loader for 0, 1, 2, ... workers, the training
step's images/s on in-memory data, and a short training run's samples/s and data_wait_frac.

    fastclip bench data --config configs/tiny-webdataset.yaml --make-shards 2048 --workers 0,1,2
    # --make-shards N: first write N 256x256 JPEGs as shards with `fastclip data shards` (and a word
    # tokenizer) under --data-dir, and train from them

The loader is measured as the trainer uses it (rank 0 of one, ``next_batch()`` in a loop, after a
warm-up that includes starting the workers). The step is measured with ``fastclip.bench.train`` (plain
AdamW, no DeepSpeed). The training run is ``fastclip.train.train`` for ``--train-steps`` steps; its
``data_wait_frac`` is the mean over logged intervals after the first (which includes start-up).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def make_image_shards(out_dir: str, n: int, size: int = 256, shard_size: int = 128, seed: int = 0) -> dict:
    """``n`` size x size JPEGs (smooth random colour fields, ~quality 90) with captions, written as a
    CSV, then as shards by :func:`fastclip.data.write.write_shards`; plus a word-level tokenizer.json.
    Returns {"csv", "shards" (glob spec), "tokenizer"}."""
    from PIL import Image

    from fastclip.data.write import write_shards

    colors = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    things = ["cat", "dog", "car", "tree", "house", "boat", "bird", "flower"]
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["image,caption"]
    for i in range(n):
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-12, 13, (size, size, 3)), 0, 255)
        name = f"{i:06d}.jpg"
        Image.fromarray(noisy.astype(np.uint8)).save(os.path.join(img_dir, name), quality=90)
        rows.append(f"images/{name},a {colors[i % 8]} {things[(i // 8) % 8]} picture {i % 97}")
    csv_path = os.path.join(out_dir, "pairs.csv")
    with open(csv_path, "w") as f:
        f.write("\n".join(rows) + "\n")
    shard_dir = os.path.join(out_dir, "shards")
    write_shards(csv_path, shard_dir, shard_size)
    words = sorted({w for r in rows[1:] for w in r.split(",", 1)[1].split()})
    tok = word_tokenizer_json(words, os.path.join(out_dir, "tokenizer.json"))
    return {"csv": csv_path, "shards": os.path.join(shard_dir, "*.tar"), "tokenizer": tok}


def word_tokenizer_json(words, path: str) -> str:
    """A Hugging Face ``tokenizers`` word-level tokenizer over ``words`` ([PAD] = 0, [UNK] = 1)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)
    return path


def _stream(cfg, workers: int, image_size: int, mean, std, tokenizer=None):
    from fastclip.data import CsvStream, WebDatasetStream

    dc = dataclasses.replace(cfg.data, workers=workers)
    kind = CsvStream if dc.kind == "csv" else WebDatasetStream
    return kind(
        dc.train, dc, image_size, cfg.train.batch_size, 0, 1, cfg.train.seed, mean, std, tokenizer=tokenizer
    )


def loader_throughput(
    cfg, workers: int, image_size: int, mean, std, batches: int, warmup: int, tokenizer=None
):
    """{"workers", "images_per_s", "startup_s"}: ``batches`` batches after ``warmup`` (incl. start-up)."""
    s = _stream(cfg, workers, image_size, mean, std, tokenizer)
    t0 = time.perf_counter()
    for _ in range(warmup):
        s.next_batch()
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        images, _ = s.next_batch()
        n += images.shape[0]
    t2 = time.perf_counter()
    s.close()
    return {"workers": workers, "images_per_s": n / (t2 - t1), "startup_s": t1 - t0, "batches": batches}


def step_throughput(cfg, steps: int) -> dict:
    from fastclip.bench.train import make_loss, measure_step, plain_step
    from fastclip.models import create_model
    from fastclip.train.build import resolved_overrides
    from fastclip.train.parallel import cpu_threads

    model = create_model(cfg.model.name, **resolved_overrides(cfg.model))
    device = torch.device("cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = plain_step(model, opt, make_loss(model, "fastclip"), device, "fp32")
    before, threads = torch.get_num_threads(), cfg.train.threads or cpu_threads()
    torch.set_num_threads(threads)  # as the trainer chooses them: oversubscribed threads distort it
    try:
        rec = measure_step(step, model, cfg.train.batch_size, device, warmup=1, steps=steps)
    finally:
        torch.set_num_threads(before)
    return {"images_per_s": rec.get("samples_per_s"), "threads": threads, "record": rec}


def train_run(cfg, steps: int, out_dir: str) -> dict:
    from fastclip.train import train

    overrides = {
        "output_dir": out_dir, "train.steps": steps, "eval.every": 0, "checkpoint.every": 0,
        "log.every": max(1, steps // 10), "log.progress": False, "log.plot": False, "checkpoint.export": False,
    }  # fmt: skip
    conf = cfg.to_dict()
    conf["data"]["eval"] = None
    t0 = time.perf_counter()
    train(conf, overrides=overrides)
    wall = time.perf_counter() - t0
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "data_wait_frac" in r]
    steady = rows[1:] or rows
    return {
        "steps": steps, "wall_s": wall,
        "samples_per_s": statistics.mean(r["samples_per_s"] for r in steady),
        "data_wait_frac": statistics.mean(r["data_wait_frac"] for r in steady),
        "data_wait_frac_first_interval": rows[0]["data_wait_frac"] if rows else None,
        "rows": rows,
    }  # fmt: skip


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (data.kind webdataset or csv)")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default: 0..CPUs)")
    p.add_argument("--batches", type=int, default=20, help="timed loader batches per worker count")
    p.add_argument("--warmup", type=int, default=2, help="loader batches before timing (incl. start-up)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per worker count (median reported)")
    p.add_argument("--step-steps", type=int, default=5, help="timed training steps on in-memory data")
    p.add_argument("--train-steps", type=int, default=60, help="steps of the short training run (0: skip)")
    p.add_argument("--make-shards", type=int, default=0, help="first write N 256x256 JPEGs as shards")
    p.add_argument("--data-dir", default=None, help="where --make-shards writes (default: a temp dir)")
    p.add_argument("--output", default=None, help="results JSON path (default: print only)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")


def run_data(args: argparse.Namespace) -> int:
    from fastclip.train.config import ConfigError, load_config, parse_value

    log = print
    overrides = {}
    for item in args.set:
        if "=" not in item:
            print(f"fastclip bench data: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        overrides[k] = parse_value(v)
    tmp = None
    if args.make_shards:
        data_dir = args.data_dir or (tmp := tempfile.mkdtemp(prefix="fastclip-bench-data-"))
        made = make_image_shards(data_dir, args.make_shards)
        overrides.update(
            {"data.kind": "webdataset", "data.train": made["shards"], "data.tokenizer": made["tokenizer"]}
        )
        log(f"wrote {args.make_shards} 256x256 JPEGs as shards: {made['shards']}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"fastclip bench data: {exc}", file=sys.stderr)
        return 2
    if cfg.data.kind not in ("webdataset", "csv"):
        print("fastclip bench data: expected data.kind webdataset or csv in the config", file=sys.stderr)
        return 2
    from fastclip.data import default_workers
    from fastclip.models import get_config, load_tokenizer
    from fastclip.train.build import resolved_overrides

    mc = get_config(cfg.model.name, **resolved_overrides(cfg.model))
    size, mean, std = mc.vision.image_size, tuple(mc.vision.mean), tuple(mc.vision.std)
    tokenizer = None
    if cfg.data.tokenizer not in ("auto", "words"):
        tokenizer = load_tokenizer(cfg.data.tokenizer, context_length=mc.text.context_length)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = [int(w) for w in args.workers.split(",")] if args.workers else list(range(cpus + 1))
    doc = {
        "kind": "data", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
                 "torch": torch.__version__, "load_before": _load()},
        "config": args.config, "overrides": {k: str(v) for k, v in overrides.items()},
        "model": cfg.model.name, "image_size": size, "batch": cfg.train.batch_size,
        "data": {"kind": cfg.data.kind, "train": cfg.data.train, "augment": cfg.data.augment,
                 "fast_decode": cfg.data.fast_decode, "default_workers": default_workers()},
        "loader": [],
    }  # fmt: skip
    runs = {w: [] for w in counts}
    for r in range(args.repeats):  # worker counts interleaved, so that other jobs' bursts hit all alike
        for w in counts:
            rec = loader_throughput(cfg, w, size, mean, std, args.batches, args.warmup, tokenizer)
            rec["load"] = _load()
            runs[w].append(rec)
            log(
                f"loader workers={w} (repeat {r + 1}/{args.repeats}): {rec['images_per_s']:.0f} images/s "
                f"(start-up {rec['startup_s']:.2f} s, load {rec['load']})"
            )
    for w in counts:
        rates = [rec["images_per_s"] for rec in runs[w]]
        doc["loader"].append(
            {"workers": w, "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
             "repeats": runs[w]}
        )  # fmt: skip
        log(f"loader workers={w}: median {statistics.median(rates):.0f} images/s over {len(rates)} repeat(s)")
    base = doc["loader"][0]["images_per_s"] if doc["loader"] and counts[0] == 0 else None
    if base:
        for rec in doc["loader"]:
            rec["speedup_vs_0"] = rec["images_per_s"] / base
    if args.step_steps:
        doc["train_step"] = step_throughput(cfg, args.step_steps)
        log(
            f"training step (in-memory batch of {cfg.train.batch_size}): {doc['train_step']['images_per_s']:.0f} images/s"
        )
    if args.train_steps:
        with tempfile.TemporaryDirectory(prefix="fastclip-bench-train-") as out:
            run = train_run(cfg, args.train_steps, out)
        doc["train_run"] = run
        log(
            f"training run ({args.train_steps} steps, data.workers={cfg.data.workers}): "
            f"{run['samples_per_s']:.0f} samples/s, data_wait_frac {run['data_wait_frac']:.3f}"
        )
    doc["host"]["load_after"] = _load()
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {args.output}")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0
