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

from fastclip.data.common import DataError, decode_image, default_workers
from fastclip.data.shards import expand_shards
from fastclip.data.streams import CsvStream, WebDatasetStream, train_transform
from fastclip.data.synthetic import SyntheticShapes, SyntheticStream, synthetic_eval_sets
from fastclip.data.table import EvalSet, read_classnames, read_table, table_eval_set

__all__ = [
    "CsvStream",
    "DataError",
    "EvalSet",
    "SyntheticShapes",
    "SyntheticStream",
    "WebDatasetStream",
    "decode_image",
    "default_workers",
    "expand_shards",
    "read_classnames",
    "read_table",
    "synthetic_eval_sets",
    "table_eval_set",
    "train_transform",
]
