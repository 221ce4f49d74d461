"""Latency of int8 ResNet-8s of given stage widths, side by side: is it the MACs or the widths?

    python -m benchmarks.channel_widths [--widths 16-32-64 9-17-29 8-16-32 ...] [--runs 200]

Each width set (stem and stage 1, stage 2, stage 3) builds a ResNet-8 with random weights
(latency does not depend on their values), exported to int8 TFLite with random calibration
images, and all files are timed together as in ``benchmarks.latency``: LiteRT, batch 1, one
thread, invokes interleaved. Prints raw bytes, MACs, the median and each set's speed-up over
the first, so widths that are not a multiple of the kernels' SIMD block show up as MACs
that do not turn into speed.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import machine
from src import models, quantize, speed
from src.config import ModelConfig, QuantConfig

DEFAULT_WIDTHS = ["16-32-64", "12-24-48", "9-17-29", "8-16-32", "8-24-48", "8-16-48",
                  "8-24-40", "8-32-48"]


def main(argv: list[str] | None = None) -> None:
    """Builds, exports and times one ResNet-8 per width set and prints one row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", nargs="+", default=DEFAULT_WIDTHS)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    calibration = np.random.default_rng(0).uniform(0, 255, (64, 32, 32, 3)).astype("float32")
    files = {}
    for widths in args.widths:
        model = models.build(ModelConfig(name="resnet8", filters=[int(w) for w in
                                                                   widths.split("-")]), 10)
        files[widths] = quantize.to_tflite(model, QuantConfig(mode="int8"), calibration)
    stats = speed.compare_latency(files, 1, args.warmup, args.runs, args.repeats)
    print(f"ResNet-8 int8 by stage widths; LiteRT latency, batch 1, 1 thread, {args.repeats} "
          f"rounds of {args.runs} invokes per model, interleaved; {machine()}")
    first = stats[args.widths[0]].median_ms
    print("| widths | raw bytes | MACs | median ms | p90 ms | speed-up |")
    print("|---|---|---|---|---|---|")
    for widths, found in stats.items():
        print(f"| {widths} | {len(files[widths])} | {speed.tflite_macs(files[widths])} | "
              f"{found.median_ms:.4f} | {found.p90_ms:.4f} | {first / found.median_ms:.2f}x |")


if __name__ == "__main__":
    main()
