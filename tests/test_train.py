"""Training: the learning-rate schedule, resumable checkpoints and the baseline cache key."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import numpy as np
import pytest

from src import baseline, train
from src.checkpoint import EpochCheckpoint
from src.config import (
    PROJECT_ROOT,
    AugmentConfig,
    ConfigError,
    DistillConfig,
    PruneConfig,
    TrainConfig,
    compose_config,
    result_settings,
    settings_from,
    without_added_defaults,
)
from src.data import load
from src.keras_env import keras
from tests.conftest import TINY, kill_after_epoch_2_and_rerun, runs_of


def test_schedule_warms_up_then_decays_to_zero_or_holds():
    cosine = train.make_schedule(TrainConfig(schedule="cosine"), 0.1, 10, 10, 1)
    constant = train.make_schedule(TrainConfig(schedule="constant"), 0.1, 10, 10, 1)
    assert float(cosine(0)) == pytest.approx(0.01)  # one step into the warm-up, as before
    assert float(cosine(10)) == pytest.approx(0.1)
    assert float(cosine(55)) == pytest.approx(0.05, abs=1e-3)  # half way down the cosine
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    assert float(constant(5)) < 0.1 and float(constant(10)) == pytest.approx(0.1)
    assert float(constant(100)) == pytest.approx(0.1)
    no_warmup = train.make_schedule(TrainConfig(), 0.1, 10, 10, 0)
    assert float(no_warmup(0)) == pytest.approx(0.1)


def test_exponential_schedule_multiplies_the_rate_once_per_epoch_after_the_warm_up():
    cfg = TrainConfig(schedule="exponential", lr_decay=0.5)
    warm = train.make_schedule(cfg, 0.1, 10, 10, 1)  # 10 steps per epoch, one of warm-up
    assert float(warm(0)) == pytest.approx(0.01)  # warms up like the cosine
    assert [float(warm(s)) for s in (10, 19, 20, 35)] == pytest.approx([0.1, 0.1, 0.05, 0.025])
    cold = train.make_schedule(cfg, 0.1, 10, 10, 0)
    assert [float(cold(s)) for s in (0, 9, 10, 20)] == pytest.approx([0.1, 0.1, 0.05, 0.025])


def test_rotation_turns_each_image_about_its_centre():
    images = np.arange(2 * 5 * 5 * 1, dtype=np.float32).reshape(2, 5, 5, 1)
    turned = train.rotate(images, np.array([np.pi / 2, 0.0], np.float32)).numpy()
    assert np.allclose(turned[0, ..., 0], np.rot90(images[0, ..., 0]), atol=1e-3)  # ccw
    assert np.allclose(turned[1], images[1])
    cfg = TrainConfig(batch_size=64, augment=AugmentConfig(crop_padding=0, flip=False,
                                                           rotation=15))
    x = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 3), dtype=np.uint8)
    batch, _ = next(iter(train.input_pipeline(x, np.zeros(64, int), 2, cfg, training=True)))
    image_sums = np.sort(batch.numpy().reshape(64, -1).sum(1))  # the batch comes shuffled
    assert batch.shape == x.shape
    assert not np.allclose(image_sums, np.sort(x.reshape(64, -1).sum(1).astype(float)))
    evaluation, _ = next(iter(train.input_pipeline(x, np.zeros(64, int), 2, cfg, False)))
    assert np.array_equal(evaluation.numpy(), x.astype(np.float32))  # only training rotates


def test_mixup_blends_each_image_and_its_label_with_one_partner_by_the_same_weight():
    x = np.stack([np.full((4, 4, 3), 10 * k, np.uint8) for k in range(8)])  # image k is all 10k
    cfg = TrainConfig(batch_size=8, augment=AugmentConfig(crop_padding=0, flip=False, mixup=0.4))
    images, labels = next(iter(train.input_pipeline(x, np.arange(8), 8, cfg, training=True)))
    images, labels = images.numpy(), labels.numpy()
    assert np.allclose(labels.sum(1), 1) and (np.count_nonzero(labels, axis=1) <= 2).all()
    # Each image stays flat, at the label-weighted mean of its two sources' values.
    assert np.allclose(images, images[:, :1, :1, :1], atol=1e-3)
    assert np.allclose(images[:, 0, 0, 0], labels @ (10.0 * np.arange(8)), atol=1e-3)
    assert not np.allclose(labels, np.round(labels))  # some images were blended
    images, labels = next(iter(train.input_pipeline(x, np.arange(8), 8, cfg, training=False)))
    assert np.array_equal(labels.numpy(), np.eye(8)) and np.array_equal(images.numpy(), x)
    with pytest.raises(ConfigError, match="train.augment.mixup"):
        TrainConfig(augment=AugmentConfig(mixup=-1))


def test_pipelines_run_without_the_autotuning_thread():
    # Its teardown waited up to 60 s between epochs (benchmarks/RESULTS.md, "between epochs").
    x, y = np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64)
    for training in (True, False):
        data = train.input_pipeline(x, y, 10, TrainConfig(batch_size=2), training=training)
        assert data.options().autotune.enabled is False
        assert [b[0].shape[0] for b in data] == [2, 2]
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    predict = model.predict
    model.predict = lambda data, **kw: (seen.append(data.options().autotune.enabled),
                                        predict(data, **kw))[1]
    seen = []
    assert train.evaluate(model, x, y) in (0.0, 1.0) and seen == [False]


def test_mlperf_experiment_is_the_reference_recipe(make_cfg):
    settings = settings_from(make_cfg("experiment=mlperf_resnet8", tiny=False))
    t = settings.train
    assert (settings.model.name, settings.quant.mode) == ("resnet8", "int8")
    assert (t.optimizer, t.lr, t.schedule, t.lr_decay, t.batch_size, t.warmup_epochs) == \
        ("adam", 0.001, "exponential", 0.99, 32, 0.0)
    assert (t.augment.rotation, t.augment.crop_padding, t.augment.flip) == (15.0, 3, True)


def _tiny_fit(cfg: TrainConfig, folder: Path, epochs: int, model=None):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (64, 8, 8, 3), dtype=np.uint8)
    y = rng.integers(0, 2, 64)
    model = model or keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                                       keras.layers.Dense(2, activation="softmax")])
    checkpoint = EpochCheckpoint(folder, cfg.checkpoint_every)
    history = train.fit(model, x, y, x[:0], y[:0], 2, cfg, epochs=epochs, lr=0.01,
                        warmup_epochs=0, checkpoint=checkpoint)
    return model, checkpoint, history


def test_checkpoint_restores_weights_optimizer_and_epoch_exactly(tmp_path):
    cfg = TrainConfig(batch_size=16, verbose=0, augment=AugmentConfig(0, False))
    model, _, history = _tiny_fit(cfg, tmp_path / "ckpt", epochs=2)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch-0002"]
    assert len(history["loss"]) == 2
    fresh = keras.models.clone_model(model)
    train.compile_model(fresh, cfg, 0.01, 2, 4, 0)
    restored = EpochCheckpoint(tmp_path / "ckpt")
    assert restored.restore(fresh) == 2
    assert int(fresh.optimizer.iterations) == 8  # 2 epochs of 4 steps: the schedule's place
    for saved, loaded in zip(model.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())
    for saved, loaded in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(saved, loaded)
    assert restored.history == history


def test_checkpoint_every_n_epochs_keeps_the_last(tmp_path):
    cfg = TrainConfig(batch_size=16, verbose=0, checkpoint_every=2)
    _, checkpoint, history = _tiny_fit(cfg, tmp_path / "ckpt", epochs=3)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch-0003"]  # 2, then the end
    assert len(history["loss"]) == 3 and checkpoint.resumed_from_epoch == 0


class EpochEndWeights(keras.callbacks.Callback):
    """Records the model's trainable weights at the end of every epoch."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_end(self, epoch, logs=None):
        self.seen.append([w.numpy() for w in self.model.trainable_weights])


def test_weight_average_is_the_mean_of_the_averaged_epochs_and_survives_a_resume(tmp_path):
    cfg = TrainConfig(batch_size=16, verbose=0, augment=AugmentConfig(0, False), swa_start=0.5)
    x, y = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 3)).astype(np.uint8), \
        np.arange(64) % 2
    model = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
    seen = EpochEndWeights()
    train.fit(model, x, y, x[:0], y[:0], 2, cfg, epochs=4, lr=0.05, warmup_epochs=0,
              callbacks=[seen], checkpoint=EpochCheckpoint(tmp_path / "ckpt"))
    for index, weight in enumerate(model.trainable_weights):  # epochs 3 and 4 averaged
        expected = np.mean([seen.seen[2][index], seen.seen[3][index]], axis=0)
        np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-5, atol=1e-6)
    # A process that stopped after the last epoch's checkpoint resumes to the same average.
    again = keras.models.clone_model(model)
    train.fit(again, x, y, x[:0], y[:0], 2, cfg, epochs=4, lr=0.05, warmup_epochs=0,
              checkpoint=EpochCheckpoint(tmp_path / "ckpt"))
    for averaged, resumed in zip(model.get_weights(), again.get_weights()):
        np.testing.assert_allclose(resumed, averaged, rtol=1e-5, atol=1e-6)


def test_weight_average_keeps_magnitude_pruned_weights_at_zero():
    from src.prune.magnitude import HoldMasks
    cfg = TrainConfig(batch_size=16, verbose=0, augment=AugmentConfig(0, False), swa_start=0.3)
    x, y = np.random.default_rng(1).integers(0, 255, (64, 8, 8, 3)).astype(np.uint8), \
        np.arange(64) % 2
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    kernel = model.layers[-1].kernel
    mask = (np.arange(kernel.shape[0] * 2).reshape(kernel.shape) % 3 > 0).astype(np.float32)
    kernel.assign(kernel * mask)
    train.fit(model, x, y, x[:0], y[:0], 2, cfg, epochs=3, lr=0.05, warmup_epochs=0,
              callbacks=[HoldMasks([kernel], [mask])])
    assert np.all(kernel.numpy()[mask == 0] == 0) and np.all(kernel.numpy()[mask == 1] != 0)


def test_batchnorm_statistics_are_re_estimated_as_the_mean_over_batches():
    norm, frozen = keras.layers.BatchNormalization(), keras.layers.BatchNormalization()
    inner = keras.Sequential([keras.Input((3,)), frozen])  # nested, and frozen
    frozen.trainable = False
    frozen.moving_mean.assign([1.0, 2.0, 3.0])
    model = keras.Sequential([keras.Input((3,)), norm, inner])
    batches = [np.random.default_rng(i).normal(i, 1 + i, (32, 3)).astype(np.float32)
               for i in range(3)]
    train.reestimate_batchnorm(model, batches)
    np.testing.assert_allclose(norm.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0),
                               rtol=1e-5)
    assert norm.momentum == 0.99  # given back
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), [1.0, 2.0, 3.0])  # left alone


class StopAfter(keras.callbacks.Callback):
    """Stops the process's training after an epoch, as a kill after its checkpoint would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt


def test_a_training_stopped_while_averaging_resumes_with_the_epochs_averaged_so_far(tmp_path):
    cfg = TrainConfig(batch_size=16, verbose=0, augment=AugmentConfig(0, False), swa_start=0.4)
    x, y = np.random.default_rng(2).integers(0, 255, (64, 8, 8, 3)).astype(np.uint8), \
        np.arange(64) % 2
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    first, second = EpochEndWeights(), EpochEndWeights()
    with pytest.raises(KeyboardInterrupt):  # epochs 3 and 4 averaged, then stopped
        train.fit(model, x, y, x[:0], y[:0], 2, cfg, epochs=5, lr=0.05, warmup_epochs=0,
                  callbacks=[first, StopAfter(4)], checkpoint=EpochCheckpoint(tmp_path / "c"))
    resumed = keras.models.clone_model(model)
    train.fit(resumed, x, y, x[:0], y[:0], 2, cfg, epochs=5, lr=0.05, warmup_epochs=0,
              callbacks=[second], checkpoint=EpochCheckpoint(tmp_path / "c"))
    assert len(first.seen) == 4 and len(second.seen) == 1  # only epoch 5 trained again
    for index, weight in enumerate(resumed.trainable_weights):
        expected = np.mean([first.seen[2][index], first.seen[3][index], second.seen[0][index]],
                           axis=0)
        np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_weight_averaging_schedule_decays_to_its_rate_then_holds():
    schedule = train.make_schedule(TrainConfig(swa_start=0.5, swa_lr=0.25), 0.1, 10, 10, 0)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert 0.025 < float(schedule(30)) < 0.1
    assert [float(schedule(step)) for step in (50, 70, 99)] == pytest.approx([0.025] * 3)


def test_runs_and_result_rows_with_averaged_weights_say_so():
    from results.collect import row_name
    from src.report import method_label
    settings = settings_from(compose_config(["prune=flat", "prune.finetune_epochs=2",
                                             "train.swa_start=0.5"]))
    assert method_label(settings) == "flat 0.50 ft2 swa"
    config = {"model": {"name": "resnet8"}, "quant": {"mode": "int8"},
              "prune": {"method": "flat", "rate": 0.7, "finetune_epochs": 2}}
    assert row_name({**config, "train": {"swa_start": 0.5}}) == "resnet8-flat-0.70-ft2-swa-int8"
    assert row_name({**config, "train": {"swa_start": None}}) == row_name(config) == \
        "resnet8-flat-0.70-ft2-int8"
    # Without fine-tuning the run averaged nothing itself (its baseline may have): no label.
    unpruned = {**config, "prune": {"method": "none"}, "train": {"swa_start": 0.5}}
    assert row_name(unpruned) == "resnet8-none-int8"
    assert method_label(settings_from(compose_config(["prune=none", "train.swa_start=0.5"]))) \
        == "dense"


@pytest.mark.parametrize("override, message", [
    ("train.swa_start=1.0", "train.swa_start: must be in (0, 1)"),
    ("train.swa_lr=0", "train.swa_lr: must be in (0, 1]"),
    ("train.swa_start=0.5 prune=tfmot", "train.swa_start: cannot average the weights of a tfmot"),
    ("train.swa_lr=0.3", "train.swa_lr: sets the cosine schedule's rate while weights are "
                         "averaged: it needs train.swa_start"),
    ("train.swa_start=0.5 train.swa_lr=0.3 train.schedule=constant", "train.swa_lr: sets"),
])
def test_bad_weight_averaging_settings_are_refused_by_name(make_cfg, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from(make_cfg(*override.split()))


@pytest.mark.parametrize("damage", ["corrupt", "truncated_state", "partial"])
def test_bad_checkpoint_is_discarded_with_a_warning(tmp_path, capsys, damage):
    cfg = TrainConfig(batch_size=16, verbose=0)
    model, _, _ = _tiny_fit(cfg, tmp_path / "ckpt", epochs=1)
    entry = tmp_path / "ckpt" / "epoch-0001"
    if damage == "corrupt":
        data = next(entry.glob("ckpt.data-*"))
        data.write_bytes(b"\0" * data.stat().st_size)
        named = data.name
    elif damage == "truncated_state":
        state = entry / "state.json"
        state.write_text(state.read_text()[:20])
        named = "state.json"
    else:  # a write the process did not finish: only the temporary folder exists
        partial = tmp_path / "ckpt" / ".partial-abc"
        entry.rename(partial)
        named = ".partial-abc"
    fresh = keras.models.clone_model(model)
    train.compile_model(fresh, cfg, 0.01, 1, 4, 0)
    assert EpochCheckpoint(tmp_path / "ckpt").restore(fresh) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and named in warnings[0] and "discarding" in warnings[0]
    assert list((tmp_path / "ckpt").iterdir()) == []  # not loaded, not kept
    assert int(fresh.optimizer.iterations) == 0


def _key(make_cfg, *overrides: str) -> str:
    settings = settings_from(make_cfg(*overrides))
    dataset = load(settings.data, settings.paths.cache_dir)
    return baseline.baseline_key(dataset, settings.data, settings.model, settings.train)


def test_cache_key_covers_what_shapes_the_weights_only(make_cfg, monkeypatch):
    key = _key(make_cfg)
    assert _key(make_cfg, "data.n_test=32") == key
    assert _key(make_cfg, "++data.limit_test=10") == key
    assert _key(make_cfg, "train.verbose=2", "++train.checkpoint_every=3") == key
    assert _key(make_cfg, "train.lr=0.05") != key  # the recipe
    assert _key(make_cfg, "++data.limit_train=100") != key  # the training data
    assert _key(make_cfg, "model.filters=[4,8,16]") != key  # the architecture
    assert _key(make_cfg, "train.augment.rotation=15") != key  # a setting added later, used
    monkeypatch.setattr(baseline, "RECIPE_VERSION", baseline.RECIPE_VERSION + 1)
    assert _key(make_cfg) != key  # training code that learns differently


def test_settings_added_later_leave_earlier_keys_as_they_were():
    # Baselines cached, studies started and results recorded before train.lr_decay and
    # train.augment.rotation existed must still match while those are at their neutral value.
    recipe = baseline._recipe(TrainConfig())
    assert not {"lr_decay", "swa_start", "swa_lr"} & set(recipe)
    assert not {"rotation", "mixup"} & set(recipe["augment"])
    assert baseline._recipe(TrainConfig(augment=AugmentConfig(rotation=15, mixup=0.2)))[
        "augment"] == {**recipe["augment"], "rotation": 15, "mixup": 0.2}
    flat = {"train.lr_decay": 0.99, "train.augment.rotation": 0.0, "train.augment.mixup": 0.0,
            "train.swa_start": None, "train.swa_lr": 0.5, "quant.strip_names": False,
            "quant.qat_epochs": 0, "quant.qat_lr": 0.002, "train.lr": 0.1}
    assert without_added_defaults(flat) == {"train.lr": 0.1}
    assert without_added_defaults({**flat, "train.lr_decay": 0.9})["train.lr_decay"] == 0.9
    # prune.widths likewise: fine-tunings checkpointed before it resume under the same key.
    dense, train, distill = "k", TrainConfig(), DistillConfig()
    before = {"version": baseline.CACHE_VERSION, "recipe_version": baseline.RECIPE_VERSION,
              "baseline": dense, "prune": {k: v for k, v in asdict(PruneConfig()).items()
                                           if k != "widths"},
              "distill": asdict(distill), "train": baseline._recipe(train)}
    assert baseline.finetune_key(dense, PruneConfig(), train, distill) == baseline.content_key(
        before)
    # The keys as de39550 (before prune.widths) computed them, pinned.
    assert baseline.finetune_key(dense, PruneConfig(), train, distill) == "e7b06d3b4d341ccb"
    assert baseline.finetune_key(dense, PruneConfig(method="channel", rate=0.3), train,
                                 distill) == "a4f460f9ba5ffdc9"
    assert baseline.finetune_key(dense, PruneConfig(method="channel", widths=[4]), train,
                                 distill) != baseline.finetune_key(
                                     dense, PruneConfig(method="channel"), train, distill)


def test_settings_widths_replaces_do_not_tell_runs_apart():
    # With prune.widths set, rate, scope, min_channels and channel_multiple change nothing:
    # one fine-tuning checkpoint, one results row, one study's settings. At their defaults
    # the key is the one widths runs had before they were left out.
    dense, train, distill = "k", TrainConfig(), DistillConfig()
    cut = PruneConfig(method="channel", widths=[8, 8])
    other = PruneConfig(method="channel", widths=[8, 8], rate=0.3, scope="layer",
                        min_channels=2, channel_multiple=8)
    key = baseline.finetune_key(dense, cut, train, distill)
    assert baseline.finetune_key(dense, other, train, distill) == key == "e21f382c25ddf1dc"
    assert key == baseline.content_key({
        "version": baseline.CACHE_VERSION, "recipe_version": baseline.RECIPE_VERSION,
        "baseline": dense, "prune": asdict(cut), "distill": asdict(distill),
        "train": baseline._recipe(train)})
    assert baseline.finetune_key(dense, replace(other, widths=None), train, distill) != \
        baseline.finetune_key(dense, replace(cut, widths=None), train, distill)
    flat = {f"prune.{k}": v for k, v in asdict(other).items()}
    assert result_settings(flat) == result_settings({f"prune.{k}": v
                                                     for k, v in asdict(cut).items()})
    assert result_settings({**flat, "prune.widths": None})["prune.rate"] == 0.3
    assert result_settings({**flat, "prune.widths": "None"})["prune.rate"] == 0.3  # a param


def test_cache_key_ignores_source_text(make_cfg, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(PROJECT_ROOT / "src", copy / "src")
    shutil.copytree(PROJECT_ROOT / "conf", copy / "conf")
    source = (copy / "src" / "train.py").read_text()
    edited = source.replace('"""Training:', '"""Edited. Training:', 1)
    assert edited != source
    (copy / "src" / "train.py").write_text(edited)
    script = ("import sys; from tests_key import key; print(key(sys.argv[1:]))")
    (copy / "tests_key.py").write_text(
        "from src.baseline import baseline_key\nfrom src.config import compose_config, "
        "settings_from\nfrom src.data import load\n\n\ndef key(overrides):\n"
        "    s = settings_from(compose_config(overrides))\n"
        "    d = load(s.data, s.paths.cache_dir)\n"
        "    return baseline_key(d, s.data, s.model, s.train)\n")
    overrides = [f"paths.root={tmp_path}", *TINY["data"], *TINY["model"], *TINY["train"]]
    key = subprocess.run([sys.executable, "-c", script, *overrides], cwd=copy, text=True,
                            capture_output=True, check=True).stdout.split()[-1]
    assert key == _key(make_cfg)


@pytest.mark.fresh_baseline
def test_smaller_test_split_reuses_the_baseline_and_reevaluates(make_cfg):
    settings = settings_from(make_cfg())
    full = load(settings.data, settings.paths.cache_dir)
    key = baseline.baseline_key(full, settings.data, settings.model, settings.train)
    trained = baseline.load_or_train(key, settings.paths.cache_dir, full, settings.model,
                                     settings.train)
    small_settings = settings_from(make_cfg("++data.limit_test=16"))
    small = load(small_settings.data, small_settings.paths.cache_dir)
    reused = baseline.load_or_train(key, settings.paths.cache_dir, small, settings.model,
                                    settings.train)
    assert not trained.reused and reused.reused
    assert reused.test_accuracy == pytest.approx(train.evaluate(reused.model, small.x_test,
                                                                small.y_test))
    assert not baseline.checkpoint_dir(settings.paths.cache_dir, key).exists()  # removed


def test_killed_baseline_training_resumes_at_epoch_3(tmp_path):
    overrides = [f"paths.root={tmp_path}", "data=synthetic", "data.n_train=600",
                 "data.n_test=64", "data.num_classes=4", *TINY["model"], "train.epochs=4",
                 "train.batch_size=32", "train.verbose=2"]
    baselines = Path(settings_from(compose_config(overrides)).paths.cache_dir) / "baselines"
    output = kill_after_epoch_2_and_rerun(overrides, baselines)
    epochs = [line.split()[1] for line in output.splitlines() if line.startswith("Epoch ")]
    assert epochs[:2] == ["3/4", "4/4"]  # baseline epochs trained after the resume
    assert "resuming training after epoch 2 of 4" in output
    assert not list(baselines.glob("*.ckpt"))  # removed once the baseline is stored
    meta = json.loads(next(baselines.glob("*/meta.json")).read_text())
    assert len(meta["history"]["loss"]) == 4 and meta["resumed_from_epoch"] == 2
    finished = [r for r in runs_of(compose_config(overrides)) if r.info.status == "FINISHED"]
    assert [r.data.tags["resumed_from_epoch"] for r in finished] == ["2"]  # the run says so
    curve = mlflow.MlflowClient().get_metric_history(finished[0].info.run_id, "baseline_loss")
    assert len(curve) == 4  # the whole baseline history, resumed epochs included
