"""Per-layer sensitivity: the table and heat map in MLflow, per-layer (or per channel group)
rates derived from it, and a search choosing between it and uniform rates."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import optuna
import pytest

from src.config import ConfigError, compose_config
from src.experiment import run
from src.prune.allocate import SensitivityTable, allocate
from src.search.settings import search_settings_from
from src.search.study import make_study
from src.search.worker import run_search
from src.sensitivity import sensitivity
from tests.conftest import TINY, assert_png, runs_of

matplotlib.use("Agg")

RATES = [0.3, 0.5, 0.7, 0.9]
# The tiny resnet8's channel groups (a residual add ties a stage's last conv to its shortcut,
# or in stage 1 to the stem) and their channels.
TINY_GROUPS = {"stem_conv+stage1_b_conv": 4, "stage1_a_conv": 4, "stage2_a_conv": 8,
               "stage2_b_conv+stage2_shortcut": 8, "stage3_a_conv": 8,
               "stage3_b_conv+stage3_shortcut": 8}


def measure_sensitivity(tmp_path, *overrides: str) -> tuple[str, SensitivityTable]:
    """Returns the run id and table of the sensitivity command on the tiny model."""
    tiny = [entry for entries in TINY.values() for entry in entries]
    cfg = compose_config([f"paths.root={tmp_path}", *tiny, "sensitivity.rates=[0.3,0.5,0.7,0.9]",
                          "tracking.experiment=sens", *overrides],
                         config_name="sensitivity_command")
    return sensitivity(cfg)


def test_sensitivity_logs_a_layer_by_rate_table_and_rates_from_hits_the_overall_rate(
        make_cfg, tmp_path):
    run_id, table = measure_sensitivity(tmp_path)

    cfg = make_cfg("tracking.experiment=sens")
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
    with pytest.raises(ConfigError, match=rf"^prune.rates_from: run {run_id} measured magnitude "
                                          "sensitivity; prune=channel needs a channel one"):
        run(make_cfg("prune=channel", f"prune.rates_from={run_id}", "tracking.experiment=sens"))


def removed_channels(tracked: mlflow.entities.Run, tmp_path: Path) -> dict[str, int]:
    """Returns the channels each tiny group lost, from the run's channels_per_layer.csv."""
    path = mlflow.MlflowClient().download_artifacts(tracked.info.run_id, "channels_per_layer.csv",
                                                    str(tmp_path))
    rows = {row["layer"]: row for row in csv.DictReader(open(path))}
    return {group: int(rows[group.split("+")[0]]["channels_before"])
            - int(rows[group.split("+")[0]]["channels_after"]) for group in TINY_GROUPS}


def test_channel_sensitivity_has_a_row_per_group_and_rates_from_hits_the_overall_rate(
        make_cfg, tmp_path):
    run_id, table = measure_sensitivity(tmp_path, "prune=channel", "prune.min_channels=1")

    cfg = make_cfg("tracking.experiment=sens")
    client = mlflow.MlflowClient(cfg.tracking.uri)
    text = client.download_artifacts(run_id, "sensitivity.csv", str(tmp_path))
    header, *rows = list(csv.reader(io.StringIO(Path(text).read_text())))
    assert header == ["group", "channels", "0.3", "0.5", "0.7", "0.9"]
    assert {row[0]: int(row[1]) for row in rows} == TINY_GROUPS
    assert all(0 <= float(a) <= 1 for row in rows for a in row[2:])
    assert_png(Path(client.download_artifacts(run_id, "sensitivity.png", str(tmp_path))))
    assert client.get_run(run_id).data.tags["sensitivity_method"] == "channel"
    assert table.method == "channel"

    target = 0.45  # 18 of the 40 prunable channels, shared out by the table
    run(make_cfg("prune=channel", f"prune.rate={target}", f"prune.rates_from={run_id}",
                 "prune.min_channels=1", "prune.finetune_epochs=0", "tracking.experiment=sens"))
    tracked = [r for r in runs_of(cfg) if r.data.tags.get("role") != "sensitivity"][0]
    removed = removed_channels(tracked, tmp_path)
    assert abs(sum(removed.values()) / sum(TINY_GROUPS.values()) - target) <= 0.01
    assert all(removed[group] < size for group, size in TINY_GROUPS.items())
    with pytest.raises(ConfigError, match=rf"^prune.rates_from: run {run_id} measured channel "
                                          "sensitivity; prune=layer needs a magnitude one"):
        run(make_cfg("prune=layer", f"prune.rates_from={run_id}", "tracking.experiment=sens"))


def test_a_search_chooses_between_uniform_rates_and_a_sensitivity_run(tmp_path):
    run_id, _ = measure_sensitivity(tmp_path, "prune=channel", "prune.min_channels=1")
    tiny = [entry for entries in TINY.values() for entry in entries]
    base = [f"paths.root={tmp_path}", *tiny, "tracking.experiment=sens", "search=accuracy_per_mb",
            "search.n_trials=2", "search.early_stop.rule=none", "search.accuracy_floor=null",
            "search.trial_process=false",  # not the point here; each trial's process imports TF
            "prune=channel", "prune.min_channels=1", "prune.finetune_epochs=0",
            "~search.space", "+search.space={rate: {path: prune.rate, low: 0.45, high: 0.45}, "
            f"sensitivity: {{path: prune.rates_from, choices: [null, '{run_id}']}}}}"]

    def composer(extra):
        return compose_config(base + extra)

    cfg = composer([])
    study = make_study(search_settings_from(cfg))
    for choice in (None, run_id):  # the sampler would pick the same choice twice, maybe
        study.enqueue_trial({"rate": 0.45, "sensitivity": choice})
    study = run_search(cfg, composer)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.params["sensitivity"] for t in study.trials] == [None, run_id]
    assert [t.user_attrs["overrides"][-1] for t in study.trials] == [
        "++prune.rates_from=null", f"++prune.rates_from={run_id}"]
    trials = {r.data.tags["trial_number"]: r for r in runs_of(cfg) if "trial_number" in r.data.tags}
    assert trials["0"].data.params["prune.rates_from"] == "None"  # uniform: global threshold
    assert trials["1"].data.params["prune.rates_from"] == run_id
    for tracked in trials.values():  # either way the overall rate is the sampled one
        removed = removed_channels(tracked, tmp_path)
        assert abs(sum(removed.values()) / sum(TINY_GROUPS.values()) - 0.45) <= 0.01


def test_allocation_prunes_insensitive_layers_harder_at_the_exact_overall_rate():
    table = SensitivityTable(["robust", "fragile", "big"], [100, 100, 800], RATES,
                             np.array([[0.80, 0.80, 0.79, 0.70],
                                       [0.70, 0.40, 0.20, 0.10],
                                       [0.80, 0.78, 0.75, 0.60]]), dense_accuracy=0.80)
    rates = allocate(table, ["robust", "fragile", "big"], [100, 100, 800], target=0.5)
    assert abs(np.dot(rates, [100, 100, 800]) / 1000 - 0.5) < 1e-6
    assert rates[0] > rates[2] > rates[1]
    capped = allocate(table, ["robust", "fragile", "big"], [100, 100, 800], target=0.5,
                      caps=[0.25, 1.0, 1.0])  # e.g. a channel group that must keep 3 of 4
    assert capped[0] == pytest.approx(0.25)
    assert abs(np.dot(capped, [100, 100, 800]) / 1000 - 0.5) < 1e-6
    with pytest.raises(ConfigError, match="prune.rate: 0.95 is above the highest rate"):
        allocate(table, ["robust"], [100], target=0.95)
    with pytest.raises(ConfigError, match="no row for layer.*extra"):
        allocate(table, ["robust", "extra"], [100, 5], target=0.5)


def test_rates_from_needs_layer_pruning(make_cfg):
    with pytest.raises(ConfigError, match="prune.rates_from: per-layer rates need prune=layer"):
        run(make_cfg("prune=flat", "+prune.rates_from=abc"))
