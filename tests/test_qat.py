"""quant.qat_epochs: quantization-aware training before the int8 export."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
import numpy as np
import pytest

from results.collect import row_name
from src import qat, train
from src.checkpoint import EpochCheckpoint
from src.config import (
    AugmentConfig,
    ConfigError,
    ModelConfig,
    QuantConfig,
    TrainConfig,
    settings_from,
)
from src.experiment import run
from src.keras_env import keras
from src.model_file import load_model_file
from src.models import build
from src.prune.common import KERNEL_ATTRIBUTE, kernel_layers
from src.quantize import to_tflite
from src.report import run_name
from tests.conftest import runs_of, tflite_operators

# The MobileNetV2s take about a minute each (tfmot's transforms and two exports): slow.
MODELS = [ModelConfig(name="resnet8", filters=[4, 8, 8]),
          *(pytest.param(ModelConfig(name=name, alpha=0.35, input_size=16),
                         marks=pytest.mark.slow) for name in ("mobilenetv2", "mobilenetv2_cifar"))]


@pytest.mark.parametrize("model_cfg", MODELS, ids=["resnet8", "mobilenetv2", "mobilenetv2_cifar"])
def test_every_built_in_model_is_fake_quantized_as_it_exports_and_gets_its_weights_back(
        model_cfg):
    model = build(model_cfg, 4)
    aware = qat.quantize_aware(model)
    wrapped = [layer for layer in aware.layers if hasattr(layer, "quantize_config")]
    assert len(wrapped) > len(aware.layers) // 2  # the layers tfmot knows are fake-quantized
    # The loss sees the softmax through tfmot's activation wrapper: probabilities, not logits.
    assert train.ends_in_softmax(aware) == train.ends_in_softmax(model)
    # Its export has the post-training export's operators: every BatchNorm folded into its
    # convolution, none left as a multiply and an add of its own.
    images = np.random.default_rng(0).integers(0, 256, (8, *model.input_shape[1:])).astype(
        np.float32)
    operators = [tflite_operators(to_tflite(m, QuantConfig(mode="int8"), images))
                 for m in (model, aware)]
    assert operators[0] == operators[1] and "MUL" not in operators[1][3:]
    kernels = {name: getattr(layer, KERNEL_ATTRIBUTE[type(layer).__name__])
               for name, layer in kernel_layers(model)}
    before = {name: kernel.numpy() for name, kernel in kernels.items()}
    for variable in aware.trainable_variables:  # stands in for training
        variable.assign(variable * 0.5)
    qat.float_weights_into(aware, model)
    for name, kernel in kernels.items():
        np.testing.assert_array_equal(kernel.numpy(), before[name] * 0.5, err_msg=name)


def test_a_nested_model_is_refused_by_name():
    inner = build(ModelConfig(name="resnet8", filters=[4, 8, 8]), 4)
    inputs = keras.Input((32, 32, 3))
    outer = keras.Model(inputs, inner(inputs))
    with pytest.raises(ConfigError, match=f"^quant.qat_epochs: tfmot cannot quantize a nested "
                                          f"model \\({inner.name!r}\\)"):
        qat.quantize_aware(outer)


def test_a_run_on_a_nested_model_file_is_refused_before_it_opens(make_cfg, tmp_path):
    inner = build(ModelConfig(name="resnet8", filters=[4, 8, 8]), 4)
    inputs = keras.Input((32, 32, 3))
    path = tmp_path / "nested.h5"
    keras.Model(inputs, inner(inputs)).save(path)
    cfg = make_cfg("model=file", f"model.path={path}", "quant=int8", "quant.qat_epochs=1")
    with pytest.raises(ConfigError, match="^quant.qat_epochs: tfmot cannot quantize a nested"):
        run(cfg)
    assert runs_of(cfg) == []


def test_magnitude_pruned_zeros_stay_zero_through_quantization_aware_training():
    model = build(ModelConfig(name="resnet8", filters=[4, 8, 8]), 4)
    conv = model.get_layer("stage2_a_conv")
    kernel = conv.kernel.numpy()
    kernel[..., ::2] = 0
    conv.kernel.assign(kernel)
    aware = qat.quantize_aware(model)
    cfg = TrainConfig(batch_size=16, verbose=0, augment=AugmentConfig(0, False))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (32, 32, 32, 3)).astype(np.uint8), rng.integers(0, 4, 32)
    train.fit(aware, x, y, x[:0], y[:0], 4, cfg, epochs=1, lr=0.1, warmup_epochs=0,
              callbacks=[qat.zeros_held(aware, model)])
    qat.float_weights_into(aware, model)
    trained = model.get_layer("stage2_a_conv").kernel.numpy()
    assert not trained[..., ::2].any() and trained[..., 1::2].all()
    assert not np.array_equal(trained, kernel)  # it trained


def test_quantization_aware_training_resumes_from_its_checkpoint(make_cfg, tmp_path):
    settings = settings_from(make_cfg("quant=int8", "quant.qat_epochs=2"))
    from src.data import load
    dataset = load(settings.data, settings.paths.cache_dir)
    model = build(settings.model, dataset.num_classes)
    folder = tmp_path / "qat.ckpt"
    _, history = qat.fine_tune(model, settings, dataset, checkpoint=EpochCheckpoint(folder))
    weights = [w.copy() for w in model.get_weights()]
    again = build(settings.model, dataset.num_classes)
    checkpoint = EpochCheckpoint(folder)
    _, resumed = qat.fine_tune(again, settings, dataset, checkpoint=checkpoint)
    assert checkpoint.resumed_from_epoch == 2 and resumed == history
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), weights))


def test_a_run_trains_quantization_aware_exports_from_it_and_keeps_a_plain_keras_file(make_cfg):
    # A channel cut with magnitude pruning on top: its zeros must outlast the training.
    cfg = make_cfg("prune=channel", "prune.rate=0.3", "prune.magnitude_rate=0.6",
                   "prune.finetune_epochs=1", "quant=int8", "quant.qat_epochs=2", "distill=kd")
    metrics = run(cfg)
    tracked = runs_of(cfg)[0]
    assert tracked.info.status == "FINISHED"
    assert tracked.info.run_name.endswith("ft1 kd int8 qat2")
    for name in ("test_accuracy", "qat_test_accuracy", "tflite_accuracy", "tflite_latency_ms",
                 "macs"):
        assert tracked.data.metrics[name] == metrics[name], name
    assert metrics["sparsity_global"] == pytest.approx(0.6, abs=0.02)
    assert metrics["tflite_sparsity"] >= 0.5
    history = mlflow.MlflowClient().get_metric_history(tracked.info.run_id, "qat_loss")
    assert [m.step for m in history] == [0, 1]
    files = tracked.info.artifact_uri.removeprefix("file://")
    plain = load_model_file(f"{files}/model.h5")  # no tfmot wrappers: loads as any model
    assert not any("quant" in layer.name for layer in plain.layers)
    settings = settings_from(cfg)
    assert not list((Path(settings.paths.cache_dir) / "finetune").glob("qat-*.ckpt"))  # removed
    assert row_name({"model": {"name": "resnet8"}, "prune": {"method": "none"},
                     "quant": {"mode": "int8", "qat_epochs": 2}}) == "resnet8-none-qat2-int8"
    assert run_name(settings_from(make_cfg("quant=int8"))).endswith(" int8")
    assert run_name(settings_from(make_cfg("quant=int8", "quant.qat_epochs=3", "distill=kd",
                                           "prune.finetune_epochs=0"))).endswith(" int8 qat3 kd")


@pytest.mark.parametrize("override, message", [
    ("quant=dynamic quant.qat_epochs=2", "quant.qat_epochs: trains for an int8 export; use "
                                         "quant=int8 (quant.mode is 'dynamic')"),
    ("quant=int8 quant.qat_epochs=-1", "quant.qat_epochs: must be >= 0, got -1"),
    ("quant=int8 quant.qat_epochs=2 quant.qat_lr=0", "quant.qat_lr: must be > 0, got 0.0"),
    ("quant=int8 quant.qat_lr=0.01", "quant.qat_lr: is the quantization-aware training's rate: "
                                     "it needs quant.qat_epochs"),
])
def test_bad_quantization_aware_settings_are_refused_by_name(make_cfg, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from(make_cfg(*override.split()))
