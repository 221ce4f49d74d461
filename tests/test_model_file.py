"""model=file: a trained Keras model as the dense baseline, loaded safely, on any data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from src import baseline, data, model_file
from src.config import (
    PROJECT_ROOT,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    settings_from,
)
from src.experiment import run
from src.keras_env import keras
from src.run import main
from src.search.settings import refuse_model_dims, search_settings_from
from src.search.worker import run_search
from src.train import compile_model, ends_in_softmax
from tests.conftest import TINY, compose_config, runs_of

layers = keras.layers
SIZE = 16
CUSTOM_MODULE = '''
from src.keras_env import keras


class MyScale(keras.layers.Layer):
    """A custom layer a model file can only name: its code lives here."""

    def call(self, inputs):
        return inputs * 1.0
'''


def synthetic(tmp: Path, size: int = SIZE) -> data.Dataset:
    """Returns the data the tests' runs use (TINY's synthetic data) at the model's size."""
    cfg = DataConfig(name="synthetic", image_size=size, n_train=160, n_test=64, num_classes=4)
    return data.load(cfg, tmp)


def make_model(ds: data.Dataset, scale: str = "raw", head: str = "softmax", outputs: int = 4,
               channels: int = 3, middle=None, epochs: int = 15) -> keras.Model:
    """Returns a tiny classifier trained in plain tf_keras on images in the given scale."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, channels), name="image")
    x = layers.Rescaling(1 / 255)(inputs) if scale == "raw" else inputs
    x = middle(x) if middle else x
    x = layers.Conv2D(8, 3, strides=2, activation="relu", name="conv")(x)
    x = layers.GlobalAveragePooling2D()(x)
    out = layers.Dense(outputs, activation="softmax" if head == "softmax" else None,
                       name="predictions")(x)
    model = keras.Model(inputs, out)
    if channels in (1, 3) and outputs == 4 and epochs:
        fitted = data.fit_to_input(ds, SIZE, SIZE, channels, scale)
        model.compile(keras.optimizers.Adam(0.03), keras.losses.SparseCategoricalCrossentropy(
            from_logits=head == "logits"), metrics=["accuracy"])
        model.fit(fitted.x_train, fitted.y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def accuracy_from_file(path: Path, ds: data.Dataset, scale: str = "raw") -> float:
    """Returns the file's test accuracy computed directly with plain tf_keras."""
    model = keras.models.load_model(path, compile=False)
    scores = model.predict(data.scale_images(ds.x_test, scale), verbose=0)
    return float(np.mean(np.argmax(scores, axis=1) == ds.y_test))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Saves the tests' model files once: one trained model in three formats, and bad ones."""
    root = tmp_path_factory.mktemp("models")
    ds = synthetic(root / "cache")
    model = make_model(ds)
    found = {"keras": root / "model.keras", "h5": root / "model.h5",
             "savedmodel": root / "savedmodel"}
    model.save(found["keras"])
    model.save(found["h5"])
    model.save(found["savedmodel"], save_format="tf")
    for scale in ("unit", "symmetric"):
        found[scale] = root / f"{scale}.keras"
        make_model(ds, scale=scale).save(found[scale])
    found["logits"] = root / "logits.keras"
    make_model(ds, head="logits").save(found["logits"])
    backbone = keras.Sequential([keras.Input((SIZE, SIZE, 3)), layers.Rescaling(1 / 255),
                                 layers.Conv2D(8, 3, activation="relu", name="c1"),
                                 layers.Conv2D(8, 3, activation="relu", name="c2")],
                                name="backbone")
    nested = keras.Sequential([keras.Input((SIZE, SIZE, 3)), backbone,
                               layers.GlobalAveragePooling2D(),
                               layers.Dense(4, activation="softmax", name="head")])
    found["nested"] = root / "nested.h5"
    nested.save(found["nested"])
    found["ten_outputs"] = root / "ten_outputs.keras"
    make_model(ds, outputs=10).save(found["ten_outputs"])
    found["five_channels"] = root / "five_channels.keras"
    make_model(ds, channels=5).save(found["five_channels"])
    marker = root / "lambda_ran"
    ran = layers.Lambda(lambda t, p=str(marker): (open(p, "w").close(), t)[1], name="sneaky")
    lambda_model = make_model(ds, middle=ran, epochs=0)
    for suffix in ("h5", "keras"):
        found[f"lambda_{suffix}"] = root / f"lambda.{suffix}"
        lambda_model.save(found[f"lambda_{suffix}"])
    marker.unlink()  # building the model ran it; loading the files must not
    found["marker"] = marker
    (root / "mylayers.py").write_text(CUSTOM_MODULE)
    sys.path.insert(0, str(root))
    try:
        import mylayers  # noqa: PLC0415 - written by this fixture

        found["custom"] = root / "custom.h5"
        make_model(ds, middle=mylayers.MyScale(name="my_scale"), epochs=0).save(found["custom"])
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("mylayers", None)
    found["not_a_model"] = root / "notes.txt"
    found["not_a_model"].write_text("not a model")
    found["truncated"] = root / "truncated.h5"
    found["truncated"].write_bytes(found["h5"].read_bytes()[:3000])
    return found


def no_training(monkeypatch) -> None:
    """Makes any baseline training fail the test."""
    def refuse(*_, **__):
        raise AssertionError("a baseline was trained")

    monkeypatch.setattr(baseline, "load_or_train", refuse)
    monkeypatch.setattr(baseline, "fit", refuse)


@pytest.mark.parametrize("kind", ["keras", "h5", "savedmodel"])
def test_model_file_is_the_baseline(make_cfg, files, tmp_path, monkeypatch, kind):
    no_training(monkeypatch)
    cfg = make_cfg("model=file", f"model.path={files[kind]}", "prune=flat", "prune.rate=0.5",
                   "quant=int8")
    metrics = run(cfg)
    (tracked,) = runs_of(cfg)
    assert tracked.info.status == "FINISHED"
    expected = accuracy_from_file(files[kind], synthetic(tmp_path / "direct"))
    assert expected > 0.6  # a real model, so equality below means something
    assert tracked.data.metrics["baseline_test_accuracy"] == expected
    assert not [k for k in tracked.data.metrics if k.startswith("baseline_") and k not in (
        "baseline_test_accuracy", "baseline_params")]  # no training curve: no epoch ran
    assert abs(metrics["sparsity_global"] - 0.5) < 0.01
    assert tracked.data.tags["baseline_key"] == model_file.file_key(
        settings_from(cfg).model,
        data.fit_to_input(synthetic(tmp_path / "direct"), SIZE, SIZE, 3, "raw"))
    assert tracked.data.params["model.input_scale"] == "raw"


def test_editing_the_file_changes_the_key(files, tmp_path):
    ds = data.fit_to_input(synthetic(tmp_path), SIZE, SIZE, 3, "raw")
    copy = tmp_path / "copy.keras"
    copy.write_bytes(files["keras"].read_bytes())
    cfg = settings_from(compose_config([f"paths.root={tmp_path}", "model=file",
                                        f"model.path={copy}"])).model
    before = model_file.file_key(cfg, ds)
    copy.write_bytes(files["keras"].read_bytes() + b"\0")
    assert model_file.file_key(cfg, ds) != before
    unit = settings_from(compose_config([f"paths.root={tmp_path}", "model=file",
                                         f"model.path={copy}", "model.input_scale=unit"])).model
    assert model_file.file_key(unit, ds) != model_file.file_key(cfg, ds)


@pytest.mark.parametrize("scale", ["unit", "symmetric"])
def test_input_scale_feeds_the_model_its_convention(make_cfg, files, tmp_path, scale):
    cfg = make_cfg("model=file", f"model.path={files[scale]}", f"model.input_scale={scale}",
                   "quant=int8")
    metrics = run(cfg)
    expected = accuracy_from_file(files[scale], synthetic(tmp_path / "direct"), scale)
    assert expected > 0.6 and metrics["baseline_test_accuracy"] == expected
    assert abs(metrics["tflite_accuracy"] - expected) <= 0.1  # int8 calibrated in that scale
    wrong = accuracy_from_file(files[scale], synthetic(tmp_path / "direct"), "raw")
    assert wrong < expected  # the setting matters


def test_a_chance_level_model_warns_about_class_order_and_scale(files, tmp_path, caplog):
    model = keras.models.load_model(files["keras"], compile=False)
    head = model.get_layer("predictions")
    head.set_weights([np.zeros_like(head.kernel), np.array([1.0, 0, 0, 0])])  # always class 0
    model.save(tmp_path / "constant.keras")
    cfg = compose_config([f"paths.root={tmp_path}", *TINY["data"], "model=file",
                          f"model.path={tmp_path / 'constant.keras'}"])
    base, _ = model_file.baseline_from_file(settings_from(cfg))
    assert base.test_accuracy == 0.25  # the test split is balanced over 4 classes
    warning = caplog.text
    assert "near chance" in warning and "data.classes" in warning
    assert "model.input_scale" in warning


def test_logits_head_fine_tunes(make_cfg, files):
    model = keras.models.load_model(files["logits"], compile=False)
    assert not ends_in_softmax(model)
    compile_model(model, TrainConfig(verbose=0), 0.01, 1, 1, 0)
    assert model.loss.get_config()["from_logits"] is True
    cfg = make_cfg("model=file", f"model.path={files['logits']}", "prune=flat", "prune.rate=0.5",
                   "prune.finetune_epochs=2", "prune.finetune_lr=0.01")
    metrics = run(cfg)
    (tracked,) = runs_of(cfg)
    assert tracked.info.status == "FINISHED"
    history = mlflow_history(cfg, tracked.info.run_id, "finetune_loss")
    assert len(history) == 2 and all(np.isfinite(history))
    assert metrics["test_accuracy"] > 0.6


def mlflow_history(cfg, run_id: str, key: str) -> list[float]:
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    return [m.value for m in client.get_metric_history(run_id, key)]


def test_a_declared_head_the_last_layer_contradicts_is_refused_before_fine_tuning(make_cfg,
                                                                                  files):
    cfg = make_cfg("model=file", f"model.path={files['logits']}", "model.head=softmax",
                   "prune=flat", "prune.rate=0.5", "prune.finetune_epochs=1")
    with pytest.raises(model_file.ModelFileError, match="model.head: set to softmax, but the "
                       "model's last layer 'predictions' gives logits"):
        run(cfg)


def test_nested_model_is_pruned_inside(make_cfg, files):
    cfg = make_cfg("model=file", f"model.path={files['nested']}", "prune=layer",
                   "prune.rate=0.5")
    metrics = run(cfg)
    assert abs(metrics["sparsity_global"] - 0.5) < 0.01
    (tracked,) = runs_of(cfg)
    table = Path(tracked.info.artifact_uri.removeprefix("file://")) / "sparsity_per_layer.csv"
    text = table.read_text()
    assert "backbone/c1" in text and "backbone/c2" in text and "head" in text


def test_tfmot_prunes_inside_a_nested_model(make_cfg, files):
    cfg = make_cfg("model=file", f"model.path={files['nested']}", "prune=tfmot",
                   "prune.final_sparsity=0.5", "prune.finetune_epochs=1")
    assert abs(run(cfg)["sparsity_global"] - 0.5) < 0.02


def test_custom_objects_module_is_the_opt_in(files, monkeypatch):
    monkeypatch.syspath_prepend(str(files["custom"].parent))
    with pytest.raises(model_file.ModelFileError, match="has class MyScale"):
        model_file.load_model_file(files["custom"])
    model = model_file.load_model_file(files["custom"], custom_objects_module="mylayers")
    assert type(model.get_layer("my_scale")).__name__ == "MyScale"
    sys.modules.pop("mylayers", None)


def test_trusted_lambda_really_runs(files):
    """Proves the refusal tests' Lambda would have left its marker had it been loaded."""
    model_file.load_model_file(files["lambda_h5"], trust_code=True)
    assert files["marker"].exists()
    files["marker"].unlink()


def test_search_refuses_model_dimensions_when_the_model_is_a_file(tmp_path, files):
    from tests.test_search import search_cfg

    path = f"model.path={files['keras']}"
    ok, _ = search_cfg(tmp_path, "search=accuracy_per_mb", "model=file", path)
    refuse_model_dims(search_settings_from(ok).space)  # rate and quantization are fine
    cfg, composer = search_cfg(tmp_path, "search=pareto_models", "model=file", path)
    with pytest.raises(ConfigError, match=r"^search.space.model.path: model would build"):
        run_search(cfg, composer)


def test_npz_data_end_to_end(make_cfg, files, tmp_path):
    ds = synthetic(tmp_path / "direct")
    arrays = tmp_path / "mine.npz"
    np.savez(arrays, x_train=np.concatenate([ds.x_train, ds.x_val]),
             y_train=np.concatenate([ds.y_train, ds.y_val]), x_test=ds.x_test, y_test=ds.y_test)
    cfg = make_cfg("data=npz", f"data.path={arrays}", "data.classes=[a,b,c,d]", "model=file",
                   f"model.path={files['keras']}", "prune=flat", "prune.rate=0.3")
    metrics = run(cfg)
    (tracked,) = runs_of(cfg)
    assert tracked.info.status == "FINISHED"
    assert metrics["baseline_test_accuracy"] == accuracy_from_file(files["keras"], ds)


# ------------------------------------------------------------------- the command line
def cli(tmp_path: Path, *overrides: str, multirun: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "src.run", *(["--multirun"] if multirun else []),
         f"paths.root={tmp_path}", *TINY["data"],
         "train.verbose=0", *overrides],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_multirun_shares_one_loaded_baseline(files, tmp_path):
    done = cli(tmp_path, "model=file", f"model.path={files['h5']}", "prune=flat,layer",
               "prune.rate=0.3,0.5,0.7", multirun=True)
    assert done.returncode == 0, done.stderr[-3000:]
    every = runs_of(compose_config([f"paths.root={tmp_path}"]))
    runs = [r for r in every if "sweep_job" in r.data.tags]  # the jobs, not the sweep's parent
    assert len(every) == 7 and len(runs) == 6
    assert all(r.info.status == "FINISHED" for r in every)
    assert len({r.data.tags["baseline_key"] for r in runs}) == 1
    assert [r.data.tags["baseline_reused"] for r in runs].count("False") == 1  # evaluated once
    assert len({r.data.metrics["baseline_test_accuracy"] for r in runs}) == 1
    assert not any(k.startswith(("baseline_loss", "finetune_")) for r in runs
                   for k in r.data.metrics)
    assert "Epoch 1" not in done.stdout
    combos = {(r.data.params["prune.method"], r.data.params["prune.rate"]) for r in runs}
    assert combos == {(m, r) for m in ("flat", "layer") for r in ("0.3", "0.5", "0.7")}


BAD_FILES = [
    ("missing", "model.path: {path} does not exist"),
    ("not_a_model", "model.path: {path} is not a Keras model"),
    ("truncated", "model.path: {path} is a truncated or corrupt HDF5 file"),
    ("ten_outputs", "model.path: {path} has outputs of shape (10,), but the data have 4 classes"),
    ("five_channels", "model.path: {path} takes inputs of shape (None, 16, 16, 5)"),
    ("lambda_h5", "layer 'sneaky' is a Lambda carrying Python code, refused"),
    ("lambda_keras", "layer 'sneaky' is a Lambda carrying Python code, refused"),
    ("custom", "layer 'my_scale' has class MyScale, not a built-in Keras layer"),
]


def no_run_left_running(tmp_path: Path) -> bool:
    if not (tmp_path / "mlruns" / "mlflow.db").exists():
        return True
    return all(r.info.status != "RUNNING"
               for r in runs_of(compose_config([f"paths.root={tmp_path}"])))


@pytest.mark.parametrize("file,expected", BAD_FILES, ids=[f for f, _ in BAD_FILES])
def test_bad_model_file_ends_the_command_with_one_line(make_cfg, files, tmp_path, file,
                                                       expected):
    """Through main's own error path (in-process: a subprocess each would take minutes here)."""
    path = files.get(file, tmp_path / "nope.keras")
    with pytest.raises(SystemExit) as ended:  # SystemExit(str): printed, exit status 1
        main.__wrapped__(make_cfg("model=file", f"model.path={path}"))
    message = ended.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("error: ") and expected.format(path=path) in message
    assert not files["marker"].exists()  # the Lambda's code never ran
    assert no_run_left_running(tmp_path)


def test_lambda_file_refused_on_the_command_line(files, tmp_path):
    done = cli(tmp_path, "model=file", f"model.path={files['lambda_keras']}")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: model.path:")]
    assert len(lines) == 1 and "layer 'sneaky' is a Lambda" in lines[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not files["marker"].exists()
    assert no_run_left_running(tmp_path)


def test_a_teacher_file_passes_the_same_checks(make_cfg, files, tmp_path):
    cfg = make_cfg("prune=flat", "prune.rate=0.5", "prune.finetune_epochs=1", "distill=kd",
                   f"distill.teacher={files['lambda_h5']}")
    with pytest.raises(ConfigError, match=rf"^distill.teacher: {files['lambda_h5']}: layer "
                                          "'sneaky' is a Lambda carrying Python code, refused"):
        run(cfg)
    assert not files["marker"].exists()  # the Lambda's code never ran
    assert no_run_left_running(tmp_path)


def layer_config(**fields) -> dict:
    """Returns a stored model config with one Dense layer carrying the given fields."""
    dense = {"class_name": "Dense", "config": {"name": "d", "units": 2, **fields}}
    return {"class_name": "Functional", "config": {"name": "m", "layers": [dense]}}


@pytest.mark.parametrize("config,expected", [
    (layer_config(kernel_initializer={"module": "os", "class_name": "system", "config": {}}),
     "layer 'd' names os.system, outside Keras; refused"),
    (layer_config(activation={"class_name": "__lambda__", "config": {"code": "..."}}),
     "layer 'd' is a Lambda carrying Python code, refused"),
    ({"class_name": "Sequential", "config": {"layers": [
        {"class_name": "TFOpLambda", "config": {"name": "w", "function": "io.write_file"}}]}},
     "layer 'w' calls tf.io.write_file, refused"),
    ({"class_name": "Sequential", "config": {"layers": [{"class_name": "Sequential", "config": {
        "name": "inner", "layers": [{"class_name": "Evil", "config": {"name": "e"}}]}}]}},
     "layer 'e' has class Evil, not a built-in Keras layer"),
], ids=["foreign-module", "python-lambda", "io-op", "nested-unknown"])
def test_stored_config_walk_refuses_code(config, expected):
    with pytest.raises(model_file.ModelFileError, match=expected.replace(".", r"\.")):
        model_file.check_config(config, Path("m.keras"), False, {}, None)


def test_stored_config_walk_passes_builtins_and_trusted_code():
    model_file.check_config(layer_config(activation="relu", kernel_initializer={
        "module": "keras.initializers", "class_name": "GlorotUniform", "config": {}}),
        Path("m.keras"), False, {}, None)
    lam = {"class_name": "Sequential", "config": {"layers": [
        {"class_name": "Lambda", "config": {"name": "l", "function": "..."}},
        {"class_name": "TFOpLambda", "config": {"name": "t", "function": "math.add"}}]}}
    model_file.check_config(lam, Path("m.h5"), True, {}, None)


def test_model_settings_are_checked(tmp_path):
    def settings(*overrides):
        return settings_from(compose_config([f"paths.root={tmp_path}", *overrides]))

    with pytest.raises(ConfigError, match="model.input_scale: must be raw"):
        settings("model=file", "model.path=m.keras", "model.input_scale=0to1")
    with pytest.raises(ConfigError, match="model.input_scale: built-in models"):
        ModelConfig(name="resnet8", input_scale="unit")
    with pytest.raises(ConfigError, match="model.head: must be auto, softmax or logits"):
        settings("model=file", "model.path=m.keras", "model.head=sigmoid")
    with pytest.raises(ConfigError, match="model.path"):
        settings("model=file")
