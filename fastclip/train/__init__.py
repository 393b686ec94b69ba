"""fastclip.train: a DeepSpeed ZeRO trainer for CLIP/SigLIP with gradient caching, built-in synthetic
data, webdataset/CSV data, zero-shot and retrieval evaluation and atomic checkpoints.

    from fastclip.train import train, load_config
    metrics = train(overrides={"output_dir": "runs/demo"})

Heavy imports (DeepSpeed) happen inside :func:`train`.
"""

from fastclip.train.checkpoint import CheckpointError
from fastclip.train.config import Config, ConfigError, load_config
from fastclip.train.data import DataError
from fastclip.train.evaluate import evaluate
from fastclip.train.export import export_safetensors
from fastclip.train.gradcache import gradcache_step


def train(config=None, **kwargs):
    """See :func:`fastclip.train.trainer.train`."""
    from fastclip.train.trainer import train as _train

    return _train(config, **kwargs)


__all__ = [
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "evaluate",
    "export_safetensors",
    "gradcache_step",
    "load_config",
    "train",
]
