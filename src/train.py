"""Training: the tf.data input pipeline, optimizer and learning-rate schedule, and fit."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from src.config import TrainConfig
from src.keras_env import keras, tf


def input_pipeline(
    x: np.ndarray, y: np.ndarray, num_classes: int, cfg: TrainConfig, training: bool
) -> tf.data.Dataset:
    """Returns batches of (float images 0..255, one-hot labels), augmented when training."""
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        data = data.shuffle(len(x), seed=cfg.seed, reshuffle_each_iteration=True)
    data = data.batch(cfg.batch_size)
    pad = cfg.augment.crop_padding

    def prepare(images, labels):
        images = tf.cast(images, tf.float32)
        if training and pad:
            images = random_crop(images, pad)
        if training and cfg.augment.flip:
            images = tf.image.random_flip_left_right(images)
        return images, tf.one_hot(labels, num_classes)

    return data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def random_crop(images: tf.Tensor, pad: int) -> tf.Tensor:
    """Returns each image of the batch reflect-padded by pad and cropped back at a random offset."""
    size = tf.shape(images)[1]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    offsets = tf.random.uniform([tf.shape(images)[0], 2], 0, 2 * pad + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(size)[None, :]
    cols = offsets[:, 1:] + tf.range(size)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to the peak rate, then cosine decay to zero (or constant)."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, cosine: bool = True):
        self.peak, self.warmup_steps, self.total_steps, self.cosine = (
            peak, warmup_steps, max(total_steps, 1), cosine)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.peak * (step + 1) / max(self.warmup_steps, 1)
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0.0, 1.0)
        decayed = self.peak * 0.5 * (1 + tf.cos(math.pi * progress)) if self.cosine else self.peak
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self) -> dict:
        return {"peak": self.peak, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "cosine": self.cosine}


def make_optimizer(cfg: TrainConfig, lr: float, epochs: int, steps_per_epoch: int,
                   warmup_epochs: float) -> keras.optimizers.Optimizer:
    """Returns the configured optimizer with decoupled weight decay and the lr schedule."""
    schedule = WarmupCosine(lr, int(warmup_epochs * steps_per_epoch), epochs * steps_per_epoch,
                            cosine=cfg.schedule == "cosine")
    decay = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                    weight_decay=decay)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(schedule, weight_decay=decay)


def compile_model(model: keras.Model, cfg: TrainConfig, lr: float, epochs: int,
                  steps_per_epoch: int, warmup_epochs: float) -> None:
    """Compiles the model for training with the configured loss and optimizer."""
    model.compile(
        optimizer=make_optimizer(cfg, lr, epochs, steps_per_epoch, warmup_epochs),
        loss=keras.losses.CategoricalCrossentropy(from_logits=not ends_in_softmax(model),
                                                  label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )


def ends_in_softmax(model: keras.Model) -> bool:
    """Returns True when the output layer applies softmax (probabilities), False for logits."""
    layer = model.layers[-1]
    while isinstance(layer, keras.Model) or hasattr(layer, "layer"):  # nesting, tfmot wrappers
        layer = layer.layers[-1] if isinstance(layer, keras.Model) else layer.layer
    if isinstance(layer, keras.layers.Softmax):
        return True
    function = getattr(layer, "activation", None) or getattr(layer, "function", None)
    return getattr(function, "__name__", "") == "softmax"  # also a tf.nn.softmax op layer


class RaiseOnNaN(keras.callbacks.Callback):
    """Fails training at the first NaN or infinite loss instead of training on garbage."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at batch {batch}")


def fit(model: keras.Model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
        y_val: np.ndarray, num_classes: int, cfg: TrainConfig, *, epochs: int, lr: float,
        warmup_epochs: float, callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Trains the model in place and returns its per-epoch history."""
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    steps = math.ceil(len(x_train) / cfg.batch_size)
    compile_model(model, cfg, lr, epochs, steps, warmup_epochs)
    train_data = input_pipeline(x_train, y_train, num_classes, cfg, training=True)
    val_data = input_pipeline(x_val, y_val, num_classes, cfg, training=False) \
        if len(x_val) else None
    history = model.fit(train_data, validation_data=val_data, epochs=epochs,
                        callbacks=[RaiseOnNaN(), *callbacks], verbose=cfg.verbose)
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Returns the model's top-1 accuracy on (x, y)."""
    probs = model.predict(tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
                          .map(lambda b: tf.cast(b, tf.float32)), verbose=0)
    return float(np.mean(np.argmax(probs, axis=1) == y))
