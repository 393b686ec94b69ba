"""``fastclip data shards SRC.csv OUT_DIR --shard-size N``: webdataset shards from an image–caption table."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{shards}")
    p = sub.add_parser(
        "shards",
        help="write webdataset shards (img2dataset layout) from an image-caption CSV/TSV",
        description="Write webdataset shards (KEY.jpg|png|webp + KEY.txt + KEY.json, img2dataset's layout) "
        "from a CSV/TSV of image paths (relative to the file) and captions.",
    )
    p.add_argument("src", metavar="SRC", help="CSV/TSV file with an image-path column and a caption column")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory for 00000.tar, 00001.tar, ...")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-key", default="image", help="column of image paths (default: image)")
    p.add_argument("--caption-key", default="caption", help="column of captions (default: caption)")
    p.add_argument(
        "--delimiter", default=None, help="column delimiter (default: tab for .tsv, comma otherwise)"
    )
    p.add_argument(
        "--root", default=None, help="take relative image paths from ROOT and refuse paths outside it"
    )
    p.add_argument("--no-verify", action="store_true", help="do not decode each image while writing")


def run(args: argparse.Namespace) -> int:
    from fastclip.data.common import DataError
    from fastclip.data.write import write_shards

    if args.data_command != "shards":
        print("fastclip data: expected a subcommand: shards", file=sys.stderr)
        return 2
    try:
        out = write_shards(
            args.src, args.out_dir, args.shard_size, image_key=args.image_key, caption_key=args.caption_key,
            delimiter=args.delimiter, root=args.root, verify=not args.no_verify,
        )  # fmt: skip
    except DataError as exc:
        print(f"fastclip data shards: {exc}", file=sys.stderr)
        return 2
    skipped = f", {len(out['skipped'])} unreadable image(s) left out" if out["skipped"] else ""
    print(f"wrote {out['samples']} samples in {len(out['shards'])} shard(s) to {args.out_dir}{skipped}")
    return 0
