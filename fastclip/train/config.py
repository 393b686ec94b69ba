"""Training configuration: the :class:`Config`, YAML/JSON files, command-line overrides, validation.

A run is described by one :class:`Config` with eight sections (``model``, ``data``, ``optim``,
``train``, ``dist``, ``eval``, ``checkpoint``, ``log``; their dataclasses are in
:mod:`fastclip.train.config_sections` and importable from here) plus ``output_dir``. Files (YAML or
JSON) hold a subset of the keys; every key can also be set on the command line as
``--section.key VALUE``. Unknown keys are rejected with the closest known key in the message;
:meth:`Config.validate` checks every value and names the key, the expected and the received value.

    cfg = load_config("configs/tiny-synthetic.yaml", overrides={"train.steps": 100})
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from fastclip.train.config_sections import (  # noqa: F401 (the sections and field_help: re-exported)
    SECTIONS,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    field_help,
)
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
