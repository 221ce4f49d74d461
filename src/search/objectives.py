"""What a study optimises: each objective's direction, its value from a run's metrics, and
its estimate after each fine-tuning epoch (to compare trials early).

To add an objective, add one row to ``OBJECTIVES``; the config check, the study's directions,
trial early stopping and the trial lines all read this table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from src.units import MB, kb

if TYPE_CHECKING:  # no TensorFlow import just to read the table (config checks, summaries)
    from src.keras_env import keras

SIZES = ("zipped", "raw")  # search.size: which file size accuracy_per_mb divides by
BYTES_PER_WEIGHT = {"none": 4, "float16": 2, "dynamic": 1, "int8": 1}


@dataclass(frozen=True)
class EpochCount:
    """A model's weights after a fine-tuning epoch, as early stopping estimates them."""

    accuracy: float
    weights: int
    nonzero: float
    bytes_per_weight: int

    def estimated_bytes(self, size: str) -> float:
        """Returns the exported size estimate: zipping keeps about the non-zero weights."""
        return (self.nonzero if size == "zipped" else self.weights) * self.bytes_per_weight


@dataclass(frozen=True)
class Objective:
    """One optimisable metric: direction, value from run metrics, per-epoch estimate or None."""

    direction: str
    value: Callable[[Mapping[str, float], str], float]
    estimate: Callable[[EpochCount, str], float] | None = None
    unit: str = ""  # "bytes" prints as KB in trial lines


def _metric(name: str) -> Callable[[Mapping[str, float], str], float]:
    def value(metrics: Mapping[str, float], _size: str) -> float:
        if name not in metrics:
            raise KeyError(f"objective {name}: the run logged no metric {name!r}")
        return float(metrics[name])
    return value


def _accuracy_per_mb(metrics: Mapping[str, float], size: str) -> float:
    if size == "zipped":
        return float(metrics["accuracy_per_mb"])
    return metrics["tflite_accuracy"] / (metrics["tflite_bytes"] / MB)


OBJECTIVES: dict[str, Objective] = {
    "accuracy_per_mb": Objective(
        "maximize", _accuracy_per_mb,
        lambda e, size: e.accuracy / max(e.estimated_bytes(size) / MB, 1e-9)),
    "tflite_accuracy": Objective("maximize", _metric("tflite_accuracy"), lambda e, _: e.accuracy),
    "test_accuracy": Objective("maximize", _metric("test_accuracy"), lambda e, _: e.accuracy),
    "tflite_zip_bytes": Objective("minimize", _metric("tflite_zip_bytes"),
                                  lambda e, _: e.estimated_bytes("zipped"), "bytes"),
    "tflite_bytes": Objective("minimize", _metric("tflite_bytes"),
                              lambda e, _: e.estimated_bytes("raw"), "bytes"),
    "sparsity_global": Objective("maximize", _metric("sparsity_global"),
                                 lambda e, _: 1 - e.nonzero / max(e.weights, 1)),
    # Measured on the exported file only (src.speed); no per-epoch estimate.
    "tflite_latency_ms": Objective("minimize", _metric("tflite_latency_ms")),
    "macs": Objective("minimize", _metric("macs")),
}


def count_weights(model: keras.Model, final_sparsity: float | None = None) -> tuple[int, float]:
    """Returns the trainable weight count and the non-zero count to expect in the export.

    A tfmot trial is still ramping towards its final sparsity during fine-tuning; counting its
    kernels as they are would inflate its size estimate and let the early-stop rule stop it.
    With final_sparsity, each kernel tfmot prunes counts as at most (1 - final_sparsity) dense,
    the density its schedule ends at.
    """
    scheduled = set()
    if final_sparsity is not None:
        for layer in model.submodules:  # tfmot's wrappers list (kernel, mask, threshold)
            for weight, _mask, _threshold in getattr(layer, "pruning_vars", ()):
                scheduled.add(id(weight))
    total, nonzero = 0, 0.0
    for weight in model.trainable_weights:
        values = weight.numpy()
        count = float(np.count_nonzero(values))
        if id(weight) in scheduled:
            count = min(count, values.size * (1 - final_sparsity))
        total += values.size
        nonzero += count
    return total, nonzero


def epoch_estimate(objective: str, accuracy: float, model: keras.Model, bytes_per_weight: int,
                   final_sparsity: float | None = None, size: str = "zipped") -> float:
    """Returns this epoch's estimate of the trial's objective, to compare trials early.

    Validation accuracy alone would stop the sparse trials that win on accuracy per MB, so
    sizes are estimated from the non-zero trainable weights at the exported precision.
    """
    estimate = OBJECTIVES[objective].estimate
    if estimate is None:
        raise ValueError(f"objective {objective} has no per-epoch estimate")
    weights, nonzero = count_weights(model, final_sparsity)
    return estimate(EpochCount(accuracy, weights, nonzero, bytes_per_weight), size)


def final_sparsity_of(method: str, final_sparsity: float, structured_2_4: bool) -> float | None:
    """Returns the sparsity a tfmot schedule ends at, or None for methods pruned at once."""
    if method != "tfmot":
        return None
    return 0.5 if structured_2_4 else final_sparsity


def format_value(objective: str, value: float) -> str:
    """Returns an objective's value for people: sizes in KB, fractions to 4 places."""
    if OBJECTIVES[objective].unit == "bytes":
        return kb(value)
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.4g}"
