"""The search-space language: a study's objectives, dimensions, budget and faults, typed.

``search_settings_from(cfg)`` turns the composed ``search`` group into a ``SearchConfig`` or
raises ``ConfigError`` naming the key, before the study starts. The valid objectives,
samplers and early-stop rules are the keys of the tables that dispatch on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from src.config import (
    PROJECT_ROOT,
    REPLACED_BY_WIDTHS,
    ConfigError,
    DataConfig,
    ModelConfig,
    PruneConfig,
    QuantConfig,
    TrainConfig,
    _check,
    _check_fraction,
    _typed,
    under,
)
from src.search.objectives import OBJECTIVES, SIZES
from src.search.study import SAMPLERS, TRIAL_STOPPERS

# The config groups a dimension may choose an option of, or set a value in.
GROUP_SCHEMAS = {"data": DataConfig, "model": ModelConfig, "prune": PruneConfig,
                 "quant": QuantConfig, "train": TrainConfig}


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
    size: str = "zipped"
    accuracy_floor: float | None = None
    n_trials: int | None = 20
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
    trial_process: bool = True  # each trial in a child process: a native crash fails it alone

    def __post_init__(self) -> None:
        _check(bool(self.study_name), "search.study_name", "must not be empty")
        _check(self.storage.split(":", 1)[0] in ("sqlite", "postgresql", "postgresql+psycopg"),
               "search.storage", f"unsupported URL scheme in {self.storage!r}; use sqlite:///... "
               "or postgresql://...")
        _check(len(self.objectives) in (1, 2, 3), "search.objectives", "give one to three metrics")
        for name in self.objectives:
            _check(name in OBJECTIVES, "search.objectives",
                   f"unknown metric {name!r}; choose from {', '.join(OBJECTIVES)}")
        _check(self.size in SIZES, "search.size",
               f"must be {' or '.join(SIZES)}, got {self.size!r}")
        if self.accuracy_floor is not None:
            _check_fraction(self.accuracy_floor, "search.accuracy_floor")
        _check(self.n_trials is None or self.n_trials >= 1, "search.n_trials", "must be >= 1")
        _check(self.n_trials is not None or self.timeout is not None, "search.n_trials",
               "set search.n_trials or search.timeout")
        _check(self.timeout is None or self.timeout > 0, "search.timeout", "must be > 0")
        _check(self.sampler in SAMPLERS, "search.sampler",
               f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        rule = self.early_stop.rule
        _check(rule in TRIAL_STOPPERS, "search.early_stop.rule",
               f"must be one of {', '.join(TRIAL_STOPPERS)}, got {rule!r}")
        _check(0 < self.early_stop.percentile < 100, "search.early_stop.percentile",
               f"must be between 0 and 100, got {self.early_stop.percentile}")
        _check(rule == "none" or len(self.objectives) == 1, "search.early_stop.rule",
               "trial early stopping needs a single objective; set it to none")
        _check(rule == "none" or OBJECTIVES[self.objectives[0]].estimate is not None,
               "search.early_stop.rule", f"{self.objectives[0]} cannot be estimated before the "
               "trial's model is exported; set the rule to none")
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
        return [OBJECTIVES[name].direction for name in self.objectives]


def _check_dimension(name: str, dim: DimensionConfig, earlier: list[str]) -> None:
    key = f"search.space.{name}"
    head, _, rest = dim.path.partition(".")
    _check(head in GROUP_SCHEMAS, f"{key}.path",
           f"unknown parameter path {dim.path!r}; it must start with {', '.join(GROUP_SCHEMAS)}")
    if rest:
        _check(_schema_has(GROUP_SCHEMAS[head], rest.split(".")), f"{key}.path",
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


def search_settings_from(cfg: DictConfig) -> SearchConfig:
    """Returns the typed search settings, or raises ConfigError naming the key."""
    if cfg.get("search") is None:
        raise ConfigError("search: choose a search config, e.g. search=accuracy_per_mb")
    try:
        resolved = OmegaConf.to_container(cfg.search, resolve=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"search: {str(error).splitlines()[0]}") from None
    return _typed(resolved, SearchConfig, "search")


def refuse_model_dims(space: dict[str, DimensionConfig]) -> None:
    """Raises ConfigError for a search dimension that builds a model: with model=file the trials
    prune the loaded one, and a sampled model group or model.* value would silently replace it."""
    for name, dim in space.items():
        if under(dim.path, "model"):
            raise ConfigError(f"search.space.{name}.path: {dim.path} would build another model, "
                              "but model=file loads a trained one; drop this dimension")


def refuse_tfmot_dims(space: dict[str, DimensionConfig]) -> None:
    """Raises ConfigError when train.swa_start is set and a dimension can pick prune=tfmot,
    whose weights cannot be averaged: each such trial would fail."""
    for name, dim in space.items():
        if dim.path in ("prune", "prune.method") and "tfmot" in (dim.choices or []):
            kept = ",".join(str(c) for c in dim.choices if c != "tfmot")
            raise ConfigError(f"search.space.{name}: train.swa_start cannot average a tfmot "
                              f"trial's weights; leave tfmot out: "
                              f"'search.space.{name}.choices=[{kept}]'")


def refuse_qat_dims(space: dict[str, DimensionConfig]) -> None:
    """Raises ConfigError when quant.qat_epochs is set and a dimension can pick a quantization
    other than int8, which quantization-aware training does not export: each such trial would
    fail."""
    for name, dim in space.items():
        others = [c for c in dim.choices or [] if c != "int8"]
        if dim.path in ("quant", "quant.mode") and others:
            raise ConfigError(f"search.space.{name}: quant.qat_epochs trains for an int8 export; "
                              f"{','.join(map(str, others))} trials would fail: "
                              f"'search.space.{name}.choices=[int8]' or drop the dimension "
                              f"(~search.space.{name})")


def refuse_widths_dims(space: dict[str, DimensionConfig]) -> None:
    """Raises ConfigError listing the dimensions to drop when prune.widths is set: the method
    (a non-channel one refuses widths), the settings widths replaces or refuses, and the
    dimensions conditioned on those (a condition must name a dimension listed before it)."""
    fixed = {"prune", "prune.method", "prune.rates_from",
             *(f"prune.{name}" for name in ("widths", *REPLACED_BY_WIDTHS))}
    varied = [name for name, dim in space.items() if dim.path in fixed]
    conditioned = []
    for name, dim in space.items():
        if name not in varied and any(o in varied or o in conditioned for o in dim.when):
            conditioned.append(name)
    if varied:
        tildes = " ".join(f"~search.space.{name}" for name in varied + conditioned)
        also = (f", and {', '.join(conditioned)} are conditioned on them (or give those again "
                "without `when`)") if conditioned else ""
        raise ConfigError(f"search.space: prune.widths fixes the channel cut, so "
                          f"{', '.join(varied)} cannot vary{also}; drop: {tildes}")
