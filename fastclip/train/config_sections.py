"""The config's eight sections as dataclasses: every key with its type, default and description.

Each field's description is the string literal under it (an attribute docstring); :func:`field_help`
reads them from this module's source for ``fastclip train --help``. :mod:`fastclip.train.config`
builds, converts and validates a :class:`~fastclip.train.config.Config` of these sections.

    SECTIONS["optim"]                     # OptimConfig
    field_help("optim", "lr")             # "Peak learning rate of AdamW (...)"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Named model from ``fastclip.models`` ("tiny", "tiny-siglip", ...)."""
    overrides: dict | None = None
    """Keyword overrides for ``create_model(name, **overrides)``. None: {patch_size: 8} for "tiny" and
    "tiny-siglip" (the demo's 4x4 patch grid, 3x faster than 8x8 on CPU), {} for other models."""
    loss: str = "auto"
    """"clip" (softmax), "siglip" (sigmoid), "info_nce" (CLIP's symmetric softmax on the contrastive
    family's core: takes model.hard_negatives, model.duplicates and model.hardness) or "auto" (siglip
    when the model has a logit_bias, else clip). The softmax losses (clip, info_nce) are refused for a
    model with a logit_bias (they would leave it untrained)."""
    loss_impl: str = "auto"
    """Loss implementation: "auto", "triton", "torch" or "reference"."""
    dist_impl: str | None = None
    """Distributed strategy of the loss (None: the loss's default; info_nce: "gather" or "ring")."""
    hard_negatives: int = 0
    """info_nce: K hard-negative captions per sample (negatives for every image of the batch); synthetic
    data draws them (the true caption with its colour or shape changed), csv data reads them from
    data.negative_keys."""
    duplicates: str | None = None
    """info_nce: columns sharing a sample's id (synthetic: its colour-shape class; csv: data.id_key) are
    "ignore"d (removed from the softmax) or all count as "positive"s; None: no ids, no masking."""
    hardness: str | None = None
    """info_nce: add model.hardness_strength * stop_grad(similarity) to the logits of
    "in_batch_negatives", "hard_negatives" or "all_negatives" (None: off)."""
    hardness_strength: float = 0.0
    """info_nce: the strength of model.hardness (>= 0)."""


@dataclass
class DataConfig:
    kind: str = "synthetic"
    """"synthetic" (built-in coloured shapes), "webdataset" (tar shards) or "csv" (CSV/TSV files)."""
    train: str | None = None
    """csv: path of the CSV/TSV file; webdataset: shard spec, e.g. "data/train-{000000..000099}.tar"."""
    eval: str | None = None
    """Held-out CSV/TSV for retrieval and, with a label column and eval.classnames, zero-shot evaluation."""
    image_key: str = "image"
    """CSV column (or webdataset extension list, ";"-separated) holding the image."""
    caption_key: str = "caption"
    """CSV column (or webdataset extension) holding the caption."""
    label_key: str = "label"
    """CSV column holding the class index of an evaluation row (zero-shot), if present."""
    negative_keys: list | None = None
    """CSV columns holding hard-negative captions of each row (model.hard_negatives of them, tokenized in
    the loader workers like the caption); not supported for webdataset yet."""
    id_key: str | None = None
    """CSV column holding an integer id per row (equal ids: duplicates, masked by model.duplicates);
    not supported for webdataset yet."""
    delimiter: str | None = None
    """CSV delimiter (None: tab for .tsv files, comma otherwise)."""
    workers: int | None = None
    """Loader worker processes per rank (0: load in the training process; None: the CPUs available to
    this rank minus one, at least 1 on a multi-core machine)."""
    prefetch: int = 2
    """Batches each loader worker prepares ahead."""
    shuffle_buffer: int = 1000
    """webdataset: sample shuffle buffer, filled from one shard at a time (0: no shuffling)."""
    resampled: bool = False
    """webdataset: draw shards with replacement (runs measured in samples, not epochs)."""
    root: str | None = None
    """CSV: directory that relative image paths start from and that every image must lie inside
    (None: relative to the CSV file, absolute paths anywhere allowed)."""
    augment: bool = True
    """Training images: random resized crop (data.crop_scale) instead of the eval resize + centre crop."""
    crop_scale: list = field(default_factory=lambda: [0.9, 1.0])
    """Area fraction range of the random resized crop (open_clip's default)."""
    resize_mode: str | None = None
    """Eval (and un-augmented training) resize: "shortest" + centre crop, "longest" + pad, "squash"
    (None: the model config's vision.resize_mode)."""
    fast_decode: bool = True
    """Decode large JPEGs at 1/2, 1/4 or 1/8 scale when the output still has full resolution (faster)."""
    eval_size: int = 1000
    """Synthetic data: number of held-out evaluation images (and of seen-combination images)."""
    tokenizer: str = "auto"
    """"auto": the synthetic vocabulary for synthetic data, the model's tokenizer otherwise."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate of AdamW (reached after optim.warmup_steps, then a cosine decay)."""
    weight_decay: float = 0.1
    """Applied to weight matrices only (norms, biases, embeddings, logit_scale/bias excluded)."""
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    """AdamW's [beta1, beta2]."""
    eps: float = 1e-6
    """AdamW's epsilon."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warm-up from 0 to optim.lr."""
    min_lr_ratio: float = 0.0
    """Cosine schedule ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping (0: off)."""


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to this step)."""
    batch_size: int = 128
    """Global batch (all ranks together); the contrastive loss sees all of it at once."""
    micro_batch_size: int | None = None
    """Per-rank micro-batch of the gradient cache (None: the whole per-rank batch, no caching)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1, 2 or 3."""
    precision: str = "fp32"
    """"fp32", "bf16" or "fp16"."""
    seed: int = 0
    """Seed of the model initialisation, the data order and dropout (per rank)."""
    device: str = "auto"
    """"auto" (cuda when available), "cpu" or "cuda"."""
    backend: str = "auto"
    """torch.distributed backend: "auto" (nccl on cuda, gloo on cpu), "gloo" or "nccl"."""
    threads: int | None = None
    """torch intra-op threads per process on CPU (None: the cores this process may use split between
    this node's processes, 1 to 8; never the load average, so results do not depend on how busy the
    machine is). The value used is saved in the run's config.yaml."""


@dataclass
class DistConfig:
    timeout_s: int = 600
    """Seconds a collective may wait for the other ranks before the run stops with an error naming the
    ranks that did not respond (passed to the process-group creation)."""


@dataclass
class EvalConfig:
    every: int = 250
    """Evaluate every this many steps (0: only at the end)."""
    batch_size: int = 250
    """Images (and prompts) per forward pass of the evaluation."""
    templates: list | None = None
    """Zero-shot prompt templates with "{}" (None: the dataset's defaults)."""
    classnames: Union[list, str] | None = None
    """Zero-shot class names, a list or a text file with one per line (CSV/webdataset eval data)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0: only at the end)."""
    keep: int = 2
    """Number of most recent checkpoints kept."""
    resume: str = "auto"
    """"auto" (the latest checkpoint in output_dir, if any), "never", or a checkpoint directory."""
    export: bool = True
    """Write plain weights to output_dir/model.safetensors at the end."""
    allow_config_change: list | str | None = None
    """Config keys that may differ from the checkpoint's on resume (e.g. [train.steps]); any other
    change that breaks exact resume is refused."""


@dataclass
class LogConfig:
    every: int = 10
    """Append a metrics row every this many steps."""
    progress: bool = True
    """Show a progress bar (tqdm, on stderr) with samples/s, loss, lr, logit scale and the ETA."""
    tensorboard: bool = False
    """Also write TensorBoard event files to output_dir/tensorboard (needs the tensorboard package)."""
    plot: bool = True
    """Draw output_dir/curves.png (loss and evaluation curves) at the end."""


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "dist": DistConfig,
    "eval": EvalConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


def field_help(section: str, name: str) -> str:
    """The attribute docstring of a field (read from the source), for ``--help``."""
    return _FIELD_DOCS.get(f"{section}.{name}", "")


# ---- internals ------------------------------------------------------------------------------


def _read_field_docs() -> dict:
    """Attribute docstrings (the string literal under each field) keyed by "section.key"."""
    import ast
    import inspect

    docs = {}
    try:
        tree = ast.parse(inspect.getsource(__import__(__name__, fromlist=["_"])))
    except (OSError, TypeError):
        return docs
    names = {cls.__name__: sec for sec, cls in SECTIONS.items()}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in names:
            body = node.body
            for stmt, nxt in zip(body, body[1:] + [None]):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                        docs[f"{names[node.name]}.{stmt.target.id}"] = " ".join(str(nxt.value.value).split())
    return docs


_FIELD_DOCS = _read_field_docs()
