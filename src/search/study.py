"""The study and its storage: created or resumed by name, checked against its objectives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from omegaconf import DictConfig, OmegaConf

from src import tracking
from src.config import ConfigError, result_settings, under

if TYPE_CHECKING:  # settings imports the tables below to name the valid choices
    from src.search.settings import EarlyStopConfig, SearchConfig

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "nsga2": lambda seed: optuna.samplers.NSGAIISampler(seed=seed),
}


def _percentile(rule: EarlyStopConfig, percentile: float) -> optuna.pruners.BasePruner:
    return optuna.pruners.PercentilePruner(percentile, n_startup_trials=rule.startup_trials,
                                           n_warmup_steps=rule.warmup_epochs)


TRIAL_STOPPERS: dict[str, Callable[[EarlyStopConfig], optuna.pruners.BasePruner]] = {
    "none": lambda rule: optuna.pruners.NopPruner(),
    "median": lambda rule: _percentile(rule, 50.0),  # the median is the 50th percentile
    "percentile": lambda rule: _percentile(rule, rule.percentile),
    "hyperband": lambda rule: optuna.pruners.HyperbandPruner(
        min_resource=rule.min_epochs, max_resource=rule.max_epochs,
        reduction_factor=rule.reduction_factor),
}


def judged_settings(cfg: DictConfig) -> dict[str, str]:
    """Returns the experiment settings every trial of a study starts from, flattened to
    'key': 'value' text: all that shape a result (config.result_settings) but the search's own."""
    flat = result_settings(tracking.flatten(OmegaConf.to_container(cfg, resolve=True)))
    return {key: str(value) for key, value in sorted(flat.items())
            if not under(key, "search", "hydra")}


def make_study(search: SearchConfig, settings: dict[str, str] | None = None) -> optuna.Study:
    """Returns the study named in search, created or resumed, checked against its objectives
    and, when given, the experiment settings (judged_settings) its trials start from."""
    try:
        study = optuna.create_study(
            study_name=search.study_name, storage=open_storage(search),
            sampler=SAMPLERS[search.sampler](search.seed),
            pruner=TRIAL_STOPPERS[search.early_stop.rule](search.early_stop),
            directions=search.directions, load_if_exists=True,
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
        reason = str(getattr(error, "orig", error)).splitlines()[0]
        raise ConfigError(f"search.storage: cannot open {tracking.safe_url(search.storage)} "
                          f"({reason})") from None
    recorded = _recorded_first(study, "objectives", list(search.objectives))
    if recorded is not None and (recorded != list(search.objectives) or
                                 [d.name.lower() for d in study.directions] != search.directions):
        raise ConfigError(f"search.study_name: study {search.study_name!r} was created for "
                          f"{recorded}; use another study name for {list(search.objectives)}")
    size = _recorded_first(study, "size", search.size)
    if size not in (None, search.size) and "accuracy_per_mb" in search.objectives:
        raise ConfigError(f"search.size: study {search.study_name!r} divides accuracy by the "
                          f"{size} size; use another study name for {search.size}")
    if settings is not None:
        _check_settings(study, search.study_name, settings)
    return study


def _recorded_first(study: optuna.Study, name: str, value: Any) -> Any:
    """Returns what the study's first worker recorded under name, or None when this worker is
    the first (it records value): what a study compares its trials by cannot change later."""
    recorded = study.user_attrs.get(name)
    if recorded is None:
        study.set_user_attr(name, value)
    return recorded


def _check_settings(study: optuna.Study, name: str, settings: dict[str, str]) -> None:
    """Refuses a worker whose settings differ from the study's first worker's: its trials
    would be ranked, and stopped early, against trials of another experiment."""
    recorded = _recorded_first(study, "settings", settings)
    if recorded is None:
        return
    changed = sorted(key for key in set(recorded) | set(settings)
                     if recorded.get(key) != settings.get(key))
    if changed:
        key = changed[0]
        more = f" (and {len(changed) - 1} more settings)" if len(changed) > 1 else ""
        raise ConfigError(f"search.study_name: study {name!r} ran with {key}="
                          f"{recorded.get(key, '(unset)')}, not {settings.get(key, '(unset)')}"
                          f"{more}; use another study name, or the study's settings")


def open_storage(search: SearchConfig) -> optuna.storages.RDBStorage:
    """Returns the study's database storage, with heartbeats so dead workers' trials retry."""
    url = search.storage
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": 60}  # wait for another worker's write lock, do not fail
    else:
        connect_args = {"connect_timeout": search.connect_timeout}
    return optuna.storages.RDBStorage(
        url, engine_kwargs={"connect_args": connect_args},
        heartbeat_interval=search.heartbeat_seconds, grace_period=search.grace_seconds,
        heartbeat_stale_trial_callback=retry_callback(search.max_retries)
        if search.heartbeat_seconds else None,
    )


def retry_callback(max_retries: int) -> optuna.storages.RetryHeartbeatStaleTrialCallback | None:
    """Returns Optuna's callback that enqueues a failed trial's parameters again, or None."""
    if not max_retries:
        return None
    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retries)
