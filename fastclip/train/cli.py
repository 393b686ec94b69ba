"""``fastclip train``: the command line of the trainer.

    fastclip train --output-dir runs/demo                        # tiny model, built-in synthetic data
    fastclip train --config configs/tiny-synthetic.yaml --output-dir runs/a --train.steps 100
    torchrun --nproc_per_node 2 -m fastclip.cli train --output-dir runs/b --train.zero_stage 2
    fastclip train --export runs/a/checkpoints runs/a/weights.safetensors

Every config key is an option ``--section.key VALUE`` (values are read as YAML: 1e-3, true,
"[0.9, 0.95]", none); options override the config file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from fastclip.train.config import SECTIONS, field_help

_PREFIX = "cfg__"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = "%(prog)s [--config FILE] [--output-dir DIR] [--section.key VALUE ...] [--smoke] [--print-config]\n       %(prog)s --export CHECKPOINT OUT.safetensors"
    parser.description = (
        "Train a CLIP/SigLIP model with the fused loss, gradient caching and DeepSpeed ZeRO.\n"
        "With only --output-dir it trains the tiny model on the built-in synthetic shapes (a few\n"
        "minutes on 2 CPU cores) and reports zero-shot accuracy on held-out colour-shape pairs."
    )
    parser.epilog = (
        "examples:\n"
        "  fastclip train --output-dir runs/demo\n"
        "  fastclip train --config configs/tiny-synthetic.yaml --output-dir runs/a --optim.lr 1e-3\n"
        "  torchrun --nproc_per_node 2 -m fastclip.cli train --output-dir runs/b --train.zero_stage 2\n"
        "  fastclip train --export runs/a/checkpoints runs/a/weights.safetensors\n"
        "Values are read as YAML (1e-3, true, none, '[0.9, 0.95]', '{patch_size: 8}').\n"
        "A run resumes from OUTPUT_DIR/checkpoints/latest when it exists (--checkpoint.resume never: start over)."
    )
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON config file (see configs/)")
    parser.add_argument(
        "--output-dir", metavar="DIR", help="checkpoints, metrics.jsonl, curves.png, model.safetensors"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny run of any config (a few steps, small evaluation)"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument(
        "--export", nargs=2, metavar=("CHECKPOINT", "OUT"),
        help="write the fp32 weights of a checkpoint (any ZeRO stage) to OUT (.safetensors) and exit",
    )  # fmt: skip
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            names = [f"--{section}.{f.name}"]
            if "_" in f.name:
                names.append(f"--{section}.{f.name.replace('_', '-')}")
            text = field_help(section, f.name).replace("``", "")
            group.add_argument(
                *names, dest=f"{_PREFIX}{section}__{f.name}", metavar="VALUE", default=argparse.SUPPRESS,
                help=f"{text} (default: {default!r})" if text else f"(default: {default!r})",
            )  # fmt: skip


def suggest_option(arg: str, known_options) -> str | None:
    """The option meant by an unknown ``arg`` (``--optim.learning_rate`` -> ``--optim.lr``): config keys
    through :func:`fastclip.train.config.suggest`, the suggestion a config file gets for the same name;
    other options (``--confg``) by spelling."""
    import difflib

    from fastclip.train.config import suggest, suggest_names
    from fastclip.train.config_values import meant

    flag = arg.split("=", 1)[0]
    name = flag.lstrip("-")
    key = name if "." in name else name.replace("-", "_")
    if "." in key or meant(key, suggest_names()) is not None:
        hit = suggest(key)
        if hit is not None and hit not in SECTIONS:
            return "--output-dir" if hit == "output_dir" else f"--{hit}"
    close = difflib.get_close_matches(flag, sorted(known_options), n=1, cutoff=0.6)
    return close[0] if close else None


def overrides_from_args(args) -> dict:
    from fastclip.train.config import parse_value

    out = {}
    for key, value in vars(args).items():
        if key.startswith(_PREFIX):
            section, name = key[len(_PREFIX) :].split("__", 1)
            out[f"{section}.{name}"] = parse_value(value)
    if getattr(args, "output_dir", None):
        out["output_dir"] = args.output_dir
    return out


def run(args) -> int:
    from fastclip.train.checkpoint import CheckpointError
    from fastclip.train.config import ConfigError, load_config
    from fastclip.train.data import DataError
    from fastclip.train.parallel import DistributedTimeoutError
    from fastclip.train.safe_load import UnsafeCheckpointError

    try:
        if args.export:
            from fastclip.train.export import export_safetensors

            path = export_safetensors(args.export[0], args.export[1])
            print(f"wrote {path}")
            return 0
        overrides = overrides_from_args(args)
        if args.smoke:
            overrides = {"train.steps": 6, "eval.every": 0, "data.eval_size": 64, "log.every": 1, **overrides}
        cfg = load_config(args.config, overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        if not cfg.output_dir:
            raise ConfigError(
                "output_dir: expected --output-dir DIR (checkpoints and logs go there), got none"
            )
        from fastclip.train.trainer import Trainer, TrainingInterrupted

        t0 = time.time()
        try:
            trainer = Trainer(cfg)
            metrics = trainer.fit()
        except TrainingInterrupted as stop:  # SIGTERM / SIGINT: a checkpoint was written
            import signal

            status = stop.exit_status
            if _world() > 1:
                # a launcher's worker, saved and leaving: torchrun's follow-up signal to the ranks still
                # running when one exits is ignored, so the status is ours, not a signal death during
                # interpreter shutdown (which drops Python handlers)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
            if _rank() == 0:
                print(f"fastclip train: {stop}", file=sys.stderr)
            return status
        elapsed = time.time() - t0
    except (ConfigError, DataError, CheckpointError, UnsafeCheckpointError, FileNotFoundError) as exc:
        print(f"fastclip train: error: {exc}", file=sys.stderr)
        return 2
    except (FloatingPointError, DistributedTimeoutError) as exc:  # a diverged run, a stopped rank
        print(f"fastclip train: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a disk that went read-only or full mid-run: the path and the reason
        print(f"fastclip train: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler was installed (imports, set-up)
        print("fastclip train: interrupted (SIGINT) during set-up; nothing was trained", file=sys.stderr)
        return 130
    import torch.distributed as dist

    if _rank() == 0:
        _summary(cfg, metrics, elapsed, trainer.start_step, trainer.step)
    if dist.is_initialized() and dist.get_world_size() > 1 and cfg.train.zero_stage == 3:
        # ZeRO-3 processes sometimes abort in interpreter shutdown after all work is done
        # (pytorch/pytorch#190489); everything is written, so leave without the shutdown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def trained_line(name: str, first: int, last: int, elapsed: float) -> str:
    """What this process trained: steps first+1..last (a resumed run says where it started)."""
    n = last - first
    if n <= 0:
        return f"trained no steps: the run was already complete at step {last}"
    if first == 0:
        return f"trained {name} for {n} steps in {elapsed:.0f} s"
    return f"trained {name} steps {first + 1}-{last} ({n} steps, resumed at step {first}) in {elapsed:.0f} s"


def _summary(cfg, metrics: dict, elapsed: float, first: int, last: int) -> None:
    out = os.path.abspath(cfg.output_dir)
    print(trained_line(cfg.model.name, first, last, elapsed))
    if "zeroshot_top1" in metrics:
        chance = metrics["zeroshot_chance"]
        held = " on held-out colour-shape pairs" if cfg.data.kind == "synthetic" else ""
        print(
            f"zero-shot top-1{held}: {metrics['zeroshot_top1']:.3f} "
            f"(top-5 {metrics['zeroshot_top5']:.3f}, chance {chance:.3f}, {metrics['zeroshot_top1'] / chance:.1f}x chance)"
        )
        if "seen_zeroshot_top1" in metrics:
            print(f"zero-shot top-1 on seen pairs: {metrics['seen_zeroshot_top1']:.3f}")
    if "i2t_r1" in metrics:
        print(
            f"retrieval R@1/5/10: image->text {metrics['i2t_r1']:.3f}/{metrics['i2t_r5']:.3f}/{metrics['i2t_r10']:.3f}, "
            f"text->image {metrics['t2i_r1']:.3f}/{metrics['t2i_r5']:.3f}/{metrics['t2i_r10']:.3f}"
        )
    print(f"outputs in {out}: metrics.jsonl, curves.png, checkpoints/, model.safetensors")
