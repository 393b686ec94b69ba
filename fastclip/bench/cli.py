"""``fastclip bench {loss,train}``: the benchmark commands (also ``python benchmarks/bench_loss.py``).

``fastclip bench loss`` with no arguments runs the built-in sweep for the machine (see
:func:`fastclip.bench.loss.default_sweep`); every axis can be overridden. Results go to
``./fastclip-bench/`` in the current directory (``--out DIR``; the repository's published results are in
``benchmarks/results/``): JSON, CSV and PNG plots named by kind, date and device; the folder is named
in the output.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_OUT = "fastclip-bench"  # in the current directory (was benchmarks/results, wherever it was run)


def parse_batches(text: str) -> list[int]:
    """``"4096,8192"`` -> [4096, 8192]; ``"4096:65536"`` -> powers of two from 4096 to 65536."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part:
                lo, hi = (int(v) for v in part.split(":", 1))
                if lo < 1 or hi < lo:
                    raise ValueError
                b = lo
                while b <= hi:
                    out.append(b)
                    b *= 2
            else:
                b = int(part)
                if b < 1:
                    raise ValueError
                out.append(b)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected positive ints separated by commas, or LO:HI for powers of two, got {text!r}"
            ) from None
    if not out:
        raise argparse.ArgumentTypeError(f"expected at least one batch size, got {text!r}")
    return out


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ints separated by commas, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive ints separated by commas, got {text!r}")
    return vals


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="{loss,train,report,data,st}")
    p = sub.add_parser("loss", help="loss forward/backward: time, memory, TFLOP/s per provider")
    p.add_argument("--providers", type=_str_list, help="comma list of fastclip-triton, fastclip-torch, reference, "
                   "open_clip, inf_cl (default: the machine's built-in set; unavailable ones are skipped)")  # fmt: skip
    p.add_argument(
        "--batch", type=parse_batches, help="batch sizes: 4096,8192 or 4096:1048576 (powers of two)"
    )
    p.add_argument("--dim", type=_int_list, help="feature dims, comma list (e.g. 512,768,1024,1152)")
    p.add_argument("--dtype", type=_str_list, help="float32,bfloat16,float16 (or fp32,bf16,fp16)")
    p.add_argument(
        "--loss",
        type=_str_list,
        help="clip,siglip; or distill (DistillClipLoss vs open_clip's, fastclip.bench.distill); or mnrl "
        "(info_nce_loss vs the materialized MultipleNegativesRankingLoss maths, fastclip.bench.family)",
    )
    from fastclip.bench.family import negatives_list

    p.add_argument(
        "--negatives", type=negatives_list, help="with --loss mnrl: hard negatives per row (default 0,1,7)"
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    p.add_argument("--warmup", type=int, help="warm-up iterations per run (one long iteration suffices)")
    p.add_argument("--min-repeats", type=int, help="fewest timed iterations per run")
    p.add_argument("--repeats", type=int, help="most timed iterations per run")
    p.add_argument("--time-budget", type=float, help="seconds of timed iterations per run (sets the repeats)")
    p.add_argument("--max-seconds", type=float, help="stop the sweep after this many seconds (results kept)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default ./{DEFAULT_OUT} in the current "
                   "directory; the repository's published results: --out benchmarks/results)")  # fmt: skip
    p.add_argument("--name", help="file stem for the results (default loss_<date>_<time>_<device>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-save", action="store_true", help="print only, write no files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = sub.add_parser("report", help="tables, Markdown and plots again from a loss result JSON file")
    r.add_argument("path", help="a loss_*.json file written by 'fastclip bench loss'")
    r.add_argument("--markdown", action="store_true", help="print the Markdown summary (README results)")
    r.add_argument(
        "--plot", action="store_true", help="redraw <stem>_time.png and <stem>_memory.png beside it"
    )

    t = sub.add_parser("train", help="one training step of a model: samples/s, memory, largest batch")
    from fastclip.bench.train_cli import add_train_arguments

    add_train_arguments(t)

    d = sub.add_parser(
        "data", help="training data loader: images/s per worker count, step images/s, data wait"
    )
    from fastclip.bench.data import add_data_arguments

    add_data_arguments(d)

    s = sub.add_parser(
        "st", help="sentence-transformers' MNRL / cached MNRL loss stage vs fastclip's drop-in: time, memory"
    )
    from fastclip.bench.st import add_arguments as add_st_arguments

    add_st_arguments(s)


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, "bench_command", None)
    if cmd == "loss":
        return run_loss(args)
    if cmd == "report":
        return run_report(args)
    if cmd == "train":
        from fastclip.bench.train_cli import run_train

        return run_train(args)
    if cmd == "st":
        from fastclip.bench.st import run_from_args

        return run_from_args(args)
    if cmd == "data":
        from fastclip.bench.data import run_data

        return run_data(args)
    print(
        "usage: fastclip bench {loss,train,report,data,st} [options]  (fastclip bench loss --help)",
        file=sys.stderr,
    )
    return 2


def run_loss(args: argparse.Namespace) -> int:
    if args.loss and "mnrl" in args.loss:  # the contrastive family: fused InfoNCE vs materialized MNRL
        from fastclip.bench.family import run_from_loss_args as run_family

        return run_family(args)
    if args.loss and "distill" in args.loss:  # the distillation loss has its own runner (other inputs)
        from fastclip.bench.distill import run_from_loss_args

        return run_from_loss_args(args)
    from fastclip.bench import report
    from fastclip.bench.loss import default_sweep, run_loss_sweep
    from fastclip.bench.plot import plot_document
    from fastclip.bench.timing import device_tag, resolve_device

    try:
        device = resolve_device(args.device)
    except (TypeError, ValueError) as exc:
        print(f"fastclip bench loss: {exc}", file=sys.stderr)
        return 2
    cfg = default_sweep(device)
    cfg.device = str(device)
    if device.type == "cuda" and cfg.device == "cuda":
        cfg.device = f"cuda:{torch_current_device()}"
    overrides = {"providers": args.providers, "batches": args.batch, "dims": args.dim, "dtypes": args.dtype,
                 "losses": args.loss, "warmup": args.warmup, "min_repeats": args.min_repeats,
                 "max_repeats": args.repeats, "time_budget_s": args.time_budget,
                 "max_seconds": args.max_seconds}  # fmt: skip
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg, key, value)
    if args.batch is not None:
        cfg.max_batch = {}  # the caller chose the batches
    if cfg.min_repeats > cfg.max_repeats:
        if args.repeats is not None and args.min_repeats is None:
            cfg.min_repeats = cfg.max_repeats
        else:
            cfg.max_repeats = cfg.min_repeats
    try:
        cfg.validate()
    except (TypeError, ValueError) as exc:
        print(f"fastclip bench loss: {exc}", file=sys.stderr)
        return 2
    print(
        f"providers {cfg.providers}; B {cfg.batches}; D {cfg.dims}; {cfg.dtypes}; losses {cfg.losses}; "
        f"warm-up {cfg.warmup}, {cfg.min_repeats}-{cfg.max_repeats} timed iterations within {cfg.time_budget_s} s per run",
        flush=True,
    )
    doc = run_loss_sweep(cfg, progress=not args.no_progress)
    recs = doc["records"]
    print()
    print(report.records_table(recs, doc["matmul_tflops"]))
    print(matmul_note(recs, doc["matmul_tflops"], device.type))
    ratios = report.ratio_table(recs)
    if ratios:
        print("\nratios to the materialized reference (fwd+bwd time, peak extra memory):")
        print(ratios)
    checks = report.target_checks(recs, doc["matmul_tflops"])
    if checks:
        print("\ntargets:")
        print("\n".join(checks))
    if not args.no_save:
        stem = os.path.join(
            args.out, args.name or report.result_stem("loss", device_tag(device), doc["date"])
        )
        paths = [report.write_json(doc, stem + ".json")]
        paths.append(report.write_csv(recs, stem + ".csv", {"device": doc["device"], "date": doc["date"]}))
        if not args.no_plot:
            paths += plot_document(doc, stem)
        print(f"\nwrote {', '.join(paths)} (in {os.path.abspath(args.out)})")
    return 0 if recs else 1


def matmul_note(records: list[dict], matmul_tflops: float | None, device_type: str) -> str:
    """What the "% matmul" column is a percentage of, under the table; values above 100 % explained."""
    if not matmul_tflops:
        return "% matmul: - (no matmul rate measured)"
    what = "bf16 8192x8192" if device_type == "cuda" else "fp32 2048x2048"
    note = (
        f"% matmul: TFLOP/s (the loss's FLOP floor, 8*B^2*D for clip, 6*B^2*D for siglip, over the median "
        f"fwd+bwd time) as a percentage of the {what} matmul rate measured once at the start of this run "
        f"({matmul_tflops:.3g} TFLOP/s)."
    )
    if any((r.get("matmul_frac") or 0) > 1 for r in records):
        note += (
            " Above 100 %: the matmul was measured at a busier moment than the loss (other jobs on a shared "
            "machine) or the loss's shapes run faster than that square matmul; not a loss faster than its "
            "own GEMMs."
        )
    return note


def torch_current_device() -> int:
    import torch

    return torch.cuda.current_device()


def run_report(args: argparse.Namespace) -> int:
    from fastclip.bench import report
    from fastclip.bench.plot import plot_document

    try:
        doc = report.load_document(args.path)
    except (OSError, ValueError, TypeError) as exc:
        print(f"fastclip bench report: {args.path}: {exc}", file=sys.stderr)
        return 2
    print(report.records_table(doc["records"], doc["matmul_tflops"]))
    kind = "cpu" if str(doc["device"]).startswith("cpu") else "cuda"
    print(matmul_note(doc["records"], doc["matmul_tflops"], kind))
    ratios = report.ratio_table(doc["records"])
    if ratios:
        print("\n" + ratios)
    checks = report.target_checks(doc["records"], doc["matmul_tflops"])
    if checks:
        print("\n" + "\n".join(checks))
    if args.markdown:
        print("\n" + report.markdown_summary(doc))
    if args.plot:
        stem = args.path[:-5] if args.path.endswith(".json") else args.path
        print("\nwrote " + ", ".join(plot_document(doc, stem)))
    return 0
