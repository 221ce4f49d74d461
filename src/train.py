"""Training: the tf.data input pipeline, optimizer and learning-rate schedule, and fit."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import numpy as np

from src.checkpoint import EpochCheckpoint
from src.config import TrainConfig
from src.distill import Distillation, Distiller
from src.keras_env import keras, tf

# tf.data's autotuning runs an optimisation thread that sleeps up to 60 s between rounds, and
# an iterator's teardown waits for it: Keras builds a new iterator each epoch, so a long training
# lost 0-35 s between epochs (a third of its wall time). Off in every pipeline here: a map
# with AUTOTUNE then runs min(16, TensorFlow's thread pool) calls at once, and a prefetch with
# AUTOTUNE doubles its buffer whenever the model finds it empty. `python -m
# benchmarks.train_speed --arms autotune_on` measures both sides (benchmarks/RESULTS.md).
TF_DATA_AUTOTUNE = False


def without_autotune(data: tf.data.Dataset) -> tf.data.Dataset:
    """Returns data with tf.data's autotuning thread off, unless TF_DATA_AUTOTUNE is set."""
    options = tf.data.Options()
    options.autotune.enabled = TF_DATA_AUTOTUNE
    return data.with_options(options)


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
        if training and cfg.augment.rotation:
            images = random_rotation(images, cfg.augment.rotation)
        if training and pad:
            images = random_crop(images, pad)
        if training and cfg.augment.flip:
            images = tf.image.random_flip_left_right(images)
        labels = tf.one_hot(labels, num_classes)
        if training and cfg.augment.mixup:
            images, labels = mix_up(images, labels, cfg.augment.mixup)
        return images, labels

    return without_autotune(
        data.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))


def mix_up(images: tf.Tensor, labels: tf.Tensor, alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns each image and one-hot label of the batch blended with those of another image of
    the batch (a random pairing), by a weight drawn per image from Beta(alpha, alpha)."""
    n = tf.shape(images)[0]
    first, second = tf.random.gamma([n], alpha), tf.random.gamma([n], alpha)
    weight = tf.math.divide_no_nan(first, first + second)  # Beta(alpha, alpha)
    partner = tf.random.shuffle(tf.range(n))

    def blend(values: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        return weights * values + (1 - weights) * tf.gather(values, partner)

    return blend(images, weight[:, None, None, None]), blend(labels, weight[:, None])


def random_crop(images: tf.Tensor, pad: int) -> tf.Tensor:
    """Returns each image of the batch reflect-padded by pad and cropped back at a random offset."""
    size = tf.shape(images)[1]
    padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
    offsets = tf.random.uniform([tf.shape(images)[0], 2], 0, 2 * pad + 1, dtype=tf.int32)
    rows = offsets[:, :1] + tf.range(size)[None, :]
    cols = offsets[:, 1:] + tf.range(size)[None, :]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def random_rotation(images: tf.Tensor, degrees: float) -> tf.Tensor:
    """Returns each image of the batch turned by its own random angle within +-degrees."""
    radians = degrees * math.pi / 180
    return rotate(images, tf.random.uniform([tf.shape(images)[0]], -radians, radians))


def rotate(images: tf.Tensor, angles: tf.Tensor) -> tf.Tensor:
    """Returns each image turned about its centre by its angle (radians, counter-clockwise as
    displayed), bilinear, the corners filled with the nearest edge pixel (as the MLPerf Tiny
    reference's ImageDataGenerator does)."""
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    cos, sin = tf.cos(angles), tf.sin(angles)
    # Each output pixel (x, y) reads the input at [a0 a1 a2; b0 b1 b2] (x, y, 1).
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2
    zeros = tf.zeros_like(angles)
    transforms = tf.stack([cos, -sin, x_offset, sin, cos, y_offset, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")


# Raise whenever training code changes what a given recipe learns: the baseline cache is
# keyed on it (with the recipe, architecture, data and library versions), not on source text.
RECIPE_VERSION = 3


class ExponentialAfterWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to lr (from lr / warmup at step 0, as CosineDecay's), then lr times
    decay once per epoch: the MLPerf Tiny ResNet-8 recipe's lr x 0.99^epoch."""

    def __init__(self, lr: float, decay: float, steps_per_epoch: int, warmup: int):
        super().__init__()
        self.lr, self.decay = lr, decay
        self.steps_per_epoch, self.warmup = steps_per_epoch, warmup

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        epochs_done = tf.floor(tf.maximum(step - self.warmup, 0.0) / self.steps_per_epoch)
        decayed = self.lr * tf.pow(self.decay, epochs_done)
        if not self.warmup:
            return decayed
        start = self.lr / self.warmup
        warming = start + (self.lr - start) * step / self.warmup
        return tf.where(step < self.warmup, warming, decayed)

    def get_config(self) -> dict:
        return {"lr": self.lr, "decay": self.decay, "steps_per_epoch": self.steps_per_epoch,
                "warmup": self.warmup}


def make_schedule(cfg: TrainConfig, lr: float, epochs: int, steps_per_epoch: int,
                  warmup_epochs: float) -> keras.optimizers.schedules.LearningRateSchedule:
    """Returns linear warm-up to lr, then cosine decay to zero, lr held constant, or lr times
    train.lr_decay after every epoch (exponential). With weight averaging (train.swa_start)
    the cosine decays to lr x train.swa_lr by the first averaged epoch, then holds."""
    warmup = int(warmup_epochs * steps_per_epoch)
    if cfg.schedule == "exponential":
        return ExponentialAfterWarmup(lr, cfg.lr_decay, steps_per_epoch, warmup)
    decay = max(epochs * steps_per_epoch - warmup, 1)
    # alpha=1 keeps the rate at its peak: the constant schedule, warm-up included.
    floor = 0.0 if cfg.schedule == "cosine" else 1.0
    if cfg.schedule == "cosine" and cfg.swa_start is not None:
        # CosineDecay holds lr x alpha after decay_steps: the constant averaging phase.
        decay = max(swa_first_epoch(cfg, epochs) * steps_per_epoch - warmup, 1)
        floor = cfg.swa_lr
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(lr, decay, alpha=floor)
    # Warm-up starts one step in (lr / warmup), as the hand-written schedule did, not at zero.
    return keras.optimizers.schedules.CosineDecay(lr / warmup, decay, alpha=floor,
                                                  warmup_target=lr, warmup_steps=warmup)


def make_optimizer(cfg: TrainConfig, lr: float, epochs: int, steps_per_epoch: int,
                   warmup_epochs: float) -> keras.optimizers.Optimizer:
    """Returns the configured optimizer with decoupled weight decay and the lr schedule."""
    schedule = make_schedule(cfg, lr, epochs, steps_per_epoch, warmup_epochs)
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
        jit_compile=cfg.jit_compile,
    )


def ends_in_softmax(model: keras.Model) -> bool:
    """Returns True when the output layer applies softmax (probabilities), False for logits."""
    layer = model.layers[-1]
    while isinstance(layer, keras.Model) or hasattr(layer, "layer"):  # nesting, tfmot wrappers
        layer = layer.layers[-1] if isinstance(layer, keras.Model) else layer.layer
    if isinstance(layer, keras.layers.Softmax):
        return True
    function = getattr(layer, "activation", None) or getattr(layer, "function", None)
    # Quantization-aware training wraps the activation (src/qat.py): the function is inside.
    function = getattr(function, "activation", function)
    return getattr(function, "__name__", "") == "softmax"  # also a tf.nn.softmax op layer


def swa_first_epoch(cfg: TrainConfig, epochs: int) -> int:
    """Returns the epochs trained before weight averaging begins (at least one is averaged)."""
    # The epsilon keeps 0.29 x 100 at 29 epochs (float products round down below it).
    return min(math.floor(cfg.swa_start * epochs + 1e-9), epochs - 1)


class WeightAverage(keras.callbacks.Callback):
    """Stochastic weight averaging (Izmailov et al. 2018): the running mean of the model's
    trainable weights at the end of every epoch after `first_epoch`.

    The mean and its count are variables that an epoch checkpoint saves with the model, so a
    resumed training averages the same epochs as one that never stopped.
    """

    def __init__(self, model: keras.Model, first_epoch: int) -> None:
        super().__init__()
        self.student, self.first_epoch = model, first_epoch
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.means = [tf.Variable(tf.zeros_like(w), trainable=False)
                      for w in model.trainable_weights]
        self.state = tf.train.Checkpoint(count=self.count, means=self.means)

    def reset(self) -> None:
        """Empties the average (a training that starts from its first epoch)."""
        self.count.assign(0)
        for mean in self.means:
            mean.assign(tf.zeros_like(mean))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 <= self.first_epoch:
            return
        count = self.count.assign_add(1)
        for mean, weight in zip(self.means, self.student.trainable_weights):
            mean.assign_add((weight - mean) / tf.cast(count, mean.dtype))

    def apply(self, x_train: np.ndarray, y_train: np.ndarray, num_classes: int,
              cfg: TrainConfig) -> None:
        """Sets the model's weights to the average and re-estimates its BatchNorm statistics
        on the training images (unaugmented): the averaged weights need their own. Nothing
        changes when no epoch was averaged (training stopped before the first)."""
        if not int(self.count):
            return
        for mean, weight in zip(self.means, self.student.trainable_weights):
            weight.assign(mean)
        batches = input_pipeline(x_train, y_train, num_classes, cfg, training=False)
        reestimate_batchnorm(self.student, batches.map(lambda images, labels: images))
        print(f"weight averaging: the model is the mean of the weights after each of its last "
              f"{int(self.count)} epochs, BatchNorm statistics re-estimated on {len(x_train)} "
              "training images", file=sys.stderr, flush=True)


def reestimate_batchnorm(model: keras.Model, batches: tf.data.Dataset) -> None:
    """Replaces every trainable BatchNorm layer's moving statistics by their mean over the
    batches (a frozen one runs in inference mode whatever `training` says: it keeps its own)."""
    norms = [layer for layer in model.submodules
             if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    if not norms:
        return
    kept = [layer.momentum for layer in norms]
    for layer in norms:
        layer.moving_mean.assign(tf.zeros_like(layer.moving_mean))
        layer.moving_variance.assign(tf.ones_like(layer.moving_variance))
    try:
        for seen, images in enumerate(batches):
            for layer in norms:  # the k-th batch weighs 1/k: a plain mean over all batches
                layer.momentum = seen / (seen + 1)
            model(images, training=True)
    finally:
        for layer, momentum in zip(norms, kept):
            layer.momentum = momentum


class RaiseOnNaN(keras.callbacks.Callback):
    """Fails training at the first NaN or infinite loss instead of training on garbage."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at batch {batch}")


def fit(model: keras.Model, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray,
        y_val: np.ndarray, num_classes: int, cfg: TrainConfig, *, epochs: int, lr: float,
        warmup_epochs: float, callbacks: Sequence[keras.callbacks.Callback] = (),
        checkpoint: EpochCheckpoint | None = None, distill: Distillation | None = None) -> dict:
    """Trains the model in place and returns its per-epoch history.

    With a checkpoint, training resumes after the newest valid entry's epoch and saves
    one every few epochs; the history returned then covers all epochs, resumed ones too.
    With distill, the loss mixes the labels with the teacher's softened outputs.
    """
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    steps = math.ceil(len(x_train) / cfg.batch_size)
    trained = Distiller(model, distill) if distill else model
    compile_model(trained, cfg, lr, epochs, steps, warmup_epochs)
    average = WeightAverage(model, swa_first_epoch(cfg, epochs)) \
        if cfg.swa_start is not None else None
    if checkpoint and average:
        checkpoint.track(weight_average=average.state)
    initial_epoch = checkpoint.restore(trained) if checkpoint else 0
    if average and not initial_epoch:  # a discarded entry may have filled part of it
        average.reset()
    if initial_epoch:
        print(f"resuming training after epoch {initial_epoch} of {epochs} from the checkpoint "
              f"in {checkpoint.folder}", file=sys.stderr, flush=True)
    train_data = input_pipeline(x_train, y_train, num_classes, cfg, training=True)
    val_data = input_pipeline(x_val, y_val, num_classes, cfg, training=False) \
        if len(x_val) else None
    # The average, then the checkpoint (saving the average with the epoch it includes), before
    # the others: an epoch that others (live MLflow curves) have seen is saved, so a resume does
    # not train it again.
    extra = [callback for callback in (average, checkpoint) if callback]
    history = trained.fit(train_data, validation_data=val_data, epochs=epochs,
                          initial_epoch=initial_epoch,
                          callbacks=[RaiseOnNaN(), *extra, *callbacks], verbose=cfg.verbose)
    if average:
        average.apply(x_train, y_train, num_classes, cfg)
    if checkpoint:
        return checkpoint.history
    return {k: [float(v) for v in values] for k, values in history.history.items()}


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Returns the model's top-1 accuracy on (x, y)."""
    batches = tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
    probs = model.predict(without_autotune(batches.map(lambda b: tf.cast(b, tf.float32))),
                          verbose=0)
    return float(np.mean(np.argmax(probs, axis=1) == y))
