"""Per-layer sensitivity: the table and heat map in MLflow, and per-layer rates derived from it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pytest

from src.config import ConfigError, compose_config
from src.prune.allocate import SensitivityTable, allocate
from src.run import run
from src.sensitivity import sensitivity
from tests.conftest import TINY, assert_png

matplotlib.use("Agg")

RATES = [0.3, 0.5, 0.7, 0.9]


def test_sensitivity_logs_a_layer_by_rate_table_and_rates_from_hits_the_overall_rate(
        make_cfg, tmp_path):
    tiny = [entry for entries in TINY.values() for entry in entries]
    cfg = compose_config([f"paths.root={tmp_path}", *tiny, "sensitivity.rates=[0.3,0.5,0.7,0.9]",
                          "tracking.experiment=sens"], config_name="sensitivity_command")
    run_id, table = sensitivity(cfg)

    client = mlflow.MlflowClient(cfg.tracking.uri)
    text = client.download_artifacts(run_id, "sensitivity.csv", str(tmp_path))
    header, *rows = list(csv.reader(io.StringIO(Path(text).read_text())))
    assert header == ["layer", "weights", "0.3", "0.5", "0.7", "0.9"]
    # resnet8: stem conv, 2 convs in each of 3 blocks, 2 projection shortcuts, the dense head.
    assert len(rows) == 1 + 3 * 2 + 2 + 1 == len(table.layers)
    assert all(0 <= float(a) <= 1 for row in rows for a in row[2:])
    png = client.download_artifacts(run_id, "sensitivity.png", str(tmp_path))
    assert_png(Path(png))
    assert client.get_run(run_id).data.tags["role"] == "sensitivity"

    target = 0.6
    metrics = run(make_cfg("prune=layer", f"prune.rate={target}", f"prune.rates_from={run_id}",
                           "tracking.experiment=sens"))
    assert abs(metrics["sparsity_global"] - target) <= 0.01


def test_allocation_prunes_insensitive_layers_harder_at_the_exact_overall_rate():
    table = SensitivityTable(["robust", "fragile", "big"], [100, 100, 800], RATES,
                             np.array([[0.80, 0.80, 0.79, 0.70],
                                       [0.70, 0.40, 0.20, 0.10],
                                       [0.80, 0.78, 0.75, 0.60]]), dense_accuracy=0.80)
    rates = allocate(table, ["robust", "fragile", "big"], [100, 100, 800], target=0.5)
    assert abs(np.dot(rates, [100, 100, 800]) / 1000 - 0.5) < 1e-6
    assert rates[0] > rates[2] > rates[1]
    with pytest.raises(ConfigError, match="prune.rate: 0.95 is above the highest rate"):
        allocate(table, ["robust"], [100], target=0.95)
    with pytest.raises(ConfigError, match="no row for layer.*extra"):
        allocate(table, ["robust", "extra"], [100, 5], target=0.5)


def test_rates_from_needs_layer_pruning(make_cfg):
    with pytest.raises(ConfigError, match="prune.rates_from: per-layer rates need prune=layer"):
        run(make_cfg("prune=flat", "+prune.rates_from=abc"))
