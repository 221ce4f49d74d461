"""Where an int8 model's latency goes: the model cut after each layer, all cuts timed together.

    python -m benchmarks.layer_profile results/models/<model>.h5 [--kernels builtin] \\
        [--runs 200] [--repeats 5]

LiteRT's Python interpreter has no per-operator profiler, so each cut is a model of its own:
the Keras model up to one layer (that layer and every layer it depends on), exported to int8
TFLite with random calibration images and timed with all the other cuts as in
``benchmarks.latency`` (batch 1, one thread, invokes interleaved). A layer whose only reader is
a BatchNormalization or a ReLU is not cut after, because the converter fuses it into that
reader. Each row prints the cut's median, what it adds over the row before (the layers it
newly includes) and that difference as a share of the whole model's median. The differences
carry the timer's noise (a few microseconds) and each cut's own input and output conversion,
so read them as where the time goes, not to the microsecond.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import add_kernels_argument, machine
from src import quantize, speed
from src.config import QuantConfig
from src.keras_env import keras
from src.prune.channel import as_functional

FUSED_INTO = ("BatchNormalization", "Activation", "ReLU")


def cut_points(model: keras.Model) -> list[str]:
    """Returns the layers to cut after, in model order: every layer but the input, those whose
    only reader fuses them (a convolution into its BatchNorm, a BatchNorm into its ReLU) and
    those that do not include the cut before (a residual block's shortcut, timed with the Add
    that reads it), so each cut is the one before plus some layers."""
    readers: dict[str, list[str]] = {}
    for layer in model.layers:
        for source in _sources(layer):
            readers.setdefault(source, []).append(layer.name)
    points, before = [], set()
    for layer in _layers(model):
        after = readers.get(layer.name, [])
        fused = len(after) == 1 and type(model.get_layer(after[0])).__name__ in FUSED_INTO
        needed = _ancestors(model, layer.name)
        if not fused and needed >= before:
            points.append(layer.name)
            before = needed
    return points


def added_layers(model: keras.Model, points: list[str]) -> dict[str, list[str]]:
    """Returns, for each cut, the layers it computes that the cut before it does not."""
    seen: set[str] = set()
    added = {}
    for point in points:
        needed = _ancestors(model, point)
        added[point] = [layer.name for layer in _layers(model) if layer.name in needed - seen]
        seen |= needed
    return added


def _layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _sources(layer: keras.layers.Layer) -> list[str]:
    """Returns the names of the layers whose outputs layer reads."""
    names = []
    for node in layer.inbound_nodes:
        inbound = node.inbound_layers
        names += [source.name for source in (inbound if isinstance(inbound, list) else [inbound])]
    return names


def _ancestors(model: keras.Model, name: str) -> set[str]:
    found, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo += _sources(model.get_layer(current))
    return found


def main(argv: list[str] | None = None) -> None:
    """Cuts, exports and times the model and prints one row per cut."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a Keras model file (.h5 or .keras)")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    add_kernels_argument(parser)
    args = parser.parse_args(argv)
    model = as_functional(keras.models.load_model(args.model, compile=False))
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        parser.error(f"{args.model}: a model of one input and one output, not "
                     f"{len(model.inputs)} and {len(model.outputs)}")
    points = cut_points(model)
    shape = model.inputs[0].shape[1:]
    calibration = np.random.default_rng(0).uniform(0, 255, (32, *shape)).astype(np.float32)
    quant = QuantConfig(mode="int8", representative_samples=32)
    files = {point: quantize.to_tflite(keras.Model(model.inputs, model.get_layer(point).output),
                                       quant, calibration) for point in points}
    stats = speed.compare_latency(files, 1, args.warmup, args.runs, args.repeats, args.kernels)
    added = added_layers(model, points)
    whole = stats[points[-1]].median_ms
    print(f"{args.model}, int8, cut after each layer; LiteRT latency ({args.kernels} kernels), "
          f"batch 1, 1 thread, {args.repeats} rounds of {args.runs} invokes per cut, "
          f"interleaved; {machine()}")
    print("| cut after | adds | median ms | added ms | share |")
    print("|---|---|---|---|---|")
    before = 0.0
    for point in points:
        median = stats[point].median_ms
        print(f"| {point} | {', '.join(added[point])} | {median:.4f} | {median - before:+.4f} | "
              f"{(median - before) / whole:.0%} |")
        before = median


if __name__ == "__main__":
    main()
