"""Optuna search over compression settings: ``python -m src.search search=accuracy_per_mb``.

Each trial composes the project config with the sampled overrides and runs one tracked
experiment (``src.run.run``) as a nested MLflow run under this worker's parent run.
Single-objective studies stop hopeless trials early on validation accuracy per
fine-tuning epoch ("trial early stopping"; Optuna's name for it is pruning).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import optuna
import sqlalchemy
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src import tracking
from src.config import (
    ConfigError,
    DimensionConfig,
    SearchConfig,
    register_resolvers,
    search_settings_from,
    settings_from,
)
from src.data import DataError
from src.keras_env import keras
from src.run import run

Composer = Callable[[list[str]], DictConfig]


def sample_overrides(trial: optuna.Trial, space: dict[str, DimensionConfig]) -> list[str]:
    """Returns Hydra overrides for this trial's sampled point; conditional dims may be skipped."""
    chosen: dict[str, Any] = {}
    overrides = []
    for name, dim in space.items():
        if any(chosen.get(other) not in allowed for other, allowed in dim.when.items()):
            continue
        if dim.choices is not None:
            value = trial.suggest_categorical(name, list(dim.choices))
        elif dim.type == "int":
            value = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log,
                                      step=int(dim.step or 1))
        else:
            value = trial.suggest_float(name, dim.low, dim.high, log=dim.log, step=dim.step)
        chosen[name] = value
        is_group = "." not in dim.path
        overrides.append(f"{dim.path}={value}" if is_group else f"++{dim.path}={value}")
    return overrides


class ReportEpochs(keras.callbacks.Callback):
    """Reports validation accuracy per fine-tuning epoch and stops trials Optuna deems hopeless."""

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        value = logs.get("val_accuracy", logs.get("accuracy"))
        if value is None:
            return
        self.trial.report(float(value), step=epoch + 1)
        if self.trial.should_prune():
            raise tracking.StoppedEarly(
                f"stopped after epoch {epoch + 1}: val_accuracy {value:.4f}")


def make_study(search: SearchConfig) -> optuna.Study:
    """Returns the study named in search, created or resumed, checked against its objectives."""
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=search.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=search.seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=search.seed),
    }
    if search.storage.startswith("sqlite:///"):
        Path(search.storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(
            study_name=search.study_name, storage=search.storage,
            sampler=samplers[search.sampler](), pruner=_trial_stopper(search),
            directions=search.directions, load_if_exists=True,
        )
    except sqlalchemy.exc.SQLAlchemyError as error:
        reason = str(getattr(error, "orig", error)).splitlines()[0]
        raise ConfigError(f"search.storage: cannot open {tracking.safe_url(search.storage)} "
                          f"({reason})") from None
    recorded = study.user_attrs.get("objectives")
    if recorded is None:
        study.set_user_attr("objectives", list(search.objectives))
    elif recorded != list(search.objectives) or \
            [d.name.lower() for d in study.directions] != search.directions:
        raise ConfigError(f"search.study_name: study {search.study_name!r} was created for "
                          f"{recorded}; use another study name for {list(search.objectives)}")
    return study


def _trial_stopper(search: SearchConfig) -> optuna.pruners.BasePruner:
    rule = search.early_stop
    if rule.rule == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=rule.startup_trials,
                                           n_warmup_steps=rule.warmup_epochs)
    if rule.rule == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=rule.min_epochs,
                                              max_resource=rule.max_epochs,
                                              reduction_factor=rule.reduction_factor)
    return optuna.pruners.NopPruner()


def run_search(cfg: DictConfig, compose: Composer) -> optuna.Study:
    """Runs search.n_trials trials (or until search.timeout) and returns the study."""
    search = search_settings_from(cfg)
    base = settings_from(cfg)  # the untouched settings must be valid too
    study = make_study(search)
    tags = {"role": "search_worker", "study_name": search.study_name}
    with tracking.tracked_run(base.tracking, tags, run_name=f"search:{search.study_name}"):
        tracking.log_params({"search.objectives": ",".join(search.objectives),
                             "search.storage": tracking.safe_url(search.storage),
                             "search.n_trials": search.n_trials, "search.seed": search.seed})
        study.optimize(lambda trial: _trial(trial, search, compose), n_trials=search.n_trials,
                       timeout=search.timeout, catch=(Exception,), callbacks=[_progress])
    return study


def _trial(trial: optuna.Trial, search: SearchConfig, compose: Composer) -> list[float]:
    overrides = sample_overrides(trial, search.space)
    trial.set_user_attr("overrides", overrides)
    tags = {"study_name": search.study_name, "trial_number": str(trial.number)}
    single = len(search.objectives) == 1
    try:
        metrics = run(compose(overrides), callbacks=[ReportEpochs(trial)] if single else [],
                      extra_tags=tags, nested=True)
    except tracking.StoppedEarly as stop:
        trial.set_user_attr("early_stop_reason", str(stop))
        raise optuna.TrialPruned(str(stop)) from None
    except Exception as error:
        trial.set_user_attr("failure_reason", f"{type(error).__name__}: {error}"[:2000])
        raise
    for key in ("tflite_accuracy", "test_accuracy", "tflite_zip_bytes", "accuracy_per_mb",
                "sparsity_global"):
        trial.set_user_attr(key, metrics[key])
    if search.accuracy_floor is not None:
        # Optuna keeps infeasible trials (constraint > 0) out of best_trial and the samplers.
        trial.set_constraint("accuracy_floor", search.accuracy_floor - metrics["tflite_accuracy"])
    return [metrics[name] for name in search.objectives]


def _progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    values = "" if trial.state != optuna.trial.TrialState.COMPLETE else \
        " values=" + ",".join(f"{v:.4g}" for v in trial.values)
    reason = trial.user_attrs.get("failure_reason") or trial.user_attrs.get("early_stop_reason", "")
    print(f"[search {study.study_name}] trial {trial.number} {trial.state.name}{values} "
          f"params={trial.params} {reason}".rstrip(), flush=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: runs the configured Optuna search."""
    task_overrides = list(HydraConfig.get().overrides.task)
    try:
        run_search(cfg, lambda extra: hydra.compose("config", overrides=task_overrides + extra))
    except (ConfigError, DataError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    register_resolvers()
    main()
