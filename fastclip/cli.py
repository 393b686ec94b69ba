"""The ``fastclip`` command: ``fastclip {train,bench,convert,data} ...``.

Each subcommand lives in its own module, imported only when used; every module exposes
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

SUBCOMMANDS = {
    "train": (
        "fastclip.train.cli",
        "train a CLIP/SigLIP model (default: tiny model on built-in synthetic data)",
    ),
    "bench": (
        "fastclip.bench.cli",
        "benchmark the losses ('loss'), a training step ('train'), the data loader ('data'), "
        "or re-report a result file ('report')",
    ),
    "convert": (
        "fastclip.models.convert",
        "convert Hugging Face / open_clip weights to fastclip safetensors",
    ),
    "data": (
        "fastclip.data.cli",
        "prepare training data: webdataset shards from an image-caption CSV ('shards')",
    ),
}


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its nested subcommands."""
    names = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                names |= _option_strings(child)
    return names


def build_parser(argv) -> tuple[argparse.ArgumentParser, object]:
    parser = argparse.ArgumentParser(
        prog="fastclip", description="fastclip: fused contrastive losses and training"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    module = None
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the module that will run
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            parser.set_defaults(_subparser=p)
    return parser, module


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse (Python < 3.12) names an unknown option without suggesting the one meant.
        target = getattr(args, "_subparser", parser)
        known = sorted(_option_strings(target))
        hints = []
        # a subcommand may suggest by its own rule (train: the one its config files get)
        suggest = getattr(module, "suggest_option", None)
        for arg in unknown:
            if arg.startswith("-"):
                if suggest is not None:
                    close = [c for c in [suggest(arg, known)] if c]
                else:
                    close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=3, cutoff=0.6)
                hints.append(f"{arg} (did you mean {', '.join(close)}?)" if close else arg)
            else:
                hints.append(arg)
        target.error("unrecognized arguments: " + " ".join(hints))
    if args.command is None:
        parser.print_help()
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
