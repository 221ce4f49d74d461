"""Typed schema behind the Hydra configs, checked right after compose.

Each config group option names itself (``data.name``, ``prune.method`` ...); the
matching dataclass below fixes its keys and types, and ``__post_init__`` checks
ranges.  ``settings_from(cfg)`` turns a composed config into these objects or
raises ``ConfigError`` with the offending key, before any data is read or any
model is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRUNABLE_TYPES = ("Conv2D", "DepthwiseConv2D", "Dense")
LATENCY_KERNELS = ("xnnpack", "builtin")  # LiteRT's default XNNPACK delegate | its own kernels
OBJECTIVES = (
    "accuracy_per_mb",
    "tflite_accuracy",
    "test_accuracy",
    "tflite_zip_bytes",
    "sparsity_global",
)


# Settings that say where a run wrote, how it printed or how often it saved, not what it
# computed: results rows (results/collect.py) and study resumes (src/search/study.py) ignore them.
NOT_RESULT = ("paths", "tracking", "train.verbose", "train.checkpoint_every", "objective")


# Settings added after baselines were cached, studies started and results recorded, with the
# value that leaves behaviour as it was: left out of cache keys, a study's recorded settings
# and results rows while at that value, so what was recorded before still matches.
ADDED_LATER = {"train.augment.rotation": 0.0, "train.lr_decay": 0.99,
               "measure.latency_kernels": "xnnpack", "prune.widths": None,
               "train.augment.mixup": 0.0, "train.swa_start": None, "train.swa_lr": 0.5,
               "quant.strip_names": False, "quant.qat_epochs": 0, "quant.qat_lr": 0.002}


def without_added_defaults(settings: dict, prefix: str = "") -> dict:
    """Returns settings (nested, or flattened to dotted keys) without the ADDED_LATER ones at
    their neutral value; prefix is the dotted path of a nested part ('train.')."""
    kept = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            kept[key] = without_added_defaults(value, f"{name}.")
        elif name not in ADDED_LATER or value != ADDED_LATER[name]:
            kept[key] = value
    return kept


# The prune settings that prune.widths replaces: with widths set they change nothing, so what
# compares runs (fine-tuning cache keys, results rows, a study's resumes) sees their defaults.
REPLACED_BY_WIDTHS = ("rate", "scope", "min_channels", "channel_multiple")


def widths_text(widths: list[int] | str | None) -> str:
    """Returns prune.widths as runs show it ('8-8-16-16-64-48'), from the list or its MLflow
    param text ('[8, 8, 16]'); '' when unset (None, or the param's 'None' or 'null')."""
    if widths is None or widths in ("None", "null"):
        return ""
    parts = widths.strip("[]").split(",") if isinstance(widths, str) else widths
    return "-".join(str(part).strip() for part in parts)


def with_replaced_at_default(prune: dict, prefix: str = "") -> dict:
    """Returns prune settings (a PruneConfig's dict, or flattened ones with prefix 'prune.')
    with those prune.widths replaces at their defaults when widths is set."""
    if not widths_text(prune.get(f"{prefix}widths")):
        return prune
    defaults = {f.name: f.default for f in fields(PruneConfig)}
    return {**prune, **{f"{prefix}{name}": defaults[name] for name in REPLACED_BY_WIDTHS
                        if f"{prefix}{name}" in prune}}


def under(key: str, *parts: str) -> bool:
    """Returns whether a dotted setting is one of parts or inside one ('train.lr' is in 'train')."""
    return any(key == part or key.startswith(f"{part}.") for part in parts)


def shapes_result(key: str) -> bool:
    """Returns whether a flattened setting ('train.lr') can change what a run computes."""
    return not under(key, *NOT_RESULT)


def result_settings(flat: dict) -> dict:
    """Returns the flattened settings that shape what a run computes: what results rows and a
    study's resumes compare (settings added later count only away from their neutral value)."""
    return {key: value for key, value in
            without_added_defaults(with_replaced_at_default(flat, "prune.")).items()
            if shapes_result(key)}


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
    # image_folder, npz: class names in label order (default: sorted folder names; 0..n-1)
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        _check(self.name in ("cifar10", "image_folder", "synthetic", "npz"), "data.name",
               f"unknown dataset {self.name!r}")
        _check(self.image_size >= 8, "data.image_size", f"must be >= 8, got {self.image_size}")
        _check(0 <= self.val_fraction < 1, "data.val_fraction",
               f"must be in [0, 1), got {self.val_fraction}")
        for key in ("limit_train", "limit_test"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"data.{key}", f"must be > 0, got {value}")
        if self.name in ("image_folder", "npz"):
            _check(bool(self.path), "data.path", f"{self.name} needs a path")
        if self.classes is not None:
            _check(self.name in ("image_folder", "npz"), "data.classes",
                   "only image_folder and npz data take class names")
            _check(len(set(self.classes)) == len(self.classes) >= 2, "data.classes",
                   "needs at least 2 distinct class names")
        if self.name == "synthetic":
            _check(self.path is None, "data.path", "synthetic data reads no file (as "
                   "experiment=quick sets); add data=cifar10, data=npz or data=image_folder")
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
    # file: a trained model loaded as the dense baseline (see src/model_file.py)
    path: str | None = None
    input_scale: str = "raw"
    trust_code: bool = False
    custom_objects: str | None = None
    head: str = "auto"

    def __post_init__(self) -> None:
        _check(self.name in ("mobilenetv2", "mobilenetv2_cifar", "resnet8", "file"),
               "model.name", f"unknown model {self.name!r}")
        if self.name == "file":
            _check(bool(self.path), "model.path", "model=file needs the path of a model file")
        else:
            _check(self.path is None, "model.path", f"model={self.name} builds a new model; "
                   "add model=file to load this file as the dense baseline")
        _check(self.input_scale in ("raw", "unit", "symmetric"), "model.input_scale",
               f"must be raw (0..255), unit (0..1) or symmetric (-1..1), got {self.input_scale!r}")
        _check(self.name == "file" or self.input_scale == "raw", "model.input_scale",
               "built-in models scale inside the model and take raw pixels; only model=file "
               "takes another convention")
        _check(self.head in ("auto", "softmax", "logits"), "model.head",
               f"must be auto, softmax or logits, got {self.head!r}")
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
    """Training augmentation: random rotation, padded random crop, horizontal flip and mixup."""

    crop_padding: int = 4  # pad then random crop back; 0 turns it off
    flip: bool = True
    rotation: float = 0.0  # degrees: each image turned by a random angle within +-rotation
    # mixup: each image (and its label) blended with another of the batch, weight ~ Beta(a, a);
    # a is this value, 0 turns it off (0.2-0.4 is usual for CIFAR-10)
    mixup: float = 0.0


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
    schedule: str = "cosine"  # cosine | constant | exponential, after the warm-up
    lr_decay: float = 0.99  # exponential: the rate is multiplied by this after every epoch
    label_smoothing: float = 0.1
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    deterministic: bool = False  # true: bit-reproducible on CPU (TF op determinism), slower
    verbose: int = 1  # Keras progress: 0 silent, 1 bar, 2 one line per epoch
    checkpoint_every: int = 1  # epochs between resumable checkpoints of a baseline training
    jit_compile: bool = False  # XLA-compile training and evaluation (benchmarks/train_speed.py)
    # Stochastic weight averaging: the weights at the end of every epoch after this fraction of
    # the epochs are averaged, and the average (BatchNorm statistics re-estimated on the training
    # images) is the trained model; null: off. With the cosine schedule the rate decays to
    # lr x swa_lr by the first averaged epoch and holds there.
    swa_start: float | None = None
    swa_lr: float = 0.5

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.optimizer in ("sgd", "adam", "adamw"), "train.optimizer",
               f"must be sgd, adam or adamw, got {self.optimizer!r}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.momentum < 1, "train.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.warmup_epochs <= self.epochs, "train.warmup_epochs",
               "must be in [0, train.epochs]")
        _check(self.schedule in ("cosine", "constant", "exponential"), "train.schedule",
               f"must be cosine, constant or exponential, got {self.schedule!r}")
        _check(0 < self.lr_decay <= 1, "train.lr_decay", f"must be in (0, 1], got {self.lr_decay}")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", "must be in [0, 1)")
        _check(self.augment.crop_padding >= 0, "train.augment.crop_padding", "must be >= 0")
        _check(0 <= self.augment.rotation <= 180, "train.augment.rotation",
               f"must be in [0, 180] degrees, got {self.augment.rotation}")
        _check(self.augment.mixup >= 0, "train.augment.mixup",
               f"must be >= 0 (0 turns it off), got {self.augment.mixup}")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
        _check(self.swa_start is None or 0 < self.swa_start < 1, "train.swa_start",
               f"must be in (0, 1), a fraction of the epochs, or null (off), got {self.swa_start}")
        _check(0 < self.swa_lr <= 1, "train.swa_lr",
               f"must be in (0, 1], a fraction of the peak rate, got {self.swa_lr}")
        _check(self.swa_lr == ADDED_LATER["train.swa_lr"]
               or (self.swa_start is not None and self.schedule == "cosine"),
               "train.swa_lr", "sets the cosine schedule's rate while weights are averaged: "
               "it needs train.swa_start and train.schedule=cosine")


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
    # channel: remove whole filters and rebuild a smaller dense model
    criterion: str = "l1"  # l1 | l2 norm of each filter
    bn_scale: bool = True  # times |gamma| of the BatchNorm after it
    scope: str = "global"  # global: one threshold over group-normalised scores | layer: per group
    min_channels: int = 4  # channels every group keeps at least (rate, rates_from)
    # each group keeps a multiple of this many channels (rounded to the nearest): int8 kernels
    # work in blocks of channels, so 17 kept channels cost about what 24 do (benchmarks/RESULTS.md)
    channel_multiple: int = 1
    magnitude_rate: float = 0.0  # > 0: then flat magnitude pruning, held while fine-tuning
    # channels each prunable group keeps, in model order (a wrong count is refused before any
    # training, listing the groups and their sizes): the highest-scoring channels are kept.
    # Set, it replaces rate, scope, min_channels and channel_multiple, so capacity goes where
    # the device's kernels make it cheap (benchmarks.channel_widths --groups times such shapes)
    widths: list[int] | None = None

    def __post_init__(self) -> None:
        _check(self.method in ("none", "flat", "layer", "tfmot", "channel"), "prune.method",
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
               f"per-layer rates need prune=layer or channel, not {self.method!r}")
        _check(self.widths is None or self.method == "channel", "prune.widths",
               f"channels kept per group need prune=channel, not {self.method!r}")
        if self.method == "tfmot":
            self._check_tfmot()
        if self.method == "channel":
            self._check_channel()

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

    def _check_channel(self) -> None:
        _check(self.criterion in ("l1", "l2"), "prune.criterion",
               f"must be l1 or l2, got {self.criterion!r}")
        _check(self.scope in ("global", "layer"), "prune.scope",
               f"must be global or layer, got {self.scope!r}")
        _check(self.min_channels >= 1, "prune.min_channels",
               f"must be >= 1, got {self.min_channels}")
        _check(self.channel_multiple >= 1, "prune.channel_multiple",
               f"must be >= 1, got {self.channel_multiple}")
        _check_fraction(self.magnitude_rate, "prune.magnitude_rate", high_open=True)
        _check(self.widths is None or (len(self.widths) > 0 and min(self.widths) >= 0),
               "prune.widths", f"channels kept per group, 0 or more, got {self.widths}")
        _check(self.widths is None or not self.rates_from, "prune.widths",
               "give either prune.widths or prune.rates_from, not both")

# ---------------------------------------------------------------------------- quant
@dataclass
class QuantConfig:
    """Post-training quantization of the TFLite export."""

    mode: str = "none"
    representative_samples: int = 256  # int8: calibration images, a seeded random subset
    integer_io: bool = False  # int8: int8 input and output tensors too
    sparse_encoding: bool = False  # store sparse weights compressed in the .tflite
    # drop the tensor and subgraph names from the .tflite (signatures kept): strings no device
    # reads, 6% of a 60 KB int8 ResNet-8; the outputs are unchanged
    strip_names: bool = False
    # int8: epochs of quantization-aware training before the export (src/qat.py), 0 off, with
    # a cosine decay from qat_lr
    qat_epochs: int = 0
    qat_lr: float = 0.002

    def __post_init__(self) -> None:
        _check(self.mode in ("none", "dynamic", "int8", "float16"), "quant.mode",
               f"unknown mode {self.mode!r}")
        _check(self.representative_samples >= 1, "quant.representative_samples", "must be >= 1")
        _check(self.qat_epochs >= 0, "quant.qat_epochs", f"must be >= 0, got {self.qat_epochs}")
        _check(self.qat_epochs == 0 or self.mode == "int8", "quant.qat_epochs",
               f"trains for an int8 export; use quant=int8 (quant.mode is {self.mode!r})")
        _check(self.qat_lr > 0, "quant.qat_lr", f"must be > 0, got {self.qat_lr}")
        _check(self.qat_lr == ADDED_LATER["quant.qat_lr"] or self.qat_epochs > 0, "quant.qat_lr",
               "is the quantization-aware training's rate: it needs quant.qat_epochs")


# -------------------------------------------------------------------------- measure
@dataclass
class MeasureConfig:
    """How the exported model's latency is measured (LiteRT, batch 1)."""

    latency_threads: int = 1
    latency_warmup: int = 10
    latency_runs: int = 30
    latency_repeats: int = 5
    latency_kernels: str = "xnnpack"  # LiteRT's default delegate | builtin: its own kernels

    def __post_init__(self) -> None:
        _check(self.latency_kernels in LATENCY_KERNELS, "measure.latency_kernels",
               f"unknown kernels {self.latency_kernels!r}; choose from "
               f"{', '.join(LATENCY_KERNELS)}")
        _check(self.latency_threads >= 1, "measure.latency_threads",
               f"must be >= 1, got {self.latency_threads}")
        _check(self.latency_warmup >= 0, "measure.latency_warmup",
               f"must be >= 0, got {self.latency_warmup}")
        _check(self.latency_runs >= 1, "measure.latency_runs",
               f"must be >= 1, got {self.latency_runs}")
        _check(self.latency_repeats >= 1, "measure.latency_repeats",
               f"must be >= 1, got {self.latency_repeats}")


# -------------------------------------------------------------------------- distill
@dataclass
class DistillConfig:
    """Knowledge distillation while fine-tuning: soft-loss weight, temperature, teacher."""

    alpha: float = 0.0
    temperature: float = 4.0
    # null: the run's own dense baseline; else a cache key or model file, or a list of them
    # (an ensemble: their geometric mean teaches)
    teacher: Any = None

    def __post_init__(self) -> None:
        _check_fraction(self.alpha, "distill.alpha")
        if self.teacher is not None:  # one name (an all-digit cache key too) or a list
            names = self.teacher if isinstance(self.teacher, list) else [self.teacher]
            names = [str(n) if isinstance(n, int) else n for n in names]
            _check(bool(names) and all(isinstance(n, str) and n for n in names),
                   "distill.teacher", f"must be a cache key or model file, or a non-empty list "
                   f"of them, got {self.teacher!r}")
            self.teacher = names[0] if len(names) == 1 else names  # [a] is the setting a
        _check(self.temperature > 0, "distill.temperature", f"must be > 0, got {self.temperature}")

    @property
    def teachers(self) -> list[str]:
        """Returns the teachers distill.teacher names, [] for the run's own dense baseline."""
        if self.teacher is None:
            return []
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)


# ------------------------------------------------------------------ tracking, paths
@dataclass
class TrackingConfig:
    """Where MLflow records runs."""

    uri: str
    artifact_location: str | None = None
    experiment: str = "prunesweep"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    # The same command after an interruption goes on in the interrupted run (not a new one).
    continue_interrupted: bool = True

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
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        _check(self.objective in OBJECTIVES, "objective",
               f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        _check(self.train.swa_start is None or self.prune.method != "tfmot", "train.swa_start",
               "cannot average the weights of a tfmot schedule, whose masks change while it "
               "trains; use prune=flat, layer or channel")


# The schema behind each config group; settings_from checks every group against it.
GROUP_SCHEMAS: dict[str, type] = {
    "paths": PathsConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "prune": PruneConfig,
    "quant": QuantConfig,
    "tracking": TrackingConfig,
    "measure": MeasureConfig,
    "distill": DistillConfig,
}


def _typed(cfg: Any, schema: type, key: str) -> Any:
    """Returns ``cfg`` as an instance of ``schema``; bad keys and types raise ConfigError."""
    if cfg is None:
        raise ConfigError(f"{key}: missing config group")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        return OmegaConf.to_object(merged)
    except (ConfigKeyError, ConfigAttributeError) as error:  # a key the schema lacks
        nested = error.object_type if is_dataclass(error.object_type) else schema
        raise ConfigError(unknown_setting(f"{key}.{error.full_key}", nested)) from None
    except OmegaConfBaseException as error:
        full_key = getattr(error, "full_key", None) or ""
        detail = str(error).splitlines()[0]
        raise ConfigError(f"{key}.{full_key}: {detail}" if full_key else f"{key}: {detail}") \
            from None


def unknown_setting(full_key: str, schema: type | None, known: list[str] | None = None) -> str:
    """Returns why full_key ('prune.rat') is refused: no such setting, with the closest of
    the settings beside it: known, else its schema's fields (a dataclass), else at the top
    level TOP_LEVEL."""
    parent, _, name = full_key.rpartition(".")
    if known is None:
        known = [f.name for f in fields(schema)] if schema is not None and is_dataclass(schema) \
            else [] if parent else list(TOP_LEVEL)
    close = get_close_matches(name, known, n=1)
    if close:
        return f"{full_key}: no such setting (did you mean {parent + '.' if parent else ''}" \
               f"{close[0]}?)"
    return f"{full_key}: no such setting; {parent or 'the config'} has {', '.join(known)}" \
        if known else f"{full_key}: no such setting"


# What the commands read at the top of a composed config: anything else (`+foo=1`) is a typo.
TOP_LEVEL = (*GROUP_SCHEMAS, "objective", "search", "sensitivity")


def check_top_level(cfg: DictConfig) -> None:
    """Raises ConfigError for a top-level key no command reads: it would be ignored silently."""
    for key in cfg:
        if key not in TOP_LEVEL:
            raise ConfigError(unknown_setting(str(key), None))


def settings_from(cfg: DictConfig) -> Settings:
    """Returns the typed settings of a composed config, or raises ConfigError naming the key."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as error:
        full_key = getattr(error, "full_key", None) or "config"
        raise ConfigError(f"{full_key}: {str(error).splitlines()[0]}") from None
    for later_group in ("measure", "distill"):  # configs stored before these groups existed
        resolved.setdefault(later_group, {})
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
