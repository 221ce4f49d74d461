"""int8 accuracy of Keras model files under several calibration sets: how much of a
post-training-quantization result is the draw of calibration images.

    python -m benchmarks.calibration results/models/resnet8x1.5-w8-*.h5 \\
        --data ../shared/datasets/cifar10-jpg.tar.gz [--samples 256 1024 4096] [--seeds 0 1 2]

Each file is exported to int8 TFLite as a run exports it (src.quantize.to_tflite, calibrated on
the training images) once per calibration set: `--samples` images drawn with subset seed 0 (the
subset a run with quant.representative_samples and data.val_fraction=0.0 uses: a validation
split would leave fewer training images to draw from), and the first size again with every other
`--seeds` seed. Every export is scored on the whole test split with LiteRT. Prints, per file,
the Keras accuracy, each export's int8 accuracy, and the spread of the int8 accuracies; then
the mean of every column over the files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from src.config import QuantConfig
from src.data import read_local
from src.model_file import load_model_file
from src.quantize import evaluate_tflite, to_tflite
from src.train import evaluate


def calibration_sets(samples: list[int], seeds: list[int]) -> list[tuple[int, int]]:
    """Returns the (images, subset seed) pairs to export with: every size with seed 0, then the
    first size with each other seed."""
    return [(n, 0) for n in samples] + [(samples[0], seed) for seed in seeds if seed != 0]


def main(argv: list[str] | None = None) -> None:
    """Exports each file once per calibration set and prints its accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True,
                        help="a CIFAR-10 archive or image folder, as data.path reads it")
    parser.add_argument("--samples", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    (x_train, _, x_test, y_test), _ = read_local(args.data, 32)
    sets = calibration_sets(args.samples, args.seeds)
    print(f"int8 export (src.quantize.to_tflite) per calibration set of training images, "
          f"scored by LiteRT on {len(x_test)} test images; {machine()}")
    header = " | ".join(f"{n}/seed {seed}" for n, seed in sets)
    print(f"| file | Keras | {header} | int8 min-max | int8 mean - Keras |")
    print("|---" * (len(sets) + 4) + "|")
    table = []
    for path in args.files:
        model = load_model_file(path)
        keras_accuracy = evaluate(model, x_test, y_test)
        scores = []
        for n, seed in sets:
            # to_tflite takes the first n of its own seed-0 permutation: reorder for other seeds.
            pool = x_train if seed == 0 else \
                x_train[np.random.default_rng(seed).permutation(len(x_train))]
            flatbuffer = to_tflite(model, QuantConfig(mode="int8", representative_samples=n),
                                   pool)
            scores.append(evaluate_tflite(flatbuffer, x_test, y_test))
        table.append([keras_accuracy, *scores])
        cells = " | ".join(f"{s:.2%}" for s in scores)
        print(f"| {path.name} | {keras_accuracy:.2%} | {cells} | {min(scores):.2%}-"
              f"{max(scores):.2%} | {np.mean(scores) - keras_accuracy:+.2%} |", flush=True)
    if len(table) > 1:
        means = np.mean(table, axis=0)
        print(f"| mean of {len(table)} files | " + " | ".join(f"{m:.2%}" for m in means)
              + f" | | {np.mean(means[1:]) - means[0]:+.2%} |")


if __name__ == "__main__":
    main()
