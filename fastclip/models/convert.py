"""``fastclip convert SRC DST``: Hugging Face / OpenAI / open_clip weights -> fastclip safetensors.

    fastclip convert ./clip-vit-base-patch32 b32.safetensors                  # HF save_pretrained directory
    fastclip convert open_clip_b32.bin b32.safetensors --model ViT-B-32-quickgelu
    fastclip convert b32.safetensors b32_openclip.safetensors --to open_clip    # back to open_clip names
    fastclip convert hf-hub:org/name b32_repo --to open_clip    # a directory: open_clip's hub repo layout

The written file holds fastclip's tensor names and the model config (JSON metadata), so
``load_pretrained(DST)`` needs no model name. The conversion is checked: the model is built and
loaded strictly before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        help="HF CLIPModel/SiglipModel or open_clip directory, a .safetensors/.bin/.pt/.pth state dict, "
        "or a hub id hf-hub:org/name (through the local Hugging Face cache)",
    )
    parser.add_argument(
        "dst",
        help="output .safetensors file; with --to open_clip, a path without .safetensors is written as an "
        "open_clip hub directory (open_clip_config.json + open_clip_model.safetensors)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="fastclip config name for state dicts without a config (see list_models())",
    )
    parser.add_argument(
        "--to",
        choices=("fastclip", "open_clip"),
        default="fastclip",
        help="output layout (default fastclip; open_clip writes open_clip's tensor names, no config)",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="cast weights"
    )
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")


def run(args) -> int:
    import torch

    from fastclip.models.pretrained import WeightLoadError, load_pretrained, save_fastclip, to_open_clip

    to_dir = args.to == "open_clip" and not str(args.dst).endswith(".safetensors")
    if not str(args.dst).endswith(".safetensors") and not to_dir:
        print(f"fastclip convert: DST must end with .safetensors, got {args.dst!r}", file=sys.stderr)
        return 2
    if os.path.exists(args.dst) and not args.force:
        print(f"fastclip convert: {args.dst!r} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    try:
        model = load_pretrained(args.src, args.model)
    except (ValueError, TypeError) as exc:  # WeightLoadError is a ValueError: the report is the message
        kind = "weights do not match" if isinstance(exc, WeightLoadError) else "cannot convert"
        # the API's argument is this command's --model option
        msg = str(exc).replace("pass model_name (see list_models())", "pass --model NAME (see list_models())")
        print(f"fastclip convert: {kind}: {msg.rstrip()}", file=sys.stderr)
        return 1
    if args.dtype:
        model = model.to(getattr(torch, args.dtype))
    if args.to == "fastclip":
        save_fastclip(model, args.dst)
    elif to_dir:
        from fastclip.models.openclip_format import save_open_clip

        save_open_clip(model, args.dst)
    else:
        from fastclip.models.weights import save_safetensors

        try:
            sd = to_open_clip({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
        except ValueError as exc:
            print(f"fastclip convert: {exc}", file=sys.stderr)
            return 1
        sd = {k: (v.reshape(()) if k in ("logit_scale", "logit_bias") else v) for k, v in sd.items()}
        save_safetensors(sd, args.dst)
    n = sum(p.numel() for p in model.parameters())
    kind = "SigLIP" if model.is_siglip else "CLIP"
    print(f"wrote {args.dst} ({args.to} layout, {kind}, {n:,} parameters)")
    return 0
