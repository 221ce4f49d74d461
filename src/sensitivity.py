"""Per-layer sensitivity: ``python -m src.sensitivity experiment=quick sensitivity.rates=[.5,.9]``.

Each prunable layer of the dense baseline is pruned alone at each rate (no fine-tuning) and the
validation accuracy measured. One MLflow run gets the table (``sensitivity.csv``, layer x rate)
and its heat map (``sensitivity.png``); ``prune=layer prune.rates_from=<that run's id>`` then
derives per-layer rates for ``prune.rate`` overall from it.

``sensitivity(cfg)`` does the work and returns the table; ``main`` is the Hydra entry point.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import hydra
import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf

from src import baseline, model_file, tracking
from src.config import ConfigError, register_resolvers, settings_from
from src.data import DataError
from src.keras_env import keras
from src.prune import KERNEL_ATTRIBUTE, layer_masks, prunable_kernels
from src.prune.allocate import DENSE_METRIC, TABLE_FILE, SensitivityTable
from src.train import evaluate

# A method prunes one layer of the model at a rate and yields the model to evaluate,
# restoring the layer afterwards: (model, layer name, rate) -> context manager.
PruneOne = Callable[[keras.Model, str, float], contextlib.AbstractContextManager[keras.Model]]


@contextlib.contextmanager
def magnitude_one(model: keras.Model, layer: str, rate: float) -> Iterator[keras.Model]:
    """Yields the model with the smallest `rate` of one layer's kernel zeroed, then restores it."""
    kernel = dict(prunable_kernels(model, tuple(KERNEL_ATTRIBUTE)))[layer]  # nested ones too
    original = kernel.numpy()
    kernel.assign(original * layer_masks([original], rate)[0])
    try:
        yield model
    finally:
        kernel.assign(original)


# Methods by name; channel pruning registers "channel" (chosen by prune=channel).
METHODS: dict[str, PruneOne] = {"magnitude": magnitude_one}


def measure(model: keras.Model, layer_types: Sequence[str], rates: Sequence[float],
            x: np.ndarray, y: np.ndarray, prune_one: PruneOne = magnitude_one
            ) -> SensitivityTable:
    """Returns the accuracy on (x, y) with each prunable layer pruned alone at each rate."""
    named = prunable_kernels(model, layer_types)
    if not named:
        raise ConfigError(f"prune.layer_types: the model has no layer of type {list(layer_types)}")
    accuracy = np.zeros((len(named), len(rates)))
    for i, (name, _) in enumerate(named):
        for j, rate in enumerate(rates):
            with prune_one(model, name, rate) as pruned:
                accuracy[i, j] = evaluate(pruned, x, y)
    return SensitivityTable([name for name, _ in named],
                            [int(np.prod(kernel.shape)) for _, kernel in named], list(rates),
                            accuracy, evaluate(model, x, y))


def heat_map(table: SensitivityTable, title: str, path: Path) -> None:
    """Writes the table as an annotated heat map: layers as rows, rates as columns."""
    change = table.accuracy - table.dense_accuracy
    figure = Figure(figsize=(max(6.0, 3 + 0.9 * len(table.rates)),
                             1.6 + 0.32 * len(table.layers)))
    axes = figure.add_subplot()
    image = axes.imshow(table.accuracy, cmap="RdYlGn", aspect="auto", vmin=0,
                        vmax=max(table.dense_accuracy, float(table.accuracy.max()), 1e-9))
    for (i, j), value in np.ndenumerate(table.accuracy):
        axes.text(j, i, f"{value:.3f}\n({change[i, j]:+.3f})", ha="center", va="center",
                  fontsize=7)
    axes.set_xticks(range(len(table.rates)), [f"{r:g}" for r in table.rates])
    axes.set_yticks(range(len(table.layers)),
                    [f"{n} ({w:,})" for n, w in zip(table.layers, table.weights)], fontsize=7)
    axes.set(xlabel="rate (this layer alone, no fine-tuning)", title=title)
    figure.colorbar(image, ax=axes, label=f"val accuracy (dense {table.dense_accuracy:.3f})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def sensitivity(cfg: DictConfig) -> tuple[str, SensitivityTable]:
    """Measures the dense baseline's per-layer sensitivity, logs it to one MLflow run, and
    returns the run id and the table."""
    settings = settings_from(cfg)
    rates = [float(r) for r in cfg.sensitivity.rates]
    if not rates or sorted(set(rates)) != rates or not 0 < rates[0] <= rates[-1] < 1:
        raise ConfigError(f"sensitivity.rates: need increasing rates in (0, 1), got {rates}")
    method = settings.prune.method if settings.prune.method in METHODS else "magnitude"
    keras.backend.clear_session()
    keras.utils.set_random_seed(settings.train.seed)
    # model=file: the loaded model is the baseline (own), and the data fit its input.
    own, dataset, key = model_file.dense_source(settings)
    if not len(dataset.x_val):
        raise ConfigError("data.val_fraction: sensitivity is measured on the validation split, "
                          "which is empty")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["tracking"]["uri"] = tracking.safe_url(resolved["tracking"]["uri"])
    tags = {"role": "sensitivity", "baseline_key": key, "data_fingerprint": dataset.fingerprint,
            "git_commit": tracking.git_commit(), "sensitivity_method": method}
    model_name = Path(settings.model.path).stem if own else settings.model.name
    name = f"sensitivity {model_name} {method}"
    with tracking.tracked_run(settings.tracking, tags, run_name=name) as active:
        tracking.log_params(tracking.flatten(resolved))
        base = own or baseline.load_or_train(key, settings.paths.cache_dir, dataset,
                                             settings.model, settings.train)
        table = measure(base.model, settings.prune.layer_types, rates, dataset.x_val,
                        dataset.y_val, METHODS[method])
        tracking.log_metrics({DENSE_METRIC: table.dense_accuracy,
                              "baseline_test_accuracy": base.test_accuracy})
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch)
            (out / TABLE_FILE).write_text(table.to_csv())
            heat_map(table, f"{model_name} on {settings.data.name}: {method} pruning,\n"
                     "one layer at a time (val accuracy, change from dense)",
                     out / "sensitivity.png")
            tracking.log_artifacts([out / TABLE_FILE, out / "sensitivity.png"])
    return active.info.run_id, table


@hydra.main(version_base="1.3", config_path="../conf", config_name="sensitivity_command")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: measures and logs the sensitivity, prints the run id to use."""
    try:
        run_id, table = sensitivity(cfg)
    except (ConfigError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
    print(table.to_csv(), end="")
    print(f"sensitivity logged to MLflow run {run_id}; use it with "
          f"prune=layer prune.rate=<overall> prune.rates_from={run_id}", file=sys.stderr)


if __name__ == "__main__":
    register_resolvers()
    main()
