"""Knowledge distillation while fine-tuning: the loss, the teacher choices, what is logged."""

from __future__ import annotations

import numpy as np
import pytest

from src.config import ConfigError
from src.distill import log_softmax_input, soft_loss
from src.keras_env import keras, tf
from src.run import run
from tests.conftest import runs_of

FINETUNE = ["prune.finetune_epochs=1", "distill=kd", "distill.alpha=0.5",
            "distill.temperature=2.0"]


def test_soft_loss_is_zero_for_equal_outputs_and_positive_otherwise():
    logits = tf.constant([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    probs = tf.nn.softmax(logits)
    np.testing.assert_allclose(  # log(p) is the logits up to a constant per example
        tf.nn.softmax(log_softmax_input(tf.identity(probs)) / 3), tf.nn.softmax(logits / 3),
        rtol=1e-5)
    assert float(soft_loss(probs, probs, 4.0)) == pytest.approx(0.0, abs=1e-6)
    other = tf.nn.softmax(tf.reverse(logits, axis=[1]))
    assert float(soft_loss(probs, other, 4.0)) > 0.01


def _finetune_history(run_id: str) -> dict[str, int]:
    import mlflow

    client = mlflow.MlflowClient()
    return {name: len(client.get_metric_history(run_id, f"finetune_{name}"))
            for name in ("loss", "soft_loss", "accuracy")}


def test_distillation_from_the_runs_own_baseline(make_cfg):
    cfg = make_cfg("prune=flat", "prune.rate=0.5", *FINETUNE)
    metrics = run(cfg)
    assert metrics["teacher_test_accuracy"] == metrics["baseline_test_accuracy"]
    assert metrics["sparsity_global"] == pytest.approx(0.5, abs=0.01)  # masks held
    (logged,) = runs_of(cfg)
    assert logged.data.params["distill.alpha"] == "0.5"
    assert logged.data.params["distill.temperature"] == "2.0"
    assert logged.data.params["distill.teacher"] == "None"
    assert logged.data.metrics["teacher_test_accuracy"] == metrics["teacher_test_accuracy"]
    assert _finetune_history(logged.info.run_id) == {"loss": 1, "soft_loss": 1, "accuracy": 1}


def test_distillation_from_another_cached_baseline_with_tfmot(make_cfg):
    bigger = make_cfg("model.filters=[8,8,8]")
    teacher_metrics = run(bigger)
    teacher_key = runs_of(bigger)[0].data.tags["baseline_key"]
    cfg = make_cfg("prune=tfmot", "prune.final_sparsity=0.5", "prune.frequency=1", *FINETUNE,
                   f"distill.teacher={teacher_key}")
    metrics = run(cfg)
    # The same test split: the teacher's accuracy is the other baseline's.
    assert metrics["teacher_test_accuracy"] == pytest.approx(teacher_metrics["test_accuracy"])
    assert metrics["sparsity_global"] == pytest.approx(0.5, abs=0.02)  # tfmot's wrappers worked
    newest = runs_of(cfg)[0]
    assert newest.data.params["distill.teacher"] == teacher_key
    assert newest.data.tags["baseline_key"] != teacher_key
    assert newest.data.metrics["teacher_test_accuracy"] == metrics["teacher_test_accuracy"]


def test_teacher_from_a_model_file(make_cfg, tmp_path):
    teacher = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                                keras.layers.Dense(4, activation="softmax")])
    teacher.save(tmp_path / "teacher.h5")
    metrics = run(make_cfg("prune=layer", "prune.rate=0.3", *FINETUNE,
                           f"distill.teacher={tmp_path / 'teacher.h5'}"))
    assert 0 <= metrics["teacher_test_accuracy"] <= 1


def test_unknown_teacher_is_refused_naming_the_key(make_cfg):
    with pytest.raises(ConfigError, match="distill.teacher: 'nope'"):
        run(make_cfg("prune=flat", "prune.rate=0.5", *FINETUNE, "distill.teacher=nope"))
