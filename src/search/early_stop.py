"""Trial early stopping from inside fine-tuning: a Keras callback that reports the objective's
estimate each epoch to the trial and ends the run when Optuna's rule says the trial is hopeless.

Used where the trial's training runs: in the worker, or in the trial's own process
(``src.search.trial_process``), which reports to the same trial through the study's storage.
"""

from __future__ import annotations

import numpy as np
import optuna
from omegaconf import DictConfig

from src import tracking
from src.keras_env import keras
from src.search.objectives import BYTES_PER_WEIGHT, OBJECTIVES, epoch_estimate, final_sparsity_of
from src.search.settings import SearchConfig


def reports_epochs(search: SearchConfig) -> bool:
    """Returns whether the study's trials report per-epoch estimates (single objective that
    can be estimated; under the rule none too: the early-stop benchmark counts the epochs)."""
    return len(search.objectives) == 1 and OBJECTIVES[search.objectives[0]].estimate is not None


def early_stop_callbacks(trial: optuna.Trial, search: SearchConfig,
                         cfg: DictConfig) -> list[ReportEpochs]:
    """Returns the callback that reports per-epoch estimates, for single-objective studies."""
    if not reports_epochs(search):
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
            raise tracking.StoppedEarly(
                f"stopped after epoch {epoch + 1}: val_accuracy {accuracy:.4f}, "
                f"{self.objective} estimate {value:.4g} against the completed trials' median "
                f"{self._median(epoch + 1):.4g} at that epoch (estimated from weight counts: "
                "not on the scale of final values)")

    def _median(self, step: int) -> float:
        """Returns the completed trials' median estimate at a step (nan if none), what
        Optuna's median and percentile rules compare with."""
        others = [t.intermediate_values[step] for t in self.trial.study.get_trials(
            deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
            if step in t.intermediate_values]
        return float(np.median(others)) if others else float("nan")
