"""One trial: sample a point, run it as a tracked experiment nested under the worker's run."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

import optuna
from omegaconf import DictConfig

from src import tracking
from src.config import TrackingConfig
from src.keras_env import keras
from src.run import run
from src.search.objectives import BYTES_PER_WEIGHT, OBJECTIVES, epoch_estimate, final_sparsity_of
from src.search.orphans import mark_worker
from src.search.sampling import sample_overrides
from src.search.settings import SearchConfig

Composer = Callable[[list[str]], DictConfig]
# Kept on each trial so summaries and trial lines need not open MLflow.
RECORDED = ("tflite_accuracy", "test_accuracy", "tflite_bytes", "tflite_zip_bytes",
            "accuracy_per_mb", "sparsity_global", "tflite_latency_ms", "macs")


def run_trial(trial: optuna.Trial, search: SearchConfig, compose: Composer,
              tracking_cfg: TrackingConfig, replay: Sequence[str]) -> list[float]:
    """Returns the trial's objective values, after running its sampled settings as one run."""
    mark_worker(trial)
    overrides = sample_overrides(trial, search.space)
    trial.set_user_attr("overrides", overrides)
    tags = {"study_name": search.study_name, "trial_number": str(trial.number),
            "command": shlex.join(["python", "-m", "src.run", *replay, *overrides]),
            "search.objectives": ",".join(search.objectives),
            **{f"trial.{name}": str(value) for name, value in trial.params.items()}}
    try:
        cfg = compose(overrides)
        metrics = run(cfg, callbacks=_early_stop(trial, search, cfg), extra_tags=tags,
                      nested=True, name_prefix=f"{search.study_name}#{trial.number} ")
        values = [OBJECTIVES[name].value(metrics, search.size) for name in search.objectives]
    except tracking.StoppedEarly as stop:
        trial.set_user_attr("early_stop_reason", str(stop))
        raise optuna.TrialPruned(str(stop)) from None
    except Exception as error:
        reason = f"{type(error).__name__}: {error}"
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


def _early_stop(trial: optuna.Trial, search: SearchConfig, cfg: DictConfig) -> list[ReportEpochs]:
    """Returns the callback that reports per-epoch estimates, for single-objective studies."""
    # Reported under the rule none too: the early-stop benchmark counts the epochs trained.
    if len(search.objectives) > 1 or OBJECTIVES[search.objectives[0]].estimate is None:
        return []
    prune = cfg.prune
    final = final_sparsity_of(prune.method, prune.get("final_sparsity", 0.0),
                              prune.get("structured_2_4", False))
    return [ReportEpochs(trial, search.objectives[0], cfg.quant.mode, final, search.size)]


class ReportEpochs(keras.callbacks.Callback):
    """Reports the objective's estimate each fine-tuning epoch; stops hopeless trials."""

    def __init__(self, trial: optuna.Trial, objective: str, quant_mode: str,
                 final_sparsity: float | None = None, size: str = "zipped"):
        super().__init__()
        self.trial, self.objective, self.size = trial, objective, size
        self.bytes_per_weight = BYTES_PER_WEIGHT[quant_mode]
        self.final_sparsity = final_sparsity

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        accuracy = logs.get("val_accuracy", logs.get("accuracy"))
        if accuracy is None:
            return
        value = epoch_estimate(self.objective, float(accuracy), self.model,
                               self.bytes_per_weight, self.final_sparsity, self.size)
        self.trial.report(value, step=epoch + 1)
        if self.trial.should_prune():
            raise tracking.StoppedEarly(f"stopped after epoch {epoch + 1}: val_accuracy "
                                        f"{accuracy:.4f}, estimated {self.objective} {value:.4g}")
