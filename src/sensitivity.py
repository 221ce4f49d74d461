"""Per-layer sensitivity: ``python -m src.sensitivity experiment=quick sensitivity.rates=[.5,.9]``.

Each prunable layer of the dense baseline is pruned alone at each rate (no fine-tuning) and the
validation accuracy measured. One MLflow run gets the table (``sensitivity.csv``, layer x rate)
and its heat map (``sensitivity.png``); ``prune=layer prune.rates_from=<that run's id>`` then
derives per-layer rates for ``prune.rate`` overall from it.

With ``prune=channel`` the rows are channel groups (the layers whose channels are cut
together), each losing its lowest-scoring channels as channel pruning scores them
(prune.criterion, prune.bn_scale, prune.min_channels); ``prune=channel
prune.rates_from=<run id>`` then derives each group's share of ``prune.rate``.

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

from src import baseline, hydra_errors, model_file, tracking
from src.config import ConfigError, PruneConfig, check_top_level, register_resolvers, settings_from
from src.data import DataError
from src.keras_env import keras
from src.prune import channel, layer_masks, prunable_kernels
from src.prune.allocate import DENSE_METRIC, HEADERS, PRUNE_METHOD, TABLE_FILE, SensitivityTable
from src.prune.graph import build_graph
from src.train import evaluate

# What a method prunes in a model, by name with its size, and a function that prunes one of
# them alone at a rate, yielding the model to evaluate and restoring it afterwards.
Units = list[tuple[str, int]]
PruneOne = Callable[[str, float], contextlib.AbstractContextManager[keras.Model]]
Method = Callable[[keras.Model, PruneConfig], tuple[Units, PruneOne]]


def magnitude_units(model: keras.Model, cfg: PruneConfig) -> tuple[Units, PruneOne]:
    """Returns the prunable layers with their kernel sizes, and a function that zeroes the
    smallest `rate` of one layer's kernel."""
    named = prunable_kernels(model, cfg.layer_types)  # nested ones too
    if not named:
        raise ConfigError(f"prune.layer_types: the model has no layer of type {cfg.layer_types}")
    kernels = dict(named)

    @contextlib.contextmanager
    def prune_one(layer: str, rate: float) -> Iterator[keras.Model]:
        kernel = kernels[layer]
        original = kernel.numpy()
        kernel.assign(original * layer_masks([original], rate)[0])
        try:
            yield model
        finally:
            kernel.assign(original)

    return [(name, int(np.prod(kernel.shape))) for name, kernel in named], prune_one


def channel_units(model: keras.Model, cfg: PruneConfig) -> tuple[Units, PruneOne]:
    """Returns the prunable channel groups with their channel counts, and a function that
    removes round(rate * n) of one group's lowest-scoring channels (zeroed, not rebuilt)."""
    model = channel.as_functional(model)
    graph = build_graph(model)
    groups = {channel.group_name(g): g for g in channel.prunable_groups(graph)}
    scores = {name: channel.group_scores(model, graph, g, cfg.criterion, cfg.bn_scale)
              for name, g in groups.items()}

    def prune_one(name: str, rate: float) -> contextlib.AbstractContextManager[keras.Model]:
        root = groups[name].root
        keep = channel.keep_masks({root: scores[name]}, rate, "layer", cfg.min_channels)
        return channel.zeroed_channels(model, graph, keep)

    return [(name, g.size) for name, g in groups.items()], prune_one


# Methods by name: prune=channel picks channel, any other prune option magnitude.
METHODS: dict[str, Method] = {"magnitude": magnitude_units, "channel": channel_units}


def measure(model: keras.Model, prune_cfg: PruneConfig, rates: Sequence[float],
            x: np.ndarray, y: np.ndarray, method: str = "magnitude") -> SensitivityTable:
    """Returns the accuracy on (x, y) with each prunable layer (or channel group) pruned alone
    at each rate."""
    units, prune_one = METHODS[method](model, prune_cfg)
    accuracy = np.zeros((len(units), len(rates)))
    for i, (name, _) in enumerate(units):
        for j, rate in enumerate(rates):
            with prune_one(name, rate) as pruned:
                accuracy[i, j] = evaluate(pruned, x, y)
    return SensitivityTable([name for name, _ in units], [size for _, size in units],
                            list(rates), accuracy, evaluate(model, x, y), method)


def heat_map(table: SensitivityTable, title: str, path: Path) -> None:
    """Writes the table as an annotated heat map: layers (or groups) as rows, rates as
    columns."""
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
    row, size = HEADERS[table.method]  # layer and weights, or group and channels
    unit = " ch" if size == "channels" else ""
    axes.set_yticks(range(len(table.layers)),
                    [f"{n} ({w:,}{unit})" for n, w in zip(table.layers, table.weights)],
                    fontsize=7)
    axes.set(xlabel=f"rate (this {row} alone, no fine-tuning)", title=title)
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
    method = "channel" if settings.prune.method == "channel" else "magnitude"
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
        table = measure(base.model, settings.prune, rates, dataset.x_val, dataset.y_val, method)
        tracking.log_metrics({DENSE_METRIC: table.dense_accuracy,
                              "baseline_test_accuracy": base.test_accuracy})
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch)
            (out / TABLE_FILE).write_text(table.to_csv())
            heat_map(table, f"{model_name} on {settings.data.name}: {method} pruning,\n"
                     f"one {HEADERS[method][0]} at a time (val accuracy, change from dense)",
                     out / "sensitivity.png")
            tracking.log_artifacts([out / TABLE_FILE, out / "sensitivity.png"])
    return active.info.run_id, table


@hydra.main(version_base="1.3", config_path="../conf", config_name="sensitivity_command")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: measures and logs the sensitivity, prints the run id to use."""
    hydra_errors.job_started()
    try:
        check_top_level(cfg)
        run_id, table = sensitivity(cfg)
    except (ConfigError, DataError) as error:
        raise SystemExit(f"error: {error}") from None
    print(table.to_csv(), end="")
    print(f"sensitivity logged to MLflow run {run_id}; use it with "
          f"prune={PRUNE_METHOD[table.method]} prune.rate=<overall> prune.rates_from={run_id}",
          file=sys.stderr)


if __name__ == "__main__":
    register_resolvers()
    hydra_errors.run(main)
