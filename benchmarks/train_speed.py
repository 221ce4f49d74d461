"""Training speed: XLA, threads, batch size, oneDNN, tf.data autotuning and the input pipeline
against the default.

    python -m benchmarks.train_speed [--images 10000] [--epochs 3] [--repeats 5] [--arms ...]

Each arm is one ResNet-8 ``fit`` through ``src.train.fit`` (the project's pipeline, recipe
and optimizer) in its own fresh process, since TensorFlow fixes its thread pools at start.
The arms run interleaved, in a rotated order each repetition, so that a slow spell of this
shared machine hits every arm alike.  Timed: training images/s over epochs 2.. (epoch 1
holds tracing and XLA compilation, reported apart as ``first``), the wall time between one
epoch's end and the next one's start (``between``: mean seconds), and evaluation images/s
(``src.train.evaluate``, second pass).  Each arm's figure is its ratio to the default arm
*within the same repetition*; the table prints the median ratio and its min-max spread,
plus the absolute medians and the validation accuracy reached at equal epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

from benchmarks.common import CIFAR_JPG, data_label, machine
from src import data, models, train
from src.config import PROJECT_ROOT, AugmentConfig, DataConfig, ModelConfig, TrainConfig
from src.keras_env import keras, tf

# name -> (TrainConfig changes, (intra_op, inter_op) threads or None for TensorFlow's default)
ARMS = {
    "default": ({}, None),
    "jit_compile": ({"jit_compile": True}, None),
    "threads_2x1": ({}, (2, 1)),
    "threads_1x1": ({}, (1, 1)),
    "batch_64": ({"batch_size": 64}, None),
    "batch_256": ({"batch_size": 256}, None),
    "no_augmentation": ({"augment": {"crop_padding": 0, "flip": False}}, None),
    "onednn_off": ({}, None),
    "autotune_on": ({}, None),
}
# Arms that differ in the environment the process starts with (read at TensorFlow's import).
ARM_ENV = {"onednn_off": {"TF_ENABLE_ONEDNN_OPTS": "0"}}  # see src/onednn.py
# Arms that switch a setting of src.train that is not a TrainConfig field.
ARM_TRAIN = {"autotune_on": {"TF_DATA_AUTOTUNE": True}}  # tf.data's autotuning thread


class EpochClock(keras.callbacks.Callback):
    """Records each epoch's wall time, and the wall time between epochs."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self.between: list[float] = []
        self.end: float | None = None

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()
        if self.end is not None:
            self.between.append(self.start - self.end)

    def on_epoch_end(self, epoch, logs=None):
        self.end = time.perf_counter()
        self.seconds.append(self.end - self.start)


def child(arm: str, images: int, test_images: int, epochs: int) -> dict:
    """Returns one arm's measurement, taken in this (fresh) process."""
    changes, threads = ARMS[arm]
    for name, value in ARM_TRAIN.get(arm, {}).items():
        setattr(train, name, value)
    if threads:  # before TensorFlow's first op, which fixes the pools
        tf.config.threading.set_intra_op_parallelism_threads(threads[0])
        tf.config.threading.set_inter_op_parallelism_threads(threads[1])
    with tempfile.TemporaryDirectory() as cache:
        source = DataConfig(name="cifar10", path=str(CIFAR_JPG), limit_train=images,
                            limit_test=test_images) if CIFAR_JPG.exists() else \
            DataConfig(name="synthetic", n_train=images, n_test=test_images)
        ds = data.load(source, cache)
    augment = AugmentConfig(**changes["augment"]) if "augment" in changes else AugmentConfig()
    cfg = replace(TrainConfig(epochs=epochs, verbose=0), **{**changes, "augment": augment})
    keras.utils.set_random_seed(0)
    model = models.build(ModelConfig(name="resnet8"), ds.num_classes)
    clock = EpochClock()
    history = train.fit(model, ds.x_train, ds.y_train, ds.x_val, ds.y_val, ds.num_classes, cfg,
                        epochs=epochs, lr=cfg.lr, warmup_epochs=cfg.warmup_epochs,
                        callbacks=[clock])
    n = len(ds.x_train)
    model.compile(jit_compile=cfg.jit_compile)  # evaluate() predicts with the same setting
    eval_seconds = []
    for _ in range(2):
        start = time.perf_counter()
        train.evaluate(model, ds.x_test, ds.y_test)
        eval_seconds.append(time.perf_counter() - start)
    return {"train": n * (epochs - 1) / sum(clock.seconds[1:]), "first": clock.seconds[0],
            "between": statistics.mean(clock.between) if clock.between else float("nan"),
            "eval": len(ds.x_test) / eval_seconds[1],
            "val_accuracy": history.get("val_accuracy", [float("nan")])[-1]}


def measure(arm: str, args: argparse.Namespace) -> dict:
    """Returns one arm's measurement from a fresh process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_speed", "--child", arm,
         f"--images={args.images}", f"--test-images={args.test_images}",
         f"--epochs={args.epochs}"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, check=True,
        env={**{k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"},
             "TF_CPP_MIN_LOG_LEVEL": "2", **ARM_ENV.get(arm, {})})
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(rows: list[dict[str, dict]], arms: list[str]) -> list[str]:
    """Returns the table lines: paired ratios to default (median, min-max) and medians."""
    lines = [f"{'arm':16s} {'train ratio':>20s} {'eval ratio':>20s} {'train img/s':>11s} "
             f"{'eval img/s':>10s} {'first s':>8s} {'between s':>9s} {'val acc':>7s}"]
    for arm in arms:
        cells = []
        for key in ("train", "eval"):
            ratios = [row[arm][key] / row["default"][key] for row in rows]
            cells.append(f"{statistics.median(ratios):5.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        med = {k: statistics.median(row[arm][k] for row in rows)
               for k in ("train", "eval", "first", "between", "val_accuracy")}
        lines.append(f"{arm:16s} {cells[0]:>20s} {cells[1]:>20s} {med['train']:11.0f} "
                     f"{med['eval']:10.0f} {med['first']:8.1f} {med['between']:9.2f} "
                     f"{med['val_accuracy']:7.3f}")
    return lines


def main() -> None:
    """Runs the arms interleaved and prints the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--child", choices=list(ARMS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images, args.test_images, args.epochs)))
        return
    arms = ["default", *[a for a in args.arms.split(",") if a != "default"]]
    rows = []
    for repeat in range(args.repeats):
        order = arms[repeat % len(arms):] + arms[:repeat % len(arms)]  # rotate the start
        rows.append({arm: measure(arm, args) for arm in order})
        print(f"repetition {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    print(f"# training speed: ResNet-8 via src.train.fit, {args.images} images of "
          f"{data_label()} (10% validation), {args.epochs} epochs (2.. timed), "
          f"{args.repeats} interleaved repetitions, one process per arm; {machine()}")
    print("# ratios are to the default arm of the same repetition: median (min-max)")
    print("\n".join(summary(rows, arms)))


if __name__ == "__main__":
    main()
