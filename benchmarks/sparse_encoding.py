"""Raw .tflite bytes with and without the converter's sparse encoding (quant.sparse_encoding).

    python -m benchmarks.sparse_encoding [--rates 0.5 0.7 0.9] [--filters 16 32 64]

A ResNet-8 (CIFAR-10 shape, 10 classes) with random weights, pruned flat at each rate, exported
in each quantization mode with and without `tf.lite.Optimize.EXPERIMENTAL_SPARSITY`. Sizes do
not depend on training, so no data is read (int8 is calibrated on random images). Prints one
line per (rate, mode): raw and zipped bytes without and with the encoding, and their ratio.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import machine
from src.config import ModelConfig, QuantConfig
from src.keras_env import keras
from src.models import build
from src.prune import flat_masks, prunable_kernels
from src.quantize import to_tflite
from src.units import zipped_size

MODES = ("none", "dynamic", "float16", "int8")


def main() -> None:
    """Prints the size table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9])
    parser.add_argument("--filters", type=int, nargs=3, default=[16, 32, 64])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    args = parser.parse_args()
    calibration = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.uint8)
    print(f"# {machine()}; ResNet-8 filters {args.filters}, random weights, flat pruning")
    print(f"{'rate':>5} {'mode':>8} {'raw':>9} {'raw sparse':>11} {'ratio':>6} "
          f"{'zipped':>8} {'zip sparse':>11}")
    for rate in args.rates:
        keras.utils.set_random_seed(0)
        model = build(ModelConfig(name="resnet8", filters=list(args.filters)), 10)
        kernels = [var for _, var in prunable_kernels(model, ("Conv2D", "Dense"))]
        weights = [k.numpy() for k in kernels]
        for kernel, weight, mask in zip(kernels, weights, flat_masks(weights, rate)):
            kernel.assign(weight * mask)
        for mode in args.modes:
            plain, sparse = (to_tflite(model, QuantConfig(mode=mode, sparse_encoding=flag),
                                       calibration) for flag in (False, True))
            print(f"{rate:5.2f} {mode:>8} {len(plain):9d} {len(sparse):11d} "
                  f"{len(sparse) / len(plain):6.2f} {zipped_size(plain, 'm.tflite'):8d} "
                  f"{zipped_size(sparse, 'm.tflite'):11d}", flush=True)


if __name__ == "__main__":
    main()
