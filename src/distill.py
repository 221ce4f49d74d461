"""Knowledge distillation: fine-tune a student on the labels and a teacher's softened outputs.

The loss is ``(1 - alpha) * CE(labels, student) + alpha * T^2 * KL(teacher_T || student_T)``
where ``_T`` is the softmax at temperature T (Hinton et al. 2015; T^2 keeps the soft
gradients' scale independent of T).  The teacher runs on the very batch the student sees,
augmentation included, inside the training step.  Several teachers teach as one: the
softmax of their mean log-probabilities (their normalised geometric mean).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from src.config import ConfigError, DistillConfig
from src.keras_env import keras, tf


@dataclass
class Distillation:
    """A frozen teacher, how much its soft targets weigh and at which temperature."""

    teacher: keras.Model
    alpha: float
    temperature: float
    test_accuracy: float
    source: str


def teacher_for(cfg: DistillConfig, dense: keras.Model, dense_accuracy: float,
                cache_dir: str | Path, x_test: np.ndarray, y_test: np.ndarray,
                trust_code: bool = False, custom_objects: str | None = None,
                ) -> Distillation | None:
    """Returns the configured teacher (a copy of dense by default, an Ensemble for several),
    or None when alpha is 0.

    A teacher file passes model.path's safety checks, with the run's model.trust_code and
    model.custom_objects. Call it before pruning: dense is pruned in place afterwards.
    """
    if cfg.alpha == 0:
        return None
    if cfg.teacher is None:
        teacher = keras.models.clone_model(dense)
        teacher.set_weights(dense.get_weights())
        accuracy, source = dense_accuracy, "baseline"
    else:
        members = [_load_teacher(spec, cache_dir, trust_code, custom_objects)
                   for spec in cfg.teachers]
        for member in members:
            _check_fits(member, dense)
        teacher = members[0] if len(members) == 1 else Ensemble(members)
        source = " + ".join(cfg.teachers)
        from src.train import evaluate  # train imports this module for the Distiller

        accuracy = evaluate(teacher, x_test, y_test)
    teacher.trainable = False
    return Distillation(teacher, cfg.alpha, cfg.temperature, accuracy, source)


def check_teacher(cfg: DistillConfig, cache_dir: str | Path) -> None:
    """Raises ConfigError when distill.teacher names no model file and no cached baseline;
    warns when it is set but distill.alpha is 0 (it is not used then)."""
    if cfg.alpha == 0:
        if cfg.teachers:
            print("warning: distill.teacher is set but distill.alpha is 0: the fine-tuning is "
                  "not distilled (distill=kd distills, alpha 0.7)", file=sys.stderr, flush=True)
        return
    for spec in cfg.teachers:
        cached = Path(cache_dir) / "baselines" / spec / "meta.json"
        if not Path(spec).expanduser().is_file() and not cached.is_file():
            raise ConfigError(f"distill.teacher: {spec!r} is neither a model file nor a "
                              f"cached baseline key under {Path(cache_dir) / 'baselines'}")


class Ensemble(keras.Model):
    """Several classifiers as one: the softmax of their mean log-probabilities."""

    def __init__(self, members: list[keras.Model]):
        super().__init__(name="ensemble")
        self.members = members

    def call(self, inputs, training=None):
        log_probs = [tf.nn.log_softmax(log_softmax_input(member(inputs, training=training)))
                     for member in self.members]
        return tf.nn.softmax(tf.add_n(log_probs) / len(log_probs))


def _load_teacher(spec: str, cache_dir: str | Path, trust_code: bool,
                  custom_objects: str | None) -> keras.Model:
    """Returns the teacher named by a model file path or a cached baseline key."""
    # baseline -> train -> distill, and model_file -> baseline: import when used
    from src.baseline import load_cached
    from src.model_file import ModelFileError, load_model_file

    path = Path(spec).expanduser()
    if path.is_file():  # a legacy .h5 can carry a Lambda's bytecode, which loading runs
        try:
            return load_model_file(path, trust_code, custom_objects)
        except ModelFileError as error:
            raise ConfigError(f"distill.teacher: {str(error).removeprefix('model.path: ')}"
                              ) from None

    found = load_cached(spec, cache_dir)
    if found is None:
        raise ConfigError(f"distill.teacher: {spec!r} is neither a model file nor a cached "
                          f"baseline key under {Path(cache_dir) / 'baselines'}")
    return found.model


def _check_fits(teacher: keras.Model, student: keras.Model) -> None:
    _check = teacher.input_shape[1:] == student.input_shape[1:] and \
        teacher.output_shape[-1] == student.output_shape[-1]
    if not _check:
        raise ConfigError(f"distill.teacher: takes {teacher.input_shape[1:]} and gives "
                          f"{teacher.output_shape[-1]} classes; the student takes "
                          f"{student.input_shape[1:]} and gives {student.output_shape[-1]}")


def log_softmax_input(outputs: tf.Tensor) -> tf.Tensor:
    """Returns logits for a softmax head's outputs: its cached logits, else log(p).

    log(p) equals the logits up to a per-example constant, which softmax ignores.
    """
    logits = getattr(outputs, "_keras_logits", None)
    if logits is not None:
        return logits
    op = getattr(outputs, "op", None)  # eager tensors have none
    if op is not None and op.type == "Softmax":
        return op.inputs[0]
    return tf.math.log(tf.clip_by_value(outputs, 1e-30, 1.0))


def soft_loss(teacher_outputs: tf.Tensor, student_outputs: tf.Tensor,
              temperature: float) -> tf.Tensor:
    """Returns T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    teacher_log = tf.nn.log_softmax(log_softmax_input(teacher_outputs) / temperature)
    student_log = tf.nn.log_softmax(log_softmax_input(student_outputs) / temperature)
    kl = tf.reduce_sum(tf.exp(teacher_log) * (teacher_log - student_log), axis=-1)
    return temperature ** 2 * tf.reduce_mean(kl)


class Distiller(keras.Model):
    """Trains the student with the distillation loss; evaluates and predicts as the student.

    Compile it like the student (loss = the hard-label loss, metrics on the student).
    The student's own variables are the ones trained, so masks held by callbacks and
    tfmot's pruning wrappers inside the student keep working.
    """

    def __init__(self, student: keras.Model, distill: Distillation):
        super().__init__(name="distiller")
        self.student, self.teacher = student, distill.teacher
        self.alpha, self.temperature = distill.alpha, distill.temperature
        # "loss" stays the hard-label loss, comparable with runs without distillation.
        self.soft_loss_tracker = keras.metrics.Mean(name="soft_loss")

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def train_step(self, data):
        x, y = data
        teacher_outputs = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            student_outputs = self.student(x, training=True)
            hard = self.compiled_loss(y, student_outputs, regularization_losses=self.student.losses)
            soft = soft_loss(teacher_outputs, student_outputs, self.temperature)
            loss = (1 - self.alpha) * hard + self.alpha * soft
        self.optimizer.minimize(loss, self.student.trainable_variables, tape=tape)
        self.soft_loss_tracker.update_state(soft)
        return self.compute_metrics(x, y, student_outputs, None)

    def test_step(self, data):
        """Evaluates the student, val_soft_loss included (Keras' own step would report the
        soft-loss tracker it never updates: 0)."""
        x, y = data
        student_outputs = self.student(x, training=False)
        self.compiled_loss(y, student_outputs, regularization_losses=self.student.losses)
        self.soft_loss_tracker.update_state(soft_loss(self.teacher(x, training=False),
                                                      student_outputs, self.temperature))
        return self.compute_metrics(x, y, student_outputs, None)
