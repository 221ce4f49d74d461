"""Knowledge distillation while fine-tuning: the loss, the teacher choices, what is logged."""

from __future__ import annotations

import numpy as np
import pytest

from src import baseline, train
from src.config import ConfigError, DistillConfig, settings_from
from src.data import load
from src.distill import Ensemble, check_teacher, log_softmax_input, soft_loss, teacher_for
from src.experiment import run
from src.keras_env import keras, tf
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
    # measured on the validation split too, not Keras' never-updated tracker (0.0)
    assert logged.data.metrics["finetune_val_soft_loss"] > 0


def test_distillation_from_another_cached_baseline_with_tfmot(make_cfg):
    bigger = settings_from(make_cfg("model.filters=[8,8,8]"))
    dataset = load(bigger.data, bigger.paths.cache_dir)
    teacher_key = baseline.baseline_key(dataset, bigger.data, bigger.model, bigger.train)
    teacher = baseline.load_or_train(teacher_key, bigger.paths.cache_dir, dataset, bigger.model,
                                     bigger.train)
    cfg = make_cfg("prune=tfmot", "prune.final_sparsity=0.5", "prune.frequency=1", *FINETUNE,
                   f"distill.teacher={teacher_key}")
    metrics = run(cfg)
    # The same test split: the teacher's accuracy is the other baseline's.
    assert metrics["teacher_test_accuracy"] == pytest.approx(teacher.test_accuracy)
    assert metrics["sparsity_global"] == pytest.approx(0.5, abs=0.02)  # tfmot's wrappers worked
    newest = runs_of(cfg)[0]
    assert newest.data.params["distill.teacher"] == teacher_key
    assert newest.data.tags["baseline_key"] != teacher_key
    assert newest.data.metrics["teacher_test_accuracy"] == metrics["teacher_test_accuracy"]


def _flat_model(classes: int) -> keras.Model:
    return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                             keras.layers.Dense(classes, activation="softmax")])


def test_teacher_set_without_distillation_is_not_used_and_says_so(tmp_path, capsys):
    x, y = np.zeros((8, 32, 32, 3), np.uint8), np.zeros(8, np.int64)
    cfg = DistillConfig(alpha=0.0, teacher="t.h5")  # no such file: not looked for either
    check_teacher(cfg, tmp_path)  # as the run starts, before any baseline
    assert "warning: distill.teacher is set but distill.alpha is 0" in capsys.readouterr().err
    assert teacher_for(cfg, _flat_model(4), 0.0, tmp_path, x, y) is None


def test_teacher_from_a_model_file_is_frozen_and_evaluated(tmp_path):
    _flat_model(4).save(tmp_path / "teacher.h5")
    x = np.zeros((8, 32, 32, 3), np.uint8)
    y = np.zeros(8, np.int64)
    cfg = DistillConfig(alpha=0.5, teacher=str(tmp_path / "teacher.h5"))
    found = teacher_for(cfg, _flat_model(4), 0.0, tmp_path, x, y)
    assert found.source == cfg.teacher and not found.teacher.trainable_weights
    assert found.test_accuracy == pytest.approx(train.evaluate(found.teacher, x, y))
    assert teacher_for(DistillConfig(alpha=0.0), _flat_model(4), 0.0, tmp_path, x, y) is None
    with pytest.raises(ConfigError, match="distill.teacher: .* gives 4 classes"):
        teacher_for(cfg, _flat_model(3), 0.0, tmp_path, x, y)


def test_unknown_teacher_is_refused_naming_the_key(make_cfg):
    with pytest.raises(ConfigError, match="distill.teacher: 'nope'"):
        run(make_cfg("prune=flat", "prune.rate=0.5", *FINETUNE, "distill.teacher=nope"))


def test_several_teachers_teach_as_their_geometric_mean(tmp_path):
    members = [_flat_model(4), _flat_model(4)]
    for number, member in enumerate(members):
        member.save(tmp_path / f"teacher{number}.h5")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, (16, 32, 32, 3)).astype(np.uint8)  # dim: no saturated softmax
    y = rng.integers(0, 4, 16)
    files = [str(tmp_path / "teacher0.h5"), str(tmp_path / "teacher1.h5")]
    found = teacher_for(DistillConfig(alpha=0.5, teacher=files), _flat_model(4), 0.0, tmp_path,
                        x, y)
    assert isinstance(found.teacher, Ensemble) and found.source == " + ".join(files)
    assert not found.teacher.trainable_weights
    images = tf.cast(x, tf.float32)
    mean_log = sum(np.log(member(images).numpy()) for member in members) / 2
    expected = tf.nn.softmax(mean_log).numpy()
    np.testing.assert_allclose(found.teacher(images), expected, rtol=1e-4, atol=1e-6)
    # in a compiled training step the soft loss reads the ensemble's logits (the mean of
    # log-probabilities, not normalised), not log(p)
    logits = tf.function(lambda images: log_softmax_input(found.teacher(images)))(images)
    np.testing.assert_allclose(logits, mean_log, rtol=1e-4, atol=1e-4)
    assert found.test_accuracy == pytest.approx(np.mean(expected.argmax(1) == y))
    with pytest.raises(ConfigError, match="distill.teacher: .* gives 3 classes"):
        _flat_model(3).save(tmp_path / "three.h5")
        teacher_for(DistillConfig(alpha=0.5, teacher=[files[0], str(tmp_path / "three.h5")]),
                    _flat_model(4), 0.0, tmp_path, x, y)


def test_a_listed_single_teacher_is_the_same_setting_as_its_name():
    assert DistillConfig(teacher=["a.h5"]).teacher == DistillConfig(teacher="a.h5").teacher
    assert DistillConfig(teacher=1234).teacher == "1234"  # an all-digit cache key


def test_a_teacher_list_is_checked_member_by_member(make_cfg, tmp_path):
    _flat_model(4).save(tmp_path / "teacher.h5")
    settings = settings_from(make_cfg(*FINETUNE, f"distill.teacher=[{tmp_path}/teacher.h5,x]"))
    assert settings.distill.teacher == [f"{tmp_path}/teacher.h5", "x"]
    with pytest.raises(ConfigError, match="distill.teacher: 'x' is neither"):
        run(make_cfg("prune=flat", "prune.rate=0.5", *FINETUNE,
                     f"distill.teacher=[{tmp_path}/teacher.h5,x]"))
    for wrong in ("[]", "{a:1}"):
        with pytest.raises(ConfigError, match="distill.teacher: must be a cache key or model"):
            settings_from(make_cfg(*FINETUNE, f"distill.teacher={wrong}"))
