"""``fastclip bench train``: its options and the command (the measurement is ``fastclip.bench.train``)."""

from __future__ import annotations

import argparse
import os
import sys

from fastclip.bench import timing
from fastclip.bench.train import SEARCHES, default_train_bench, run_train_bench, train_table


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", help="model name (fastclip.models.list_models(); default: tiny on CPU, ViT-B-16 on GPU)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--batch", type=int, help="batch of the samples/s measurement")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), help="fp32, or bf16 autocast (default: bf16 on GPU)"
    )
    p.add_argument("--warmup", type=int, help="warm-up steps")
    p.add_argument("--steps", type=int, help="timed steps")
    p.add_argument("--loss-impls", help="comma list of fastclip,reference")
    p.add_argument("--micro-batch", type=int, help="gradient caching: samples per chunk")
    p.add_argument(
        "--mem-cap", type=float, help="CPU: memory budget in GiB that decides what fits (default 1)"
    )
    p.add_argument("--start-batch", type=int, help="first batch of the largest-batch search")
    p.add_argument("--max-batch", type=int, help="stop the largest-batch search here")
    p.add_argument("--search-seconds", type=float, help="time limit of each largest-batch search")
    p.add_argument("--max-seconds", type=float, help="time limit of all largest-batch searches together")
    p.add_argument("--no-search", action="store_true", help="skip the largest-batch search")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="results folder")
    p.add_argument("--name", help="file stem (default train_<date>_<time>_<device>)")
    p.add_argument("--no-save", action="store_true", help="print only")


def run_train(args: argparse.Namespace) -> int:
    import json

    from fastclip.bench.report import result_stem

    try:
        device = timing.resolve_device(args.device)
        cfg = default_train_bench(device)
        cfg.device = str(device)
        if args.model is not None:
            cfg.model = args.model
        for key, attr in (("batch", "batch"), ("precision", "precision"), ("warmup", "warmup"), ("steps", "steps"),
                          ("micro_batch", "micro_batch"), ("start_batch", "start_batch"), ("max_batch", "max_batch"),
                          ("search_seconds", "search_seconds")):  # fmt: skip
            if getattr(args, key) is not None:
                setattr(cfg, attr, getattr(args, key))
        if args.mem_cap is not None:
            cfg.mem_cap_bytes = int(args.mem_cap * 2**30)
        if args.loss_impls:
            cfg.loss_impls = [s.strip() for s in args.loss_impls.split(",") if s.strip()]
        cfg.find_max_batch = not args.no_search
        if args.max_seconds is not None:
            n = sum(1 for impl, _ in SEARCHES if impl in cfg.loss_impls) or 1
            cfg.search_seconds = args.max_seconds / n
        cfg.validate()
    except (TypeError, ValueError) as exc:
        print(f"fastclip bench train: {exc}", file=sys.stderr)
        return 2
    try:
        doc = run_train_bench(cfg)
    except (RuntimeError, ValueError) as exc:
        print(f"fastclip bench train: {exc}", file=sys.stderr)
        return 1
    print()
    print(train_table(doc))
    if not args.no_save:
        stem = os.path.join(
            args.out, args.name or result_stem("train", timing.device_tag(device), doc["date"])
        )
        os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"\nwrote {stem}.json")
    failed = [r for r in doc["records"] if r["status"] != "ok"] + [
        m for m in doc["max_batch"] if m["status"] != "ok"
    ]
    return 1 if failed else 0
