"""Pruning reaches exactly the sparsity asked for, and keeps it through fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest

from src import data, models
from src.config import ConfigError, settings_from
from src.measure import global_sparsity, layer_sparsity
from src.prune import flat_masks, layer_masks, prune, tfmot_schedule_steps


def random_weights(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=s).astype(np.float32) * scale
            for s, scale in [((3, 3, 3, 8), 1.0), ((1, 1, 8, 16), 0.1), ((16, 10), 3.0)]]


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.33, 0.5, 0.7, 0.9, 0.99])
def test_flat_masks_zero_exactly_the_rate(rate):
    weights = random_weights()
    masks = flat_masks(weights, rate)
    total = sum(w.size for w in weights)
    assert sum(int((m == 0).sum()) for m in masks) == round(rate * total)
    kept = np.concatenate([np.abs(w[m == 1]) for w, m in zip(weights, masks)])
    dropped = np.concatenate([np.abs(w[m == 0]) for w, m in zip(weights, masks)])
    if len(dropped) and len(kept):
        assert dropped.max() <= kept.min()  # one global threshold


def test_flat_min_density_keeps_every_layer_alive():
    weights = random_weights()
    plain = flat_masks(weights, 0.9)
    assert plain[1].mean() < 0.02  # the small-valued layer nearly vanishes without the floor
    guarded = flat_masks(weights, 0.9, min_density=0.05)
    assert all(m.mean() >= 0.05 for m in guarded)
    assert sum(int((m == 0).sum()) for m in guarded) == round(0.9 * sum(w.size for w in weights))


def test_flat_min_density_too_high_for_rate():
    with pytest.raises(ConfigError, match="prune.min_density"):
        flat_masks(random_weights(), 0.9, min_density=0.5)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_layer_masks_apply_the_rate_in_every_layer(rate):
    for w, m in zip(random_weights(), layer_masks(random_weights(), rate)):
        assert int((m == 0).sum()) == round(rate * w.size)


def test_tfmot_schedule_is_aligned_to_reach_final_step():
    from src.config import PruneConfig

    cfg = PruneConfig(method="tfmot", final_sparsity=0.8, begin=0.1, end=0.8, frequency=7,
                      finetune_epochs=1, layer_types=["Conv2D", "Dense"])
    steps = tfmot_schedule_steps(cfg, 100)
    assert steps["begin_step"] == 10
    assert (steps["end_step"] - steps["begin_step"]) % steps["frequency"] == 0
    assert steps["end_step"] <= 80


def test_tfmot_refuses_a_schedule_without_steps():
    from src.config import PruneConfig

    cfg = PruneConfig(method="tfmot", final_sparsity=0.8, finetune_epochs=1,
                      layer_types=["Conv2D", "Dense"])
    with pytest.raises(ConfigError, match="^prune.finetune_epochs: tfmot needs at least 2"):
        tfmot_schedule_steps(cfg, 1)


def pruned_model(make_cfg, *overrides):
    settings = settings_from(make_cfg(*overrides))
    ds = data.load(settings.data, settings.paths.cache_dir)
    model = models.build(settings.model, ds.num_classes)
    result = prune(model, settings.prune, ds, settings.train)
    return settings, result


@pytest.mark.parametrize("method", ["flat", "layer"])
@pytest.mark.parametrize("rate", [0.3, 0.7, 0.9])
def test_model_sparsity_is_exact(make_cfg, method, rate):
    settings, result = pruned_model(make_cfg, f"prune={method}", f"prune.rate={rate}")
    rows = layer_sparsity(result.model, settings.prune.layer_types)
    assert abs(global_sparsity(rows) - rate) < 0.005
    if method == "layer":
        for row in rows:
            assert abs(row.sparsity - rate) <= 0.5 / row.weights + 1e-9


def test_finetuning_holds_the_masks(make_cfg):
    settings, result = pruned_model(make_cfg, "prune=flat", "prune.rate=0.6",
                                    "prune.finetune_epochs=2")
    assert len(result.history["loss"]) == 2
    assert abs(global_sparsity(layer_sparsity(result.model, settings.prune.layer_types))
               - 0.6) < 0.005


@pytest.mark.parametrize("schedule,model", [
    ("polynomial_decay", ["model=mobilenetv2_cifar", "model.alpha=0.25", "model.input_size=16"]),
    ("constant", []),
])
def test_tfmot_reaches_final_sparsity_and_leaves_depthwise_dense(make_cfg, schedule, model):
    settings, result = pruned_model(
        make_cfg, "prune=tfmot", f"prune.schedule={schedule}", "prune.final_sparsity=0.8",
        "prune.frequency=2", "prune.finetune_epochs=2", *model)
    rows = layer_sparsity(result.model, settings.prune.layer_types)
    for row in rows:
        if row.kind == "DepthwiseConv2D":
            assert row.sparsity < 0.05 and not row.prunable
        else:
            assert abs(row.sparsity - 0.8) <= 1 / row.weights + 1e-9, row  # one weight of rounding
    assert abs(global_sparsity(rows) - 0.8) < 0.01
    assert not any("prune_low_magnitude" in layer.name for layer in result.model.layers)


def test_tfmot_2_by_4_structure(make_cfg):
    _, result = pruned_model(make_cfg, "prune=tfmot", "prune.structured_2_4=true",
                             "prune.finetune_epochs=1")
    kernel = result.model.get_layer("stage2_b_conv").kernel.numpy()
    # tfmot groups 4 consecutive input channels: at most 2 of every 4 are non-zero.
    groups = np.moveaxis(kernel, 2, -1).reshape(-1, 4)
    assert (np.count_nonzero(groups, axis=1) <= 2).all()
