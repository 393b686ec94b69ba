"""Write webdataset shards in img2dataset's layout from an image–caption CSV/TSV.

    fastclip data shards pairs.csv shards/ --shard-size 1000
    # shards/00000.tar, 00001.tar, ...; each sample: KEY.jpg|png|webp, KEY.txt, KEY.json
    fastclip train --data.kind webdataset --data.train 'shards/*.tar' --data.tokenizer TOK ...

Keys are ``{shard:05d}{index:0Nd}`` as img2dataset writes them. JPEG, PNG and WebP files are stored
as they are (no re-encoding); other formats are re-encoded as PNG. Every image is decoded once
while writing (``verify``): unreadable ones are left out, counted and listed, so a shard never holds
a sample the loader would have to skip. Shards are written to a temporary name and renamed when
complete; the tar headers carry no time stamps or owners, so the same input gives the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

from fastclip.data.common import DataError, _decode_errors, decode_image
from fastclip.data.table import read_table

KEEP = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    src: str,
    out_dir: str,
    shard_size: int,
    *,
    image_key: str = "image",
    caption_key: str = "caption",
    delimiter: str | None = None,
    root: str | None = None,
    verify: bool = True,
    log=sys.stderr,
) -> dict:
    """Shards of ``shard_size`` samples from the table ``src`` into ``out_dir``; returns a summary
    {"shards": [paths], "samples": n, "skipped": [(row image, reason)]}."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"--shard-size: expected an int >= 1, got {shard_size!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"OUT_DIR: expected a directory, got the file {out_dir!r}")
    images, captions, _ = read_table(src, image_key, caption_key, None, delimiter, root)
    os.makedirs(out_dir, exist_ok=True)
    digits = max(4, len(str(shard_size - 1)))
    errors = _decode_errors()
    shards, skipped, written = [], [], 0
    tar, tmp, shard, index = None, None, -1, shard_size

    def close():
        if tar is not None:
            tar.close()
            final = tmp[: -len(".tmp")]
            os.replace(tmp, final)
            shards.append(final)

    for path, caption in zip(images, captions):
        ext = KEEP.get(os.path.splitext(path)[1].lower())
        with open(path, "rb") as f:
            data = f.read()
        if verify or ext is None:
            try:
                img = decode_image(data)
            except errors as exc:
                skipped.append((path, f"{type(exc).__name__}: {exc}"))
                continue
            meta = {"width": img.width, "height": img.height}
            if ext is None:
                from fastclip.transforms import to_rgb

                buf = io.BytesIO()
                (img if img.mode in ("RGB", "RGBA", "L", "LA", "P") else to_rgb(img)).save(buf, format="PNG")
                data, ext = buf.getvalue(), "png"
        else:
            meta = {}
        if index == shard_size:
            close()
            shard, index = shard + 1, 0
            tmp = os.path.join(out_dir, f"{shard:05d}.tar.tmp")
            tar = tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT)
        key = f"{shard:05d}{index:0{digits}d}"
        _add(tar, f"{key}.{ext}", data)
        _add(tar, f"{key}.txt", caption.encode("utf-8"))
        record = {
            "key": key,
            "caption": caption,
            "source": os.path.relpath(path, os.path.dirname(src)),
            **meta,
        }
        _add(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
        index += 1
        written += 1
    close()
    if not written:
        raise DataError(f"{src}: none of the {len(images)} images could be read; no shard written")
    for path, why in skipped[:5]:
        print(f"fastclip data shards: left out unreadable image {path}: {why}", file=log)
    return {"shards": shards, "samples": written, "skipped": skipped}
