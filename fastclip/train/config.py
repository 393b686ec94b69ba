"""Training configuration: dataclasses, YAML/JSON files, command-line overrides.

A run is described by one :class:`Config` with eight sections (``model``, ``data``, ``optim``,
``train``, ``dist``, ``eval``, ``checkpoint``, ``log``) plus ``output_dir``. Files (YAML or JSON) hold a
subset of the keys; every key can also be set on the command line as ``--section.key VALUE``.
Unknown keys are rejected with the closest known key in the message; :meth:`Config.validate`
checks every value and names the key, the expected and the received value.

    cfg = load_config("configs/tiny-synthetic.yaml", overrides={"train.steps": 100})
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from fastclip.train.config_values import (  # noqa: F401 (parse_value, read_file: re-exported)
    ConfigError,
    choice,
    coerce,
    key_list,
    minimum,
    nonneg_float,
    parse_value,
    positive_float,
    read_file,
    shown,
    suggestion,
    unknown,
    unknown_many,
)


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


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: str | None = None
    """Directory of the run: checkpoints, metrics.jsonl, curves.png, model.safetensors."""

    # ---- conversion ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Config:
        """Build from nested dicts; unknown sections or keys raise :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {type(data).__name__}")
        cfg = cls()
        problems = unknown_names(data)
        if problems:  # every unknown section and key at once, each with its suggestion
            raise ConfigError(unknown_many(problems))
        for section, values in data.items():
            if section == "output_dir":
                cfg.output_dir = coerce("output_dir", values, str | None)
                continue
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{section}: expected a mapping of keys, got {type(values).__name__}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        return cfg

    def set(self, dotted: str, value: Any) -> None:
        """Set one key, e.g. ``cfg.set("optim.lr", 1e-3)``; the value is converted to the field's type."""
        if dotted == "output_dir":
            self.output_dir = coerce(dotted, value, str | None)
            return
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            raise ConfigError(unknown("key", dotted, all_keys()))
        obj = getattr(self, section)
        hints = _hints(SECTIONS[section])
        if key not in hints:
            raise ConfigError(unknown("key", dotted, all_keys()))
        setattr(obj, key, coerce(dotted, value, hints[key]))

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> Config:
        """Check every value; raises :class:`ConfigError` naming the key, the expectation and the value."""
        m, d, o, t, e, c, lg = (
            self.model,
            self.data,
            self.optim,
            self.train,
            self.eval,
            self.checkpoint,
            self.log,
        )
        choice("model.loss", m.loss, ("auto", "clip", "siglip", "info_nce"))
        choice("model.loss_impl", m.loss_impl, ("auto", "triton", "torch", "reference"))
        if not m.name:
            raise ConfigError("model.name: expected a model name such as 'tiny', got an empty string")
        if m.dist_impl is not None:
            check_dist_impl(m.loss, m.dist_impl)
        choice("data.kind", d.kind, ("synthetic", "webdataset", "csv"))
        self._validate_family()
        if d.kind != "synthetic" and not d.train:
            raise ConfigError(f"data.train: expected a path for data.kind={d.kind!r}, got {shown(d.train)}")
        if d.kind == "synthetic" and (d.train or d.eval):
            raise ConfigError(
                "data.train/data.eval: the synthetic dataset takes no paths; "
                f"set data.kind to 'csv' or 'webdataset' to use {shown(d.train or d.eval)}"
            )
        if d.workers is not None:
            minimum("data.workers", d.workers, 0)
        minimum("data.prefetch", d.prefetch, 1)
        if d.resize_mode is not None:
            choice("data.resize_mode", d.resize_mode, ("shortest", "longest", "squash"))
        if (
            len(d.crop_scale) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.crop_scale)
            or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1
        ):
            raise ConfigError(
                f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {shown(d.crop_scale)}"
            )
        minimum("data.shuffle_buffer", d.shuffle_buffer, 0)
        minimum("data.eval_size", d.eval_size, 10)
        positive_float("optim.lr", o.lr)
        nonneg_float("optim.weight_decay", o.weight_decay)
        if len(o.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in o.betas):
            raise ConfigError(f"optim.betas: expected two numbers in [0, 1), got {shown(o.betas)}")
        positive_float("optim.eps", o.eps)
        minimum("optim.warmup_steps", o.warmup_steps, 0)
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio: expected a number in [0, 1], got {o.min_lr_ratio!r}")
        nonneg_float("optim.grad_clip", o.grad_clip)
        minimum("train.steps", t.steps, 1)
        minimum("train.batch_size", t.batch_size, 2)
        if t.micro_batch_size is not None:
            minimum("train.micro_batch_size", t.micro_batch_size, 1)
        choice("train.zero_stage", t.zero_stage, (0, 1, 2, 3))
        choice("train.precision", t.precision, ("fp32", "bf16", "fp16"))
        choice("train.device", t.device, ("auto", "cpu", "cuda"))
        choice("train.backend", t.backend, ("auto", "gloo", "nccl"))
        if t.threads is not None:
            minimum("train.threads", t.threads, 1)
        minimum("dist.timeout_s", self.dist.timeout_s, 1)
        minimum("eval.every", e.every, 0)
        minimum("eval.batch_size", e.batch_size, 1)
        if e.templates is not None:
            if not e.templates or not all(isinstance(s, str) and "{}" in s for s in e.templates):
                raise ConfigError(
                    f"eval.templates: expected a non-empty list of strings with '{{}}', got {shown(e.templates)}"
                )
        minimum("checkpoint.every", c.every, 0)
        minimum("checkpoint.keep", c.keep, 1)
        if not c.resume:
            raise ConfigError("checkpoint.resume: expected 'auto', 'never' or a checkpoint path, got ''")
        c.allow_config_change = key_list("checkpoint.allow_config_change", c.allow_config_change, all_keys())
        minimum("log.every", lg.every, 1)
        return self

    def _validate_family(self) -> None:
        """The info_nce keys (model.hard_negatives/duplicates/hardness) and their data keys."""
        m, d = self.model, self.data
        minimum("model.hard_negatives", m.hard_negatives, 0)
        if m.duplicates is not None:
            choice("model.duplicates", m.duplicates, ("ignore", "positive"))
        if m.hardness is not None:
            choice("model.hardness", m.hardness, ("in_batch_negatives", "hard_negatives", "all_negatives"))
        nonneg_float("model.hardness_strength", m.hardness_strength)
        if m.hardness is None and m.hardness_strength:
            raise ConfigError(
                f"model.hardness_strength: {m.hardness_strength!r} needs model.hardness "
                "('in_batch_negatives', 'hard_negatives' or 'all_negatives'), got None"
            )
        for key, used in (
            ("model.hard_negatives", m.hard_negatives > 0),
            ("model.duplicates", m.duplicates is not None),
            ("model.hardness", m.hardness is not None),
        ):
            if used and m.loss != "info_nce":
                raise ConfigError(
                    f"{key}: needs model.loss 'info_nce' (clip/siglip take no such option), got {m.loss!r}"
                )
        keys = d.negative_keys
        if keys is not None and (
            not keys or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys)
        ):
            raise ConfigError(
                f"data.negative_keys: expected a list of distinct CSV column names, got {shown(keys)}"
            )
        if d.id_key is not None and not d.id_key:
            raise ConfigError("data.id_key: expected a CSV column name, got ''")
        if d.kind == "webdataset":
            for key, used in (
                ("data.negative_keys", keys is not None),
                ("data.id_key", d.id_key is not None),
                ("model.hard_negatives", m.hard_negatives > 0),
                ("model.duplicates", m.duplicates is not None),
            ):
                if used:
                    raise ConfigError(
                        f"{key}: hard negatives and ids are not supported for webdataset yet (use csv data)"
                    )
        elif d.kind == "synthetic":
            for key, value in (("data.negative_keys", keys), ("data.id_key", d.id_key)):
                if value is not None:
                    raise ConfigError(
                        f"{key}: synthetic data draws its own hard negatives and ids (model.hard_negatives, "
                        f"model.duplicates); got {shown(value)}"
                    )
        else:  # csv
            if len(keys or []) != m.hard_negatives:
                raise ConfigError(
                    f"model.hard_negatives: expected len(data.negative_keys) = {len(keys or [])} for csv "
                    f"data, got {m.hard_negatives}"
                )
            if keys and d.caption_key in keys:
                raise ConfigError(f"data.negative_keys: holds the caption column {d.caption_key!r}")
            if m.duplicates is not None and d.id_key is None:
                raise ConfigError(
                    f"data.id_key: model.duplicates {m.duplicates!r} needs the CSV column of ids, got None"
                )

    def check_world(self, world_size: int) -> tuple[int, int, int]:
        """Per-rank batch, micro-batch and number of gradient-cache chunks for ``world_size`` ranks."""
        t = self.train
        if t.batch_size % world_size:
            raise ConfigError(
                f"train.batch_size: expected a multiple of the world size {world_size}, got {t.batch_size}"
            )
        local = t.batch_size // world_size
        micro = local if t.micro_batch_size is None else t.micro_batch_size
        if micro > local or local % micro:
            raise ConfigError(
                f"train.micro_batch_size: expected a divisor of the per-rank batch {local} "
                f"(train.batch_size {t.batch_size} / {world_size} ranks), got {micro}"
            )
        return local, micro, local // micro


def check_dist_impl(loss: str, dist_impl: str) -> None:
    """``model.dist_impl`` must be a strategy of the loss ``model.loss`` names ("auto": of either loss).

    The losses' own constructors are the authority on the names (the public ``ClipLoss``/``SigLipLoss``)."""
    from fastclip import ClipLoss, SigLipLoss

    if loss == "info_nce":
        from fastclip.distributed.family import FAMILY_DIST_IMPLS

        if dist_impl not in FAMILY_DIST_IMPLS:
            raise ConfigError(
                f"model.dist_impl: {shown(dist_impl)} is not a strategy of model.loss='info_nce' "
                f"(expected one of {list(FAMILY_DIST_IMPLS)})"
            )
        return
    kinds = {"clip": [ClipLoss], "siglip": [SigLipLoss], "auto": [ClipLoss, SigLipLoss]}[loss]
    reasons = []
    for cls in kinds:
        try:
            cls(dist_impl=dist_impl)
            return
        except ValueError as exc:  # the constructor's message lists the strategies it knows
            reasons.append(f"{cls.__name__}: {exc}")
    raise ConfigError(
        f"model.dist_impl: {shown(dist_impl)} is not a strategy of model.loss={loss!r} ({'; '.join(reasons)})"
    )


def unknown_names(data: dict, overrides: dict | None = None) -> list[str]:
    """One message (with a suggestion) per unknown section or key of a nested dict and of
    {"section.key": value} overrides."""
    problems = []
    for section, values in data.items():
        if section == "output_dir":
            continue
        if section not in SECTIONS:
            problems.append(unknown_top(section, values))
        elif isinstance(values, dict):
            fields = _hints(SECTIONS[section])
            problems += [unknown("key", f"{section}.{k}", all_keys()) for k in values if k not in fields]
    for dotted in overrides or {}:
        section, _, key = str(dotted).partition(".")
        if dotted != "output_dir" and (section not in SECTIONS or key not in _hints(SECTIONS[section])):
            problems.append(unknown("key", dotted, all_keys()))
    return problems


def unknown_top(name: str, value: Any) -> str:
    """The message for an unknown top-level name of a file: a section (a mapping) is matched with the
    sections, a value (``max_steps: 3``) with the keys, as ``--max_steps`` is on the command line."""
    if isinstance(value, dict):
        sections = [*SECTIONS, "output_dir"]
        if suggestion(name, sections) is not None:
            return unknown("section", name, sections)
    return unknown("key", name, suggest_names())


def suggest_names() -> list[str]:
    """Every name a suggestion may give: the sections and the keys."""
    return [*SECTIONS, *all_keys()]


def suggest(name: str) -> str | None:
    """The config name (``section.key``, a section or ``output_dir``) meant by ``name``; None if none is close.
    The one suggestion for files, overrides and command-line options."""
    name = str(name)
    if "." in name or name in SECTIONS:
        return suggestion(name, all_keys())
    return suggestion(name, suggest_names())


def all_keys() -> list[str]:
    keys = [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]
    return [*keys, "output_dir"]


def field_help(section: str, name: str) -> str:
    """The attribute docstring of a field (read from the source), for ``--help``."""
    return _FIELD_DOCS.get(f"{section}.{name}", "")


def load_config(path: str | None = None, overrides: dict | None = None) -> Config:
    """Defaults, then the file at ``path`` (YAML or JSON), then ``overrides`` ({"section.key": value})."""
    cfg = Config()
    data = read_file(path) if path is not None else {}
    problems = unknown_names(data if isinstance(data, dict) else {}, overrides)
    if problems:  # the file's and the overrides' unknown names together
        where = f"{path}: " if path is not None else ""
        raise ConfigError(where + unknown_many(problems))
    if path is not None:
        cfg = Config.from_dict(data)
    for key, value in (overrides or {}).items():
        cfg.set(key, value)
    return cfg.validate()


# ---- internals ------------------------------------------------------------------------------


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


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
