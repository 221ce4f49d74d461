"""Latency of int8 ResNet-8s of given widths, side by side: is it the MACs or the widths?

    python -m benchmarks.channel_widths [--widths 16-32-64 9-17-29 8-16-32 ...] [--runs 200] \\
        [--kernels builtin]
    python -m benchmarks.channel_widths --model results/models/resnet8-dense-<key>.h5 \\
        [--rates 0.3 0.4 0.5] [--multiples 1 8]
    python -m benchmarks.channel_widths --groups 8-8-24-16-48-48 8-8-16-16-64-48 ... \\
        [--model results/models/<model>.h5]

Without --model, each width set (stem and stage 1, stage 2, stage 3) builds a ResNet-8 with
random weights (latency does not depend on their values). With --model, that Keras model is
channel-pruned (``src.prune.channel.remove_channels``, global scope, no fine-tuning: only the
shapes matter here) at each rate and ``prune.channel_multiple``, and the dense model is timed
beside them. With --groups, each shape is the channels every prunable group keeps
(``prune.widths``, the groups in model order; a 0 removes a residual branch) cut from --model,
or from a ResNet-8 of twice the default width (32-64-128, random weights) without it; the
speed-ups are over --model, or over the dense ResNet-8 (16-32-64) without it.
Every model is exported to int8 TFLite with random calibration images, and all
files are timed together as in ``benchmarks.latency``: LiteRT, batch 1, one thread, invokes
interleaved. Prints raw bytes, MACs, the conv widths, the median and each model's speed-up
over the first, so widths that are not a multiple of the kernels' SIMD block show up as MACs
that do not turn into speed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import add_kernels_argument, latency_table, machine
from src import models, quantize, speed
from src.config import ModelConfig, PruneConfig, QuantConfig
from src.keras_env import keras
from src.prune.channel import remove_channels

DEFAULT_WIDTHS = ["16-32-64", "12-24-48", "9-17-29", "8-16-32", "8-24-48", "8-16-48",
                  "8-24-40", "8-32-48"]


def conv_widths(model: keras.Model) -> str:
    """Returns the output channels of the model's convolutions, in order, joined by '-'."""
    return "-".join(str(layer.output.shape[-1]) for layer in model.layers
                    if isinstance(layer, keras.layers.Conv2D))


def candidates(args: argparse.Namespace) -> dict[str, keras.Model]:
    """Returns the models to time by name: built from widths, or pruned from --model."""
    if args.groups:
        source = (keras.models.load_model(args.model, compile=False) if args.model else
                  models.build(ModelConfig(name="resnet8", filters=[32, 64, 128]), 10))
        found = {"dense": source if args.model else models.build(ModelConfig(name="resnet8"), 10)}
        for shape in args.groups:
            found[shape] = remove_channels(source, PruneConfig(
                method="channel", widths=[int(w) for w in shape.split("-")]))
        return found
    if args.model is None:
        return {widths: models.build(ModelConfig(name="resnet8", filters=[
            int(w) for w in widths.split("-")]), 10) for widths in args.widths}
    dense = keras.models.load_model(args.model, compile=False)
    found = {"dense": dense}
    for multiple in args.multiples:
        for rate in args.rates:
            found[f"rate {rate:.2f}, multiple {multiple}"] = remove_channels(
                dense, PruneConfig(method="channel", rate=rate, channel_multiple=multiple))
    return found


def main(argv: list[str] | None = None) -> None:
    """Builds or prunes, exports and times the models and prints one row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--widths", nargs="+", default=DEFAULT_WIDTHS)
    shapes.add_argument("--groups", nargs="+", help="channels kept per group (prune.widths), "
                        "joined by '-'; replaces --widths, --rates and --multiples")
    parser.add_argument("--model", type=Path, help="a Keras model file to channel-prune")
    parser.add_argument("--rates", nargs="+", type=float, default=[0.3, 0.35, 0.4, 0.45, 0.5])
    parser.add_argument("--multiples", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    add_kernels_argument(parser)
    args = parser.parse_args(argv)
    calibration = np.random.default_rng(0).uniform(0, 255, (64, 32, 32, 3)).astype("float32")
    found = candidates(args)
    files = {name: quantize.to_tflite(model, QuantConfig(mode="int8"), calibration)
             for name, model in found.items()}
    stats = speed.compare_latency(files, 1, args.warmup, args.runs, args.repeats, args.kernels)
    source = args.model or ("ResNet-8 32-64-128 cut to the given group widths, random weights"
                            if args.groups else
                            "ResNet-8s built at the given stage widths, random weights")
    print(f"{source}, int8; LiteRT latency ({args.kernels} kernels), batch 1, 1 thread, "
          f"{args.repeats} rounds of {args.runs} invokes per model, interleaved; {machine()}")
    widths = {name: conv_widths(model) for name, model in found.items()}
    print("\n".join(latency_table(files, stats, {"conv widths": widths}, "speed-up")))

if __name__ == "__main__":
    main()
