"""One trial: sample a point, run it as a tracked experiment nested under the worker's run,
in a process of its own (``search.trial_process``, see ``trial_process``) or in the worker's."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

import optuna
from omegaconf import DictConfig, OmegaConf

from src import tracking
from src.config import TrackingConfig, settings_from
from src.search import trial_process
from src.search.objectives import OBJECTIVES
from src.search.orphans import mark_worker
from src.search.sampling import sample_overrides
from src.search.settings import SearchConfig

Composer = Callable[[list[str]], DictConfig]
# Kept on each trial so summaries and trial lines need not open MLflow.
RECORDED = ("tflite_accuracy", "test_accuracy", "tflite_bytes", "tflite_zip_bytes",
            "accuracy_per_mb", "sparsity_global", "tflite_latency_ms", "macs", "params")


def run_trial(trial: optuna.Trial, search: SearchConfig, compose: Composer,
              tracking_cfg: TrackingConfig, replay: Sequence[str],
              parent_run_id: str | None = None) -> list[float]:
    """Returns the trial's objective values, after running its sampled settings as one run.

    parent_run_id: the worker's run, under which a trial run in its own process is nested.
    """
    mark_worker(trial)
    overrides = sample_overrides(trial, search.space)
    trial.set_user_attr("overrides", overrides)
    tags = {"study_name": search.study_name, "trial_number": str(trial.number),
            "command": shlex.join(["python", "-m", "src.run", *replay, *overrides]),
            "search.objectives": ",".join(search.objectives),
            **{f"trial.{name}": str(value) for name, value in trial.params.items()}}
    name_prefix = f"{search.study_name}#{trial.number} "
    try:
        cfg = compose(overrides)
        if trial_process.isolated(search):
            settings_from(cfg)  # bad settings fail here, before a process pays for TensorFlow
            job = trial_process.TrialJob(
                OmegaConf.to_container(cfg, resolve=True), trial._trial_id, trial.number,
                tags, name_prefix, parent_run_id)
            metrics = trial_process.run_in_child(job, tracking_cfg)
        else:
            metrics = _run_here(trial, search, cfg, tags, name_prefix)
        values = [OBJECTIVES[name].value(metrics, search.size) for name in search.objectives]
    except tracking.StoppedEarly as stop:
        trial.set_user_attr("early_stop_reason", str(stop))
        raise optuna.TrialPruned(str(stop)) from None
    except Exception as error:
        reason = str(error) if isinstance(error, trial_process.TrialProcessFailed) \
            else f"{type(error).__name__}: {error}"
        trial.set_user_attr("failure_reason", reason[:2000])
        # Settings refused before run() opened its MLflow run still get a FAILED trial run.
        tracking.record_failure(tracking_cfg, tags, reason,
                                run_name=f"{search.study_name}#{trial.number} failed")
        raise
    # The trial's own nested run (the worker's parent run is still the active one).
    found = tracking.find_runs(tracking_cfg, {"study_name": search.study_name,
                                              "trial_number": str(trial.number)}, "FINISHED")
    if found:
        trial.set_user_attr("run_id", found[0].info.run_id)
        trial.set_user_attr("run_name", found[0].info.run_name)
    for key in RECORDED:
        if key in metrics:
            trial.set_user_attr(key, metrics[key])
    if search.accuracy_floor is not None:
        # Optuna keeps infeasible trials (constraint > 0) out of best_trial and the samplers.
        trial.set_constraint("accuracy_floor", search.accuracy_floor - metrics["tflite_accuracy"])
    return values


def _run_here(trial: optuna.Trial, search: SearchConfig, cfg: DictConfig,
              tags: dict[str, str], name_prefix: str) -> dict[str, float]:
    """Returns the metrics of the trial's run, trained in this process."""
    from src.experiment import run  # TensorFlow is imported only where a trial trains
    from src.search.early_stop import early_stop_callbacks

    return run(cfg, callbacks=early_stop_callbacks(trial, search, cfg), extra_tags=tags,
               nested=True, name_prefix=name_prefix)
