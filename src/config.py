"""Typed schema behind the Hydra configs, checked right after compose.

Each config group option names itself (``data.name``, ``prune.method`` ...); the
matching dataclass below fixes its keys and types, and ``__post_init__`` checks
ranges.  ``settings_from(cfg)`` turns a composed config into these objects or
raises ``ConfigError`` with the offending key, before any data is read or any
model is trained.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRUNABLE_TYPES = ("Conv2D", "DepthwiseConv2D", "Dense")
OBJECTIVES = (
    "accuracy_per_mb",
    "tflite_accuracy",
    "test_accuracy",
    "tflite_zip_bytes",
    "sparsity_global",
)


class ConfigError(ValueError):
    """A setting that cannot work; the message names the key."""


def register_resolvers() -> None:
    """Registers ``${project_root:}`` and each group's schema (``<group>/schema``) with Hydra.

    The resolver keeps default paths independent of the cwd. Every option of a group extends
    its schema (``defaults: [schema, _self_]``), so each key exists, typed, in every option
    (``prune=flat,layer prune.rate=0.5`` works under --multirun) and its default lives here.
    """
    from hydra.core.config_store import ConfigStore

    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    store = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        store.store(group=group, name="schema", node=schema)


def compose_config(overrides: list[str], config_name: str = "config") -> DictConfig:
    """Returns the project's config composed with overrides, as the command line would.

    For callers outside a running Hydra app (tests, reports, benchmarks).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    register_resolvers()
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        try:
            return compose(config_name=config_name, overrides=overrides)
        except ConfigCompositionException as error:  # a value the schema's type refuses
            cause = error.__cause__
            key = getattr(cause, "full_key", None)
            if not key:
                raise
            raise ConfigError(f"{key}: {str(cause).splitlines()[0]}") from None


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_fraction(value: float, key: str, high_open: bool = False) -> None:
    bad = math.isnan(value) or value < 0 or value > 1 or (high_open and value >= 1)
    _check(not bad, key, f"must be in [0, {'1)' if high_open else '1]'}, got {value}")


# ----------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """Where the images come from and how they are split."""

    name: str
    path: str | None = None
    image_size: int = 32
    val_fraction: float = 0.1
    limit_train: int | None = None
    limit_test: int | None = None
    # synthetic only
    num_classes: int = 10
    n_train: int = 512
    n_test: int = 256
    noise: float = 0.6
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.name in ("cifar10", "image_folder", "synthetic"), "data.name",
               f"unknown dataset {self.name!r}")
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        _check(0 <= self.val_fraction < 1, "data.val_fraction",
               f"must be in [0, 1), got {self.val_fraction}")
        for key in ("limit_train", "limit_test"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"data.{key}", f"must be > 0, got {value}")
        if self.name == "image_folder":
            _check(bool(self.path), "data.path", "image_folder needs a path")
        if self.name == "synthetic":
            _check(self.num_classes >= 2, "data.num_classes", "must be >= 2")
            _check(self.n_train >= self.num_classes, "data.n_train", "must be >= num_classes")
            _check(self.n_test >= 1, "data.n_test", "must be >= 1")


# ---------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Which network to build and its width and strides."""

    name: str
    input_size: int = 32
    alpha: float = 1.0  # width multiplier (ResNet-8's filters too)
    bn_momentum: float | None = 0.9  # null keeps Keras' 0.999
    dropout: float = 0.0
    # mobilenetv2_cifar
    stem_stride: int = 1
    stage_strides: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 1, 2, 1])
    # resnet8
    filters: list[int] = field(default_factory=lambda: [16, 32, 64])

    def __post_init__(self) -> None:
        _check(self.name in ("mobilenetv2", "mobilenetv2_cifar", "resnet8"), "model.name",
               f"unknown model {self.name!r}")
        _check(self.alpha > 0, "model.alpha", f"must be > 0, got {self.alpha}")
        _check(self.input_size >= 8, "model.input_size", f"must be >= 8, got {self.input_size}")
        if self.bn_momentum is not None:
            _check(0 < self.bn_momentum < 1, "model.bn_momentum", "must be in (0, 1)")
        _check(0 <= self.dropout < 1, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(len(self.stage_strides) == 7 and all(s in (1, 2) for s in self.stage_strides),
               "model.stage_strides", "needs 7 strides, each 1 or 2")
        _check(self.stem_stride in (1, 2), "model.stem_stride", "must be 1 or 2")
        _check(len(self.filters) == 3 and all(f > 0 for f in self.filters), "model.filters",
               "needs 3 positive filter counts")


# ---------------------------------------------------------------------------- train
@dataclass
class AugmentConfig:
    """Training augmentation: padded random crop and horizontal flip."""

    crop_padding: int = 4  # pad then random crop back; 0 turns it off
    flip: bool = True


@dataclass
class TrainConfig:
    """The dense baseline's training recipe (also used for fine-tuning)."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (Nesterov) | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # decoupled, applied by the optimizer
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # cosine | constant, after the warm-up
    label_smoothing: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    deterministic: bool = False  # true: bit-reproducible on CPU (TF op determinism), slower
    verbose: int = 1  # Keras progress: 0 silent, 1 bar, 2 one line per epoch

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.optimizer in ("sgd", "adam", "adamw"), "train.optimizer",
               f"must be sgd, adam or adamw, got {self.optimizer!r}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs",
               "must be in [0, train.epochs]")
        _check(self.schedule in ("cosine", "constant"), "train.schedule",
               f"must be cosine or constant, got {self.schedule!r}")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(self.augment.crop_padding >= 0, "train.augment.crop_padding", "must be >= 0")


# ---------------------------------------------------------------------------- prune
@dataclass
class PruneConfig:
    """Weight pruning: method, target and fine-tuning."""

    method: str = "none"
    rate: float = 0.5  # flat, layer: the fraction of prunable weights set to zero
    min_density: float = 0.0  # flat: keep at least this fraction of every layer
    layer_types: list[str] = field(default_factory=lambda: list(PRUNABLE_TYPES))
    finetune_epochs: int = 0  # 0 = one-shot (the reference study); > 0 fine-tunes, masks held
    finetune_lr: float = 0.01
    # tfmot: prune_low_magnitude while fine-tuning; begin/end are fractions of its steps
    schedule: str = "polynomial_decay"  # or constant (at final_sparsity)
    initial_sparsity: float = 0.5
    final_sparsity: float = 0.9
    begin: float = 0.0
    end: float = 0.8
    frequency: int = 100  # steps between mask updates
    structured_2_4: bool = False  # 2:4 structured sparsity (50%) instead of the schedule
    # layer (channel): an MLflow run id of `python -m src.sensitivity`; per-layer rates reaching
    # `rate` overall, the least sensitive layers pruned hardest
    rates_from: str | None = None

    def __post_init__(self) -> None:
        _check(self.method in ("none", "flat", "layer", "tfmot"), "prune.method",
               f"unknown method {self.method!r}")
        _check_fraction(self.rate, "prune.rate", high_open=True)
        _check_fraction(self.min_density, "prune.min_density")
        _check(self.rate + self.min_density <= 1, "prune.min_density",
               "prune.rate + prune.min_density must not exceed 1")
        for name in self.layer_types:
            _check(name in PRUNABLE_TYPES, "prune.layer_types",
                   f"unknown layer type {name!r}; choose from {', '.join(PRUNABLE_TYPES)}")
        _check(self.method == "none" or bool(self.layer_types), "prune.layer_types",
               "must name at least one layer type")
        _check(self.finetune_epochs >= 0, "prune.finetune_epochs", "must be >= 0")
        _check(self.finetune_lr > 0, "prune.finetune_lr", "must be > 0")
        _check(not self.rates_from or self.method in ("layer", "channel"), "prune.rates_from",
               f"per-layer rates need prune=layer, not {self.method!r}")
        if self.method == "tfmot":
            self._check_tfmot()

    def _check_tfmot(self) -> None:
        _check(self.schedule in ("polynomial_decay", "constant"), "prune.schedule",
               f"must be polynomial_decay or constant, got {self.schedule!r}")
        _check_fraction(self.initial_sparsity, "prune.initial_sparsity", high_open=True)
        _check_fraction(self.final_sparsity, "prune.final_sparsity", high_open=True)
        _check(self.initial_sparsity <= self.final_sparsity, "prune.initial_sparsity",
               "must not exceed prune.final_sparsity")
        _check_fraction(self.begin, "prune.begin", high_open=True)
        _check_fraction(self.end, "prune.end")
        _check(self.begin < self.end, "prune.begin", "must be before prune.end")
        _check(self.frequency >= 1, "prune.frequency", "must be >= 1")
        _check(self.finetune_epochs >= 1, "prune.finetune_epochs",
               "tfmot prunes while training: needs at least 1 epoch")
        _check("DepthwiseConv2D" not in self.layer_types, "prune.layer_types",
               "tfmot leaves DepthwiseConv2D kernels dense; remove it from the list")

# ---------------------------------------------------------------------------- quant
@dataclass
class QuantConfig:
    """Post-training quantization of the TFLite export."""

    mode: str = "none"
    representative_samples: int = 256  # int8: calibration images, a seeded random subset
    integer_io: bool = False  # int8: int8 input and output tensors too
    sparse_encoding: bool = False  # store sparse weights compressed in the .tflite

    def __post_init__(self) -> None:
        _check(self.mode in ("none", "dynamic", "int8", "float16"), "quant.mode",
               f"unknown mode {self.mode!r}")
        _check(self.representative_samples >= 1, "quant.representative_samples", "must be >= 1")


# ------------------------------------------------------------------ tracking, paths
@dataclass
class TrackingConfig:
    """Where MLflow records runs."""

    uri: str
    artifact_location: str | None = None
    experiment: str = "prunesweep"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", "must not be empty")


@dataclass
class PathsConfig:
    """Folders the project writes to."""

    root: str
    mlruns_dir: str
    cache_dir: str
    output_dir: str


@dataclass
class Settings:
    """Everything one experiment needs, typed and range-checked."""

    paths: PathsConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    prune: PruneConfig
    quant: QuantConfig
    tracking: TrackingConfig
    objective: str = "accuracy_per_mb"

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVES, "objective",
               f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")


# The schema behind each config group; settings_from checks every group against it.
GROUP_SCHEMAS: dict[str, type] = {
    "paths": PathsConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "prune": PruneConfig,
    "quant": QuantConfig,
    "tracking": TrackingConfig,
}


def _typed(cfg: Any, schema: type, key: str) -> Any:
    """Returns ``cfg`` as an instance of ``schema``; bad keys and types raise ConfigError."""
    if cfg is None:
        raise ConfigError(f"{key}: missing config group")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        full_key = getattr(error, "full_key", None) or ""
        detail = str(error).splitlines()[0]
        raise ConfigError(f"{key}.{full_key}: {detail}" if full_key else f"{key}: {detail}") \
            from None


def settings_from(cfg: DictConfig) -> Settings:
    """Returns the typed settings of a composed config, or raises ConfigError naming the key."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        full_key = getattr(error, "full_key", None) or "config"
        raise ConfigError(f"{full_key}: {str(error).splitlines()[0]}") from None
    parts = {name: _typed(resolved.get(name), schema, name)
             for name, schema in GROUP_SCHEMAS.items()}
    settings = Settings(**parts, objective=resolved.get("objective", "accuracy_per_mb"))
    prune, model = settings.prune, settings.model
    _check(prune.method == "none" or model.name != "resnet8"
           or set(prune.layer_types) - {"DepthwiseConv2D"}, "prune.layer_types",
           "resnet8 has no DepthwiseConv2D layers; add Conv2D or Dense")
    _check(settings.data.image_size == model.input_size, "data.image_size",
           f"{settings.data.image_size} differs from model.input_size {model.input_size}")
    return settings


# --------------------------------------------------------------------------- search
MINIMIZED = ("tflite_zip_bytes", "tflite_bytes", "model_zip_bytes", "model_bytes")
SEARCH_GROUPS = ("data", "model", "prune", "quant", "train")


@dataclass
class DimensionConfig:
    """One search dimension: a config group choice or a value, optionally conditional."""

    path: str
    choices: list[Any] | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    type: str = "float"
    when: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class EarlyStopConfig:
    """Optuna trial early stopping (Optuna calls it pruning; here that word means weights)."""

    rule: str = "median"
    startup_trials: int = 2
    warmup_epochs: int = 0
    percentile: float = 50.0
    min_epochs: int = 1
    max_epochs: int = 3
    reduction_factor: int = 3


@dataclass
class SearchConfig:
    """An Optuna study: objectives, space, storage, budget and faults."""

    study_name: str
    storage: str
    objectives: list[str] = field(default_factory=lambda: ["accuracy_per_mb"])
    accuracy_floor: float | None = None
    n_trials: int | None = 10
    timeout: float | None = None
    seed: int = 0
    sampler: str = "tpe"
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    space: dict[str, DimensionConfig] = field(default_factory=dict)
    heartbeat_seconds: int | None = 30
    grace_seconds: int | None = None
    max_retries: int = 1
    max_failure_rate: float = 0.5
    failure_rate_min_trials: int = 4
    connect_timeout: int = 10

    def __post_init__(self) -> None:
        _check(bool(self.study_name), "search.study_name", "must not be empty")
        _check(self.storage.split(":", 1)[0] in ("sqlite", "postgresql", "postgresql+psycopg"),
               "search.storage", f"unsupported URL scheme in {self.storage!r}; use sqlite:///... "
               "or postgresql://...")
        _check(len(self.objectives) in (1, 2), "search.objectives", "give one or two metrics")
        for name in self.objectives:
            _check(name in OBJECTIVES, "search.objectives",
                   f"unknown metric {name!r}; choose from {', '.join(OBJECTIVES)}")
        if self.accuracy_floor is not None:
            _check_fraction(self.accuracy_floor, "search.accuracy_floor")
        _check(self.n_trials is None or self.n_trials >= 1, "search.n_trials", "must be >= 1")
        _check(self.n_trials is not None or self.timeout is not None, "search.n_trials",
               "set search.n_trials or search.timeout")
        _check(self.timeout is None or self.timeout > 0, "search.timeout", "must be > 0")
        _check(self.sampler in ("tpe", "random", "nsga2"), "search.sampler",
               f"must be tpe, random or nsga2, got {self.sampler!r}")
        rule = self.early_stop.rule
        _check(rule in ("none", "median", "percentile", "hyperband"), "search.early_stop.rule",
               f"must be none, median, percentile or hyperband, got {rule!r}")
        _check(0 < self.early_stop.percentile < 100, "search.early_stop.percentile",
               f"must be between 0 and 100, got {self.early_stop.percentile}")
        _check(rule == "none" or len(self.objectives) == 1, "search.early_stop.rule",
               "trial early stopping needs a single objective; set it to none")
        _check(bool(self.space), "search.space", "needs at least one dimension")
        _check(self.heartbeat_seconds is None or self.heartbeat_seconds >= 1,
               "search.heartbeat_seconds", "must be >= 1 or null")
        _check(self.grace_seconds is None or self.grace_seconds >= 1, "search.grace_seconds",
               "must be >= 1 or null")
        _check(self.max_retries >= 0, "search.max_retries", "must be >= 0")
        _check_fraction(self.max_failure_rate, "search.max_failure_rate")
        _check(self.failure_rate_min_trials >= 1, "search.failure_rate_min_trials", "must be >= 1")
        _check(self.connect_timeout >= 1, "search.connect_timeout", "must be >= 1")
        for name, dim in self.space.items():
            _check_dimension(name, dim, list(self.space)[: list(self.space).index(name)])

    @property
    def directions(self) -> list[str]:
        """Returns 'maximize' or 'minimize' for each objective."""
        return ["minimize" if name in MINIMIZED else "maximize" for name in self.objectives]


def _check_dimension(name: str, dim: DimensionConfig, earlier: list[str]) -> None:
    key = f"search.space.{name}"
    head, _, rest = dim.path.partition(".")
    _check(head in SEARCH_GROUPS, f"{key}.path",
           f"unknown parameter path {dim.path!r}; it must start with {', '.join(SEARCH_GROUPS)}")
    if rest:
        _check(_schema_has(_GROUP_SCHEMAS[head], rest.split(".")), f"{key}.path",
               f"unknown parameter path {dim.path!r}")
    else:
        _check(dim.choices is not None, f"{key}.choices", "a group dimension needs choices")
        known = {p.stem for p in (PROJECT_ROOT / "conf" / head).glob("*.yaml")}
        for choice in dim.choices or []:
            _check(choice in known, f"{key}.choices", f"unknown {head} option {choice!r}")
    if dim.choices is not None:
        _check(len(dim.choices) > 0, f"{key}.choices", "must not be empty")
    else:
        _check(dim.low is not None and dim.high is not None, f"{key}", "needs choices or low/high")
        _check(dim.low <= dim.high, f"{key}.low", f"low {dim.low} is above high {dim.high}")
        _check(not dim.log or dim.low > 0, f"{key}.low", "a log scale needs low > 0")
        _check(dim.type in ("float", "int"), f"{key}.type", "must be float or int")
    for other in dim.when:
        _check(other in earlier, f"{key}.when", f"{other!r} is not a dimension listed before it")


def _schema_has(schema: type, parts: list[str]) -> bool:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    if parts[0] not in fields:
        return False
    if len(parts) == 1:
        return True
    inner = fields[parts[0]].default_factory  # nested dataclass, e.g. train.augment
    return dataclasses.is_dataclass(inner) and _schema_has(inner, parts[1:])


_GROUP_SCHEMAS = {"data": DataConfig, "model": ModelConfig, "prune": PruneConfig,
                  "quant": QuantConfig, "train": TrainConfig}


def search_settings_from(cfg: DictConfig) -> SearchConfig:
    """Returns the typed search settings, or raises ConfigError naming the key."""
    if cfg.get("search") is None:
        raise ConfigError("search: choose a search config, e.g. search=accuracy_per_mb")
    try:
        resolved = OmegaConf.to_container(cfg.search, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"search: {str(error).splitlines()[0]}") from None
    return _typed(resolved, SearchConfig, "search")
