"""Input pipeline: training images/s through the project's tf.data pipeline against a bare
``model.fit`` on in-memory tensors, same model (ResNet-8), batch and images.

    python -m benchmarks.input_pipeline [--images 20000] [--epochs 3] [--batch 128]

The first epoch (tracing, warm-up) is left out; the rest are timed per epoch, inside each
epoch (the time between epochs is ``benchmarks.train_speed``'s ``between``). The project's
pipeline runs without tf.data's autotuning (src/train.py says why); Keras' own pipeline for
in-memory tensors runs with it.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np

from benchmarks.common import CIFAR_JPG, data_label, machine
from benchmarks.train_speed import EpochClock
from src import data, models
from src.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from src.keras_env import keras, tf
from src.train import compile_model, input_pipeline


def images_per_second(fit, n: int, epochs: int) -> float:
    """Returns images/s over all epochs but the first."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = models.build(ModelConfig(name="resnet8"), 10)
    clock = EpochClock()
    fit(model, clock)
    return n * (epochs - 1) / sum(clock.seconds[1:])


def main() -> None:
    """Times each pipeline and prints images/s."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        source = DataConfig(name="cifar10", path=str(CIFAR_JPG), val_fraction=0.0) \
            if CIFAR_JPG.exists() else DataConfig(name="synthetic", n_train=args.images,
                                                  val_fraction=0.0)
        ds = data.load(source, cache)
    x, y = ds.x_train[: args.images], ds.y_train[: args.images]
    n = len(x)
    results = {}
    for label, augment in [("project pipeline, crop + flip", AugmentConfig()),
                           ("project pipeline, no augmentation", AugmentConfig(0, False))]:
        cfg = TrainConfig(batch_size=args.batch, augment=augment, verbose=0, epochs=args.epochs)

        def fit(model, clock, cfg=cfg):
            compile_model(model, cfg, cfg.lr, args.epochs, int(np.ceil(n / cfg.batch_size)), 0)
            model.fit(input_pipeline(x, y, 10, cfg, training=True), epochs=args.epochs,
                      callbacks=[clock], verbose=0)

        results[label] = images_per_second(fit, n, args.epochs)
    bare_cfg = TrainConfig(batch_size=args.batch, verbose=0, epochs=args.epochs)
    x_tensor = tf.constant(x.astype(np.float32))
    y_tensor = tf.one_hot(y, 10)

    def bare(model, clock):
        compile_model(model, bare_cfg, bare_cfg.lr, args.epochs, int(np.ceil(n / args.batch)), 0)
        model.fit(x_tensor, y_tensor, batch_size=args.batch, epochs=args.epochs, shuffle=True,
                  callbacks=[clock], verbose=0)

    results["bare model.fit on in-memory tensors"] = bare_rate = images_per_second(
        bare, n, args.epochs)
    print(f"# input pipeline: ResNet-8, batch {args.batch}, {n} images of {data_label()}, "
          f"epochs 2..{args.epochs} timed; {machine()}")
    for label, rate in results.items():
        print(f"{label:40s} {rate:8.0f} images/s = {100 * rate / bare_rate:5.1f}% of bare "
              "(target >= 95% for the project pipeline)")


if __name__ == "__main__":
    main()
