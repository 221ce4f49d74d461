"""Per-layer pruning rates for a target overall rate, from a per-layer sensitivity table.

The table (written by ``python -m src.sensitivity``) holds each layer's validation accuracy when
that layer alone is pruned at a few rates. Layers whose accuracy holds up are pruned harder:
one accuracy-drop threshold, found by bisection, gives each layer the highest rate whose
(interpolated) accuracy stays within it, such that the weighted overall rate is the target.
"""

from __future__ import annotations

import csv
import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.config import ConfigError

TABLE_FILE = "sensitivity.csv"
DENSE_METRIC = "dense_val_accuracy"


@dataclass
class SensitivityTable:
    """Validation accuracy per (layer, rate) with each layer pruned alone, and the dense one."""

    layers: list[str]
    weights: list[int]
    rates: list[float]
    accuracy: np.ndarray  # [layer, rate]
    dense_accuracy: float

    def to_csv(self) -> str:
        """Returns the table as CSV: layer, weights, then one column per rate."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["layer", "weights", *(f"{r:g}" for r in self.rates)])
        for name, size, row in zip(self.layers, self.weights, self.accuracy):
            writer.writerow([name, size, *(f"{a:.6f}" for a in row)])
        return out.getvalue()


def table_from_csv(text: str, dense_accuracy: float) -> SensitivityTable:
    """Returns the table written by SensitivityTable.to_csv."""
    header, *rows = list(csv.reader(io.StringIO(text)))
    return SensitivityTable([r[0] for r in rows], [int(r[1]) for r in rows],
                            [float(r) for r in header[2:]],
                            np.array([[float(a) for a in r[2:]] for r in rows]).reshape(
                                len(rows), len(header) - 2), dense_accuracy)


def read_table(run_id: str) -> SensitivityTable:
    """Returns the sensitivity table logged to the MLflow run run_id (current tracking URI)."""
    import mlflow  # only here: the rest of this module is plain arithmetic

    try:
        run = mlflow.get_run(run_id)
        with tempfile.TemporaryDirectory() as scratch:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TABLE_FILE,
                                                       dst_path=scratch)
            text = Path(path).read_text()
    except (mlflow.exceptions.MlflowException, OSError) as error:
        raise ConfigError(f"prune.rates_from: no sensitivity table in MLflow run {run_id!r} "
                          f"({str(error).splitlines()[0]})") from None
    if DENSE_METRIC not in run.data.metrics:
        raise ConfigError(f"prune.rates_from: run {run_id} has no {DENSE_METRIC} metric")
    return table_from_csv(text, run.data.metrics[DENSE_METRIC])


def allocate(table: SensitivityTable, layers: Sequence[str], sizes: Sequence[int],
             target: float) -> list[float]:
    """Returns one rate per layer (in the order given) whose size-weighted mean is target,
    the least sensitive layers pruned hardest."""
    missing = [name for name in layers if name not in table.layers]
    if missing:
        raise ConfigError(f"prune.rates_from: the sensitivity table has no row for layer(s) "
                          f"{', '.join(missing)}; was it measured on this model?")
    highest = max(table.rates)
    if target > highest:
        raise ConfigError(f"prune.rate: {target} is above the highest rate in the sensitivity "
                          f"table ({highest}); measure it with sensitivity.rates")
    curves = [_drop_curve(table, table.layers.index(name)) for name in layers]
    sizes_arr = np.asarray(sizes, dtype=np.float64)

    def rates_at(threshold: float) -> np.ndarray:
        return np.array([np.interp(threshold, drops, rates) for rates, drops in curves])

    def overall(threshold: float) -> float:
        return float(np.dot(rates_at(threshold), sizes_arr) / sizes_arr.sum())

    low, high = 0.0, 1.0 + max(float(drops[-1]) for _, drops in curves)
    for _ in range(100):  # overall() is continuous and increasing: bisection converges
        middle = (low + high) / 2
        low, high = (middle, high) if overall(middle) < target else (low, middle)
    return [float(r) for r in rates_at(high)]


def _drop_curve(table: SensitivityTable, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (rates, accuracy drops) of one layer from rate 0, the drop made strictly
    increasing so that every threshold maps to exactly one rate."""
    rates = np.array([0.0, *table.rates])
    order = np.argsort(rates)
    accuracy = np.array([table.dense_accuracy, *table.accuracy[index]])[order]
    drops = table.dense_accuracy - np.minimum.accumulate(accuracy)  # a drop never recovers
    # A tiny slope breaks ties on plateaus (a layer that loses nothing up to 0.5 is
    # pruned up to 0.5 before any layer that loses something).
    return rates[order], np.maximum.accumulate(drops) + 1e-9 * rates[order]
