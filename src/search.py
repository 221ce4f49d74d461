"""Optuna search over compression settings: ``python -m src.search search=accuracy_per_mb``.

Each trial composes the project config with the sampled overrides and runs one tracked
experiment (``src.run.run``) as a nested MLflow run under this worker's parent run.
Single-objective studies stop hopeless trials early on validation accuracy per
fine-tuning epoch ("trial early stopping"; Optuna's name for it is pruning).
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import optuna
import sqlalchemy
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src import tracking
from src.config import (
    ConfigError,
    DimensionConfig,
    SearchConfig,
    Settings,
    TrackingConfig,
    register_resolvers,
    search_settings_from,
    settings_from,
)
from src.data import DataError
from src.keras_env import keras
from src.run import run
from src.units import MB

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


BYTES_PER_WEIGHT = {"none": 4, "float16": 2, "dynamic": 1, "int8": 1}


def epoch_estimate(objective: str, accuracy: float, model: keras.Model,
                   bytes_per_weight: int) -> float:
    """Returns this epoch's estimate of the trial's objective, to compare trials early.

    Validation accuracy alone would stop the sparse trials that win on accuracy per MB, so
    sizes are estimated from the non-zero trainable weights at the exported precision.
    """
    weights = [w.numpy() for w in model.trainable_weights]
    total = sum(w.size for w in weights)
    nonzero = sum(int(np.count_nonzero(w)) for w in weights)
    estimated_bytes = nonzero * bytes_per_weight
    if objective == "accuracy_per_mb":
        return accuracy / max(estimated_bytes / MB, 1e-9)
    if objective == "tflite_zip_bytes":
        return float(estimated_bytes)
    if objective == "sparsity_global":
        return 1 - nonzero / max(total, 1)
    return accuracy


class ReportEpochs(keras.callbacks.Callback):
    """Reports the objective's estimate each fine-tuning epoch; stops hopeless trials."""

    def __init__(self, trial: optuna.Trial, objective: str, quant_mode: str):
        super().__init__()
        self.trial, self.objective = trial, objective
        self.bytes_per_weight = BYTES_PER_WEIGHT[quant_mode]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        accuracy = logs.get("val_accuracy", logs.get("accuracy"))
        if accuracy is None:
            return
        value = epoch_estimate(self.objective, float(accuracy), self.model, self.bytes_per_weight)
        self.trial.report(value, step=epoch + 1)
        if self.trial.should_prune():
            raise tracking.StoppedEarly(f"stopped after epoch {epoch + 1}: val_accuracy "
                                        f"{accuracy:.4f}, estimated {self.objective} {value:.4g}")


def make_study(search: SearchConfig) -> optuna.Study:
    """Returns the study named in search, created or resumed, checked against its objectives."""
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=search.seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=search.seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=search.seed),
    }
    try:
        study = optuna.create_study(
            study_name=search.study_name, storage=open_storage(search),
            sampler=samplers[search.sampler](), pruner=_trial_stopper(search),
            directions=search.directions, load_if_exists=True,
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as error:
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


def open_storage(search: SearchConfig) -> optuna.storages.RDBStorage:
    """Returns the study's database storage, with heartbeats so dead workers' trials retry."""
    url = search.storage
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": 60}  # wait for another worker's write lock, do not fail
    else:
        connect_args = {"connect_timeout": search.connect_timeout}
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=search.max_retries) \
        if search.max_retries else None
    return optuna.storages.RDBStorage(
        url, engine_kwargs={"connect_args": connect_args},
        heartbeat_interval=search.heartbeat_seconds, grace_period=search.grace_seconds,
        heartbeat_stale_trial_callback=retry,
    )


def _trial_stopper(search: SearchConfig) -> optuna.pruners.BasePruner:
    rule = search.early_stop
    if rule.rule in ("median", "percentile"):  # median = the 50th percentile
        percentile = 50.0 if rule.rule == "median" else rule.percentile
        return optuna.pruners.PercentilePruner(percentile, n_startup_trials=rule.startup_trials,
                                               n_warmup_steps=rule.warmup_epochs)
    if rule.rule == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=rule.min_epochs,
                                              max_resource=rule.max_epochs,
                                              reduction_factor=rule.reduction_factor)
    return optuna.pruners.NopPruner()


def run_search(cfg: DictConfig, compose: Composer, replay: Sequence[str] = ()) -> optuna.Study:
    """Runs search.n_trials trials (or until search.timeout) and returns the study.

    replay: the command-line overrides that, with a trial's sampled ones, make
    ``python -m src.run`` repeat that trial; each trial run is tagged with that command.
    """
    search = search_settings_from(cfg)
    base = settings_from(cfg)  # the untouched settings must be valid too
    if search.early_stop.rule != "none" and base.data.val_fraction == 0:
        raise ConfigError("search.early_stop.rule: trial early stopping judges validation "
                          "accuracy; set data.val_fraction > 0 or the rule to none")
    study = make_study(search)
    if search.heartbeat_seconds:
        optuna.storages.fail_stale_trials(study)  # trials of workers that died, retried
    close_orphan_runs(study, base)
    tags = {"role": "search_worker", "study_name": search.study_name,
            "host": socket.gethostname(), "pid": str(os.getpid())}
    cap = FailureCap(search.max_failure_rate, search.failure_rate_min_trials)
    with tracking.tracked_run(base.tracking, tags, run_name=f"search:{search.study_name}"):
        tracking.log_params({"search.objectives": ",".join(search.objectives),
                             "search.storage": tracking.safe_url(search.storage),
                             "search.n_trials": search.n_trials, "search.seed": search.seed})
        study.optimize(lambda trial: _trial(trial, search, compose, base.tracking, replay),
                       n_trials=search.n_trials,
                       timeout=search.timeout, catch=(Exception,),
                       # Optuna fails stale trials before each new one: close their runs too.
                       callbacks=[_progress, cap, lambda s, _: close_orphan_runs(s, base)])
        if cap.tripped:
            raise SearchAborted(cap.tripped)
    return study


class SearchAborted(RuntimeError):
    """The search stopped itself because too many of its trials failed."""


class FailureCap:
    """Optuna callback that stops the study when too many of this worker's trials fail."""

    def __init__(self, max_rate: float, min_trials: int):
        self.max_rate, self.min_trials = max_rate, min_trials
        self.finished = self.failed = 0
        self.tripped = ""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.finished += 1
        self.failed += trial.state == optuna.trial.TrialState.FAIL
        if self.finished >= self.min_trials and self.failed / self.finished > self.max_rate:
            reason = trial.user_attrs.get("failure_reason", "see the failed trials")
            self.tripped = (f"search.max_failure_rate: {self.failed} of {self.finished} trials "
                            f"failed (last: {reason})")
            study.stop()


def close_orphan_runs(study: optuna.Study, base: Settings) -> list[str]:
    """Ends as KILLED the MLflow runs left RUNNING by workers that died; returns their ids.

    A trial run is orphaned when its Optuna trial is no longer running; a worker's parent run
    when its process is gone from this host (workers on other hosts close their own). Runs
    at worker start and after every trial.
    """
    running = tracking.running_runs(base.tracking, {"study_name": study.study_name})
    # States after runs: a trial started in between is then known, and still RUNNING.
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    closed = []
    for tracked in running:
        tags = tracked.data.tags
        if "trial_number" in tags:
            state = states.get(int(tags["trial_number"]), optuna.trial.TrialState.RUNNING)
            orphan = state != optuna.trial.TrialState.RUNNING
        else:
            orphan = (tags.get("host") == socket.gethostname() and "pid" in tags
                      and not _alive(int(tags["pid"])))
        if orphan:
            tracking.close_run(tracked.info.run_id, "its search worker died")
            closed.append(tracked.info.run_id)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _trial(trial: optuna.Trial, search: SearchConfig, compose: Composer,
           tracking_cfg: TrackingConfig, replay: Sequence[str]) -> list[float]:
    overrides = sample_overrides(trial, search.space)
    trial.set_user_attr("overrides", overrides)
    tags = {"study_name": search.study_name, "trial_number": str(trial.number),
            "command": shlex.join(["python", "-m", "src.run", *replay, *overrides]),
            **{f"trial.{name}": str(value) for name, value in trial.params.items()}}
    try:
        cfg = compose(overrides)
        reporter = [ReportEpochs(trial, search.objectives[0], cfg.quant.mode)] \
            if len(search.objectives) == 1 else []
        metrics = run(cfg, callbacks=reporter, extra_tags=tags, nested=True)
    except tracking.StoppedEarly as stop:
        trial.set_user_attr("early_stop_reason", str(stop))
        raise optuna.TrialPruned(str(stop)) from None
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
        trial.set_user_attr("failure_reason", reason[:2000])
        # Settings refused before run() opened its MLflow run still get a FAILED trial run.
        tracking.record_failure(tracking_cfg, tags, reason)
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
    replay = [o for o in task_overrides if not o.lstrip("~+").startswith("search")]
    try:
        run_search(cfg, lambda extra: hydra.compose("config", overrides=task_overrides + extra),
                   replay)
    except (ConfigError, DataError, SearchAborted) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt:
        print("interrupted: the current trial and this worker's MLflow run ended as KILLED",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    register_resolvers()
    main()
