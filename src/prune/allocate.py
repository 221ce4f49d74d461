"""Per-layer pruning rates for a target overall rate, from a per-layer sensitivity table.

The table (written by ``python -m src.sensitivity``) holds each layer's validation accuracy when
that layer alone is pruned at a few rates. Layers whose accuracy holds up are pruned harder:
one accuracy-drop threshold, found by bisection, gives each layer the highest rate whose
(interpolated) accuracy stays within it, such that the weighted overall rate is the target.
A channel table has a row per channel group instead (weighted by its channels), for
``prune=channel``; a magnitude table has a row per layer (weighted by its kernel's weights).
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
# The CSV's first two columns by method: what a row is and what its size counts.
HEADERS = {"magnitude": ("layer", "weights"), "channel": ("group", "channels")}
# The pruning method (prune.method) whose per-layer rates each kind of table can give.
PRUNE_METHOD = {"magnitude": "layer", "channel": "channel"}


@dataclass
class SensitivityTable:
    """Validation accuracy per (layer, rate) with each layer pruned alone, and the dense one.

    For method channel the rows are channel groups and weights counts each group's channels.
    """

    layers: list[str]
    weights: list[int]
    rates: list[float]
    accuracy: np.ndarray  # [layer, rate]
    dense_accuracy: float
    method: str = "magnitude"

    def to_csv(self) -> str:
        """Returns the table as CSV: layer and weights (group and channels for a channel
        table), then one column per rate."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*HEADERS[self.method], *(f"{r:g}" for r in self.rates)])
        for name, size, row in zip(self.layers, self.weights, self.accuracy):
            writer.writerow([name, size, *(f"{a:.6f}" for a in row)])
        return out.getvalue()


def table_from_csv(text: str, dense_accuracy: float) -> SensitivityTable:
    """Returns the table written by SensitivityTable.to_csv (its header tells the method)."""
    header, *rows = list(csv.reader(io.StringIO(text)))
    method = next((m for m, names in HEADERS.items() if tuple(header[:2]) == names), None)
    if method is None:
        raise ConfigError(f"prune.rates_from: not a sensitivity table (header {header[:2]})")
    return SensitivityTable([r[0] for r in rows], [int(r[1]) for r in rows],
                            [float(r) for r in header[2:]],
                            np.array([[float(a) for a in r[2:]] for r in rows]).reshape(
                                len(rows), len(header) - 2), dense_accuracy, method)


def read_table(run_id: str, method: str) -> SensitivityTable:
    """Returns the sensitivity table of the given method (magnitude or channel) logged to the
    MLflow run run_id (current tracking URI); a table of the other method is refused."""
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
    table = table_from_csv(text, run.data.metrics[DENSE_METRIC])
    if table.method != method:
        raise ConfigError(f"prune.rates_from: run {run_id} measured {table.method} sensitivity; "
                          f"prune={PRUNE_METHOD[method]} needs a {method} one (python -m "
                          f"src.sensitivity prune={PRUNE_METHOD[method]})")
    return table


def allocate(table: SensitivityTable, layers: Sequence[str], sizes: Sequence[int],
             target: float, caps: Sequence[float] | None = None) -> list[float]:
    """Returns one rate per layer (in the order given) whose size-weighted mean is target,
    the least sensitive layers pruned hardest, none above its cap (when given; the caller
    makes sure the caps leave target reachable)."""
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
    ceiling = np.ones(len(layers)) if caps is None else np.asarray(caps, dtype=np.float64)

    def rates_at(threshold: float) -> np.ndarray:
        return np.minimum(ceiling, [np.interp(threshold, drops, rates)
                                    for rates, drops in curves])

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
