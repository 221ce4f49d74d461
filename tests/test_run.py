"""End-to-end experiments: what lands in MLflow matches the files and the settings."""

from __future__ import annotations

import zipfile
from pathlib import Path

import mlflow
import pytest

from src import baseline
from src.experiment import run
from src.keras_env import keras
from tests.conftest import TINY, runs_of


def artifact_dir(mlflow_run) -> Path:
    return Path(mlflow_run.info.artifact_uri.removeprefix("file://"))


def test_flat_int8_run_is_tracked_with_true_sizes(make_cfg):
    cfg = make_cfg("prune=flat", "prune.rate=0.7", "quant=int8")
    returned = run(cfg)
    (tracked,) = runs_of(cfg)
    metrics, params, tags = tracked.data.metrics, tracked.data.params, tracked.data.tags
    assert tracked.info.status == "FINISHED"
    assert abs(metrics["sparsity_global"] - 0.70) < 0.005
    assert metrics["tflite_sparsity"] >= 0.69  # int8 rounding only adds zeros
    files = artifact_dir(tracked)
    assert metrics["tflite_bytes"] == (files / "model.tflite").stat().st_size
    assert {"model.tflite", "sparsity_per_layer.csv", "config.yaml"} <= {
        p.name for p in files.iterdir()}
    exports = Path(cfg.paths.output_dir) / "exports" / tracked.info.run_id
    for metric, name in [("model_bytes", "model.h5"), ("tflite_bytes", "model.tflite")]:
        assert metrics[metric] == (exports / name).stat().st_size, metric
        # The zipped size: the file alone in a deflate zip, measured here on disk.
        archive = exports / f"{name}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
            zipped.write(exports / name, arcname=name)
        assert metrics[metric.replace("_bytes", "_zip_bytes")] == archive.stat().st_size, metric
    assert metrics["accuracy_per_mb"] == pytest.approx(
        metrics["tflite_accuracy"] / (metrics["tflite_zip_bytes"] / 1e6))
    assert returned["accuracy_per_mb"] == pytest.approx(metrics["accuracy_per_mb"])
    assert params["prune.rate"] == "0.7" and params["quant.mode"] == "int8"
    assert params["prune.layer_types"] == "['Conv2D', 'DepthwiseConv2D', 'Dense']"
    for tag in ("git_commit", "config_hash", "baseline_key", "data_fingerprint"):
        assert tags[tag]
    assert "baseline_val_accuracy" in metrics  # per-epoch curve
    table = (files / "sparsity_per_layer.csv").read_text().splitlines()
    assert table[0].startswith("layer,type") and len(table) > 5


@pytest.mark.fresh_baseline
def test_second_run_reuses_the_cached_baseline(make_cfg, monkeypatch):
    run(make_cfg("prune=layer", "prune.rate=0.5"))

    def no_training(*_args, **_kwargs):
        raise AssertionError("baseline trained again")

    monkeypatch.setattr(baseline, "_train_and_store", no_training)
    cfg = make_cfg("prune=flat", "prune.rate=0.3")
    run(cfg)
    newest, first = runs_of(cfg)
    assert newest.data.tags["baseline_reused"] == "True"
    assert first.data.tags["baseline_reused"] == "False"
    assert newest.data.tags["baseline_key"] == first.data.tags["baseline_key"]
    assert newest.data.metrics["train_seconds"] < first.data.metrics["train_seconds"]
    for metrics in (newest.data.metrics, first.data.metrics):
        phases = sum(metrics[f"{p}_seconds"] for p in ("train", "evaluate", "export"))
        assert 0 < phases < metrics["run_seconds"]


@pytest.mark.fresh_baseline
def test_corrupt_baseline_cache_is_rebuilt(make_cfg):
    cfg = make_cfg()
    run(cfg)
    (model_file,) = Path(cfg.paths.cache_dir).glob("baselines/*/model.h5")
    model_file.write_bytes(b"garbage")
    run(cfg)
    assert runs_of(cfg)[0].data.tags["baseline_reused"] == "False"


def test_int8_with_integer_io(make_cfg):
    metrics = run(make_cfg("quant=int8", "quant.integer_io=true"))
    assert abs(metrics["tflite_accuracy"] - metrics["test_accuracy"]) < 0.1


@pytest.mark.parametrize("model", ["mobilenetv2", "mobilenetv2_cifar", "resnet8"])
def test_every_model_runs(make_cfg, model):
    # The MobileNetV2s at their smallest useful size; ResNet-8 as every other test has it.
    metrics = run(make_cfg(f"model={model}", "prune=layer", "prune.rate=0.5",
                           *(["model.input_size=16", "model.alpha=0.35"] if model != "resnet8"
                             else TINY["model"][1:])))
    assert abs(metrics["sparsity_global"] - 0.5) < 0.005


def test_tfmot_run_logs_schedule_and_curves_while_it_trains(make_cfg):
    # The default frequency (100 steps) is more than these 10 steps: it is clamped, and both
    # the configured and the effective value are logged.
    cfg = make_cfg("prune=tfmot", "prune.final_sparsity=0.6", "prune.finetune_epochs=2")
    seen = []  # what the MLflow UI shows of the curve as each epoch ends

    def steps_logged() -> list[int]:
        run_id = mlflow.active_run().info.run_id
        return [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "finetune_loss")]

    watch = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(
        steps_logged()))
    metrics = run(cfg, callbacks=[watch])
    assert abs(metrics["sparsity_global"] - 0.6) < 0.01
    tracked = runs_of(cfg)[0]
    assert tracked.data.params["prune.frequency"] == "100"
    assert int(tracked.data.params["prune_steps.frequency"]) < 10
    assert int(tracked.data.params["prune_steps.end_step"]) > 0
    assert "finetune_val_accuracy" in tracked.data.metrics
    assert seen == [[0], [0, 1]]  # each epoch logged as it ended, not at the run's end
    history = mlflow.MlflowClient().get_metric_history(tracked.info.run_id, "finetune_loss")
    assert sorted(m.step for m in history) == [0, 1]  # and not again when the run ends


def test_dense_run_has_no_sparsity_and_main_returns_the_objective(make_cfg):
    from src import run as run_module

    cfg = make_cfg("prune=none", "objective=tflite_accuracy")
    value = run_module.main.__wrapped__(cfg)
    (tracked,) = runs_of(cfg)
    assert value == tracked.data.metrics["tflite_accuracy"]
    assert tracked.data.metrics["sparsity_global"] < 0.01


@pytest.fixture
def op_determinism():
    """Leaves TensorFlow's process-wide op determinism off again after the test."""
    yield
    from tensorflow.python.framework import config as tf_config

    tf_config.disable_op_determinism()


@pytest.mark.fresh_baseline
def test_same_config_and_seed_give_the_same_model(tmp_path, op_determinism, mlflow_template):
    from tests.conftest import compose_config, seed_mlflow_store

    results = []
    for name in ("a", "b"):
        seed_mlflow_store(tmp_path / name, mlflow_template)
        cfg = compose_config([f"paths.root={tmp_path / name}", "data=synthetic",
                              "data.n_train=160", "data.n_test=64", "data.num_classes=4",
                              "model=resnet8", "model.filters=[4,8,8]", "train.epochs=2",
                              "train.batch_size=32", "train.verbose=0",
                              "train.deterministic=true", "prune=flat", "prune.rate=0.6",
                              "quant=int8"])
        metrics = run(cfg)
        (tracked,) = runs_of(cfg)
        exported = Path(cfg.paths.output_dir) / "exports" / tracked.info.run_id
        results.append((metrics, (exported / "sparsity_per_layer.csv").read_text(),
                        (exported / "model.tflite").read_bytes(), tracked.data.tags))
    (m1, table1, tflite1, tags1), (m2, table2, tflite2, tags2) = results
    assert table1 == table2  # the same masks, layer by layer
    assert tflite1 == tflite2  # and the same exported bytes
    assert tags1["baseline_key"] == tags2["baseline_key"]
    assert m1["tflite_accuracy"] == m2["tflite_accuracy"]
