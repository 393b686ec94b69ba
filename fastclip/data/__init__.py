"""Training and evaluation data: synthetic shapes, CSV/TSV tables, webdataset shards.

    from fastclip.data import WebDatasetStream, write_shards
    stream = WebDatasetStream("shards/{00000..00099}.tar", cfg.data, 224, 4096, rank, world, seed)
    images, texts = stream.next_batch()     # (b, 3, 224, 224) float32, captions or token ids
    state = stream.state_dict()             # JSON: resume exactly here with load_state_dict(state)

Modules: :mod:`~fastclip.data.common` (errors, decoding, seeds), :mod:`~fastclip.data.synthetic`,
:mod:`~fastclip.data.table` (CSV/TSV), :mod:`~fastclip.data.shards` (tar shards, shard plan,
reader), :mod:`~fastclip.data.streams` (per-rank streams on DataLoader workers),
:mod:`~fastclip.data.write` (``fastclip data shards``).
"""

# Each name is imported on first use, so that `fastclip data --help` does not import torch.
# name -> module that defines it
_LAZY = {
    "DataError": "fastclip.data.common",
    "decode_image": "fastclip.data.common",
    "default_workers": "fastclip.data.common",
    "expand_shards": "fastclip.data.shards",
    "CsvStream": "fastclip.data.streams",
    "WebDatasetStream": "fastclip.data.streams",
    "train_transform": "fastclip.data.streams",
    "SyntheticShapes": "fastclip.data.synthetic",
    "SyntheticStream": "fastclip.data.synthetic",
    "synthetic_eval_sets": "fastclip.data.synthetic",
    "EvalSet": "fastclip.data.table",
    "read_classnames": "fastclip.data.table",
    "read_table": "fastclip.data.table",
    "table_eval_set": "fastclip.data.table",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastclip.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(_LAZY)
