"""Latency and MACs of the exported model: counted right, measured for every run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from src import speed
from src.config import ConfigError, ModelConfig, QuantConfig, settings_from
from src.experiment import run
from src.keras_env import keras
from src.models import build
from src.quantize import to_tflite
from tests.conftest import runs_of

layers = keras.layers
MODES = ("none", "dynamic", "int8", "float16")


def keras_macs(model: keras.Model) -> int:
    """Returns the model's multiply-accumulates counted from its Keras layers, independently."""
    total = 0
    for layer in model.layers:
        kind, per_item = type(layer).__name__, math.prod(layer.output.shape[1:] or [0])
        if kind == "Conv2D":
            total += per_item * math.prod(layer.kernel.shape[:3])
        elif kind == "DepthwiseConv2D":
            total += per_item * math.prod(layer.depthwise_kernel.shape[:2])
        elif kind == "Dense":
            total += per_item * layer.kernel.shape[0]
    return total


def small_model() -> keras.Model:
    inputs = keras.Input((12, 12, 3))
    x = layers.Conv2D(6, 3, strides=2, padding="same")(inputs)
    x = layers.DepthwiseConv2D(3)(layers.BatchNormalization()(x))
    x = layers.Conv2D(5, 1)(x)
    x = layers.Dense(4)(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(3, activation="softmax")(x))


def calibration(size: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (8, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
def test_macs_from_the_tflite_graph_match_the_keras_layers(mode):
    model = small_model()
    flatbuffer = to_tflite(model, QuantConfig(mode=mode, representative_samples=8),
                           calibration(12))
    # 6x6x6x27 + 4x4x6x9 + 4x4x5x6 + 4x80 + 3x4
    assert speed.tflite_macs(flatbuffer) == keras_macs(model) == 5832 + 864 + 480 + 320 + 12


def test_resnet8_has_the_mlperf_tiny_macs():
    model = build(ModelConfig(name="resnet8"), 10)
    flatbuffer = to_tflite(model, QuantConfig(mode="none"), calibration(32))
    assert speed.tflite_macs(flatbuffer) == keras_macs(model)
    assert 12.4e6 < speed.tflite_macs(flatbuffer) < 12.6e6  # MLPerf Tiny: 12.5 M MACs
    assert speed.params(model) == model.count_params()


def test_latency_counts_its_runs_and_a_heavy_model_is_slower():
    light = to_tflite(small_model(), QuantConfig(mode="none"), calibration(12))
    heavy = to_tflite(build(ModelConfig(name="resnet8", filters=[32, 64, 128]), 10),
                      QuantConfig(mode="none"), calibration(32))
    stats = speed.tflite_latency(light, warmup=2, runs=7, repeats=3)
    assert stats.runs == 21 and 0 < stats.median_ms and 0 < stats.p90_ms
    both = speed.compare_latency({"light": light, "heavy": heavy}, warmup=2, runs=10, repeats=3)
    assert both["light"].runs == both["heavy"].runs == 30
    # Thousands of times the MACs: interleaved, the heavy model is slower even on a busy machine.
    assert both["heavy"].median_ms > 3 * both["light"].median_ms


def test_latency_of_an_int8_model_with_integer_input():
    flatbuffer = to_tflite(small_model(), QuantConfig(mode="int8", representative_samples=8,
                                                      integer_io=True), calibration(12))
    assert speed.tflite_latency(flatbuffer, warmup=1, runs=3, repeats=1).runs == 3


def test_builtin_kernels_run_without_the_xnnpack_delegate():
    flatbuffer = to_tflite(small_model(), QuantConfig(mode="int8", representative_samples=8),
                           calibration(12))
    ops = {kernels: {op["op_name"] for op in speed._interpreter(flatbuffer, 1, kernels)
                     ._get_ops_details()} for kernels in speed.KERNELS}
    assert "DELEGATE" in ops["xnnpack"] and "DELEGATE" not in ops["builtin"]
    assert "CONV_2D" in ops["builtin"]
    stats = speed.compare_latency({"a": flatbuffer}, warmup=1, runs=3, repeats=1,
                                  kernels="builtin")
    assert stats["a"].runs == 3 and stats["a"].median_ms > 0


@pytest.mark.parametrize("key, value", [("latency_runs", 0), ("latency_threads", 0),
                                        ("latency_repeats", 0), ("latency_warmup", -1),
                                        ("latency_kernels", "gpu")])
def test_bad_measure_settings_are_refused_by_key(make_cfg, key, value):
    with pytest.raises(ConfigError, match=f"measure.{key}"):
        settings_from(make_cfg(f"measure.{key}={value}"))


def test_every_quantization_mode_exports_evaluates_and_logs_latency_and_macs(make_cfg):
    macs, sizes = {}, {}
    for mode in MODES:  # one tmp_path: the dense baseline is trained once and reused
        kernels = "builtin" if mode == "int8" else "xnnpack"
        cfg = make_cfg("prune=flat", "prune.rate=0.5", f"quant={mode}",
                       "measure.latency_runs=5", "measure.latency_repeats=2",
                       "measure.latency_warmup=1", f"measure.latency_kernels={kernels}")
        returned = run(cfg)
        logged = runs_of(cfg)[0].data
        metrics = logged.metrics
        assert logged.params["measure.latency_kernels"] == kernels
        assert logged.tags["processor"] == speed.processor()
        assert 0.0 <= metrics["tflite_accuracy"] <= 1.0, mode
        assert abs(metrics["tflite_accuracy"] - metrics["test_accuracy"]) < 0.1, mode
        assert metrics["tflite_sparsity"] >= 0.49, mode
        assert metrics["tflite_latency_ms"] == returned["tflite_latency_ms"] > 0
        assert metrics["tflite_latency_p90_ms"] > 0
        assert metrics["params"] > 0
        macs[mode], sizes[mode] = metrics["macs"], metrics["tflite_bytes"]
    model = build(ModelConfig(name="resnet8", filters=[4, 8, 8]), 4)
    assert set(macs.values()) == {keras_macs(model)}  # quantization changes no MAC
    assert sizes["int8"] < sizes["float16"] < sizes["none"]  # the raw file, zeros and all


def test_the_benchmarks_latency_table_gives_each_file_its_own_numbers_and_ratio():
    from benchmarks.common import latency_table

    light = to_tflite(small_model(), QuantConfig(mode="none"), calibration(12))
    files = {"dense": light, "half": light}
    stats = {"dense": speed.LatencyStats(2.0, 2.5, 10), "half": speed.LatencyStats(1.0, 1.2, 10)}
    header, rule, dense, half = latency_table(files, stats, {"widths": {"dense": "8", "half": "4"}},
                                              "speed-up")
    assert header == "| model | widths | raw bytes | MACs | median ms | p90 ms | speed-up |"
    assert rule == "|---|---|---|---|---|---|---|"
    macs = speed.tflite_macs(light)
    assert dense == f"| dense | 8 | {len(light)} | {macs} | 2.0000 | 2.5000 | 1.00x |"
    assert half == f"| half | 4 | {len(light)} | {macs} | 1.0000 | 1.2000 | 2.00x |"


@pytest.mark.parametrize("cpuinfo, expected", [
    ("model name\t: Xeon\nflags\t\t: fpu avx512_vnni amx_int8\n", "Xeon (amx_int8, avx512_vnni)"),
    ("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\nCPU part\t: 0xd0c\n",
     "aarch64 (asimddp, i8mm)"),
    ("model name\t: Old\nflags\t\t: fpu sse2\n", "Old (no int8 dot-product extension)"),
])
def test_the_processor_names_its_int8_extensions_on_x86_and_arm(monkeypatch, cpuinfo, expected):
    class CpuInfo:
        def __init__(self, path: str):
            assert path == "/proc/cpuinfo"

        def read_text(self) -> str:
            return cpuinfo

    monkeypatch.setattr(speed, "Path", CpuInfo)
    monkeypatch.setattr(speed.platform, "machine", lambda: "aarch64")
    assert speed.processor() == expected


def test_the_calibration_benchmark_scores_every_calibration_set_of_every_file(tmp_path, capsys):
    from benchmarks import calibration
    from src.keras_env import keras
    from tests.test_data import write_official_cifar
    archive = write_official_cifar(tmp_path / "cifar-10-python.tar.gz")
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
                              keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)])
    model.save(tmp_path / "tiny.h5")
    assert calibration.calibration_sets([4, 8], [0, 1]) == [(4, 0), (8, 0), (4, 1)]
    model.save(tmp_path / "again.h5")
    calibration.main([str(tmp_path / "tiny.h5"), str(tmp_path / "again.h5"), "--data",
                      str(archive), "--samples", "4", "--seeds", "0", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "| file | Keras | 4/seed 0 | 4/seed 1 | int8 min-max |" in lines[1]
    row = [cell.strip() for cell in lines[3].split("|")[1:-1]]
    assert row[0] == "tiny.h5" and len(row) == 6 and all(c.endswith("%") for c in row[1:])
    assert lines[5].startswith("| mean of 2 files | ")


def test_the_layer_profile_cuts_a_resnet_block_by_block_and_times_every_cut(tmp_path, capsys):
    from benchmarks import layer_profile
    from src.prune.channel import as_functional

    model = build(ModelConfig(name="resnet8", filters=[4, 8, 8]), 10)
    points = layer_profile.cut_points(model)
    # Convolutions fuse into their BatchNorm and those into their ReLU; a shortcut is timed
    # with its Add, so every cut is the one before plus some layers.
    assert points[:6] == ["scale", "stem_relu", "stage1_a_relu", "stage1_b_bn", "stage1_out",
                          "stage2_a_relu"]
    assert "stage2_shortcut" not in points and points[-2:] == ["pool", "predictions"]
    added = layer_profile.added_layers(model, points)
    assert added["stage2_out"] == ["stage2_shortcut", "stage2_add", "stage2_out"]
    assert sorted(sum(added.values(), [])) == sorted(layer.name for layer in model.layers[1:])
    sequential = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, name="conv"),
                                   layers.ReLU(name="relu"), layers.Flatten(name="flat"),
                                   layers.Dense(2, name="out")])
    sequential.save(tmp_path / "sequential.h5")  # loaded as it is given: first layer included
    assert layer_profile.cut_points(as_functional(keras.models.load_model(
        tmp_path / "sequential.h5"))) == ["relu", "flat", "out"]
    model.save(tmp_path / "resnet8.h5")
    layer_profile.main([str(tmp_path / "resnet8.h5"), "--runs", "3", "--repeats", "1",
                        "--warmup", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(points) and rows[-1].startswith("| predictions | predictions |")
