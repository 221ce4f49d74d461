"""Channel pruning: the right widths, every dependency rewired, smaller files, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from results.collect import row_name
from src.config import (
    ConfigError,
    ModelConfig,
    PruneConfig,
    QuantConfig,
    compose_config,
    settings_from,
)
from src.experiment import run
from src.keras_env import keras
from src.models import build
from src.prune.channel import (
    check_widths,
    choose_channels,
    group_name,
    group_scores,
    keep_masks,
    prunable_groups,
    rebuild,
    remove_channels,
    zeroed_channels,
)
from src.prune.graph import build_graph
from src.quantize import to_tflite
from src.report import method_label
from tests.conftest import runs_of, tflite_operators

layers = keras.layers

TINY_MODELS = {
    "resnet8": ModelConfig(name="resnet8", filters=[4, 8, 8]),
    "mobilenetv2_cifar": ModelConfig(name="mobilenetv2_cifar", alpha=0.35),
    "mobilenetv2": ModelConfig(name="mobilenetv2", alpha=0.35, input_size=32),
}
CHANNELED = ("Conv2D", "DepthwiseConv2D", "BatchNormalization", "Dense")


def channel_config(**changes) -> PruneConfig:
    return PruneConfig(**{"method": "channel", "rate": 0.5, "min_channels": 1, **changes})


def randomise_batchnorms(model: keras.Model, seed: int = 0) -> None:
    """Gives every BatchNorm non-trivial gamma, beta and moving statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n),
                               rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n)])


def randomise_biases_and_batchnorms(model: keras.Model) -> None:
    """Gives every bias non-zero values (so a wrongly kept bias would show) and every BatchNorm
    non-trivial statistics."""
    for layer in model.layers:
        if type(layer).__name__ in ("Conv2D", "Dense") and layer.use_bias:
            layer.bias.assign(np.random.default_rng(1).normal(0, 0.1, layer.bias.shape))
    randomise_batchnorms(model)


def widths(model: keras.Model) -> dict[str, int]:
    return {layer.name: layer.output.shape[-1] for layer in model.layers
            if type(layer).__name__ in CHANNELED}


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_layer_scope_gives_the_expected_width_of_every_layer(name):
    model = build(TINY_MODELS[name], 10)
    rate, min_channels = 0.5, 4
    smaller = remove_channels(model, channel_config(scope="layer", rate=rate,
                                                    min_channels=min_channels))
    expected = {}
    for layer, n in widths(model).items():
        # Every group loses the same fraction; the head keeps its classes.
        expected[layer] = n if layer == "predictions" else n - min(round(rate * n),
                                                                   max(n - min_channels, 0))
    assert widths(smaller) == expected
    assert smaller.output.shape[-1] == 10 and smaller.input.shape == model.input.shape


def test_global_scope_removes_exactly_the_rate_and_the_weakest_channels():
    model = build(TINY_MODELS["resnet8"], 10)
    graph = build_graph(model)
    # stage3_a is its own group: make its channels 0..7 ever stronger, and channel 5 the weakest.
    kernel = model.get_layer("stage3_a_conv").kernel
    strength = np.arange(1, 9, dtype=np.float32)
    strength[5] = 1e-3
    kernel.assign(np.ones(kernel.shape, np.float32) * strength)
    keep = choose_channels(model, graph, channel_config(rate=0.5))
    groups = {g.root: g for g in graph.groups().values()}
    total = sum(groups[root].size for root in keep)
    assert sum(int((~mask).sum()) for mask in keep.values()) == round(0.5 * total)
    (stage3_a,) = [mask for root, mask in keep.items() if groups[root].producers == [
        "stage3_a_conv"]]
    assert not stage3_a[5] and stage3_a[7]
    assert all(mask.sum() >= 1 for mask in keep.values())


def test_channel_multiple_keeps_whole_simd_blocks_of_the_strongest_channels():
    model = build(ModelConfig(name="resnet8"), 10)  # 16, 32, 64 filters
    graph = build_graph(model)
    keep = choose_channels(model, graph, channel_config(rate=0.45, min_channels=4))
    rounded = choose_channels(model, graph, channel_config(rate=0.45, min_channels=4,
                                                           channel_multiple=8))
    groups = {g.root: g for g in graph.groups().values()}
    for root, mask in rounded.items():
        kept = int(mask.sum())
        assert kept % 8 == 0 and abs(kept - keep[root].sum()) <= 4
        score = group_scores(model, graph, groups[root], "l1", True)
        assert score[mask].min() >= score[~mask].max() if (~mask).any() else kept == len(mask)
    assert all(n % 8 == 0 for layer, n in widths(rebuild(model, graph, rounded)).items()
               if layer != "predictions")


def test_widths_keep_each_groups_strongest_channels_and_name_the_run():
    model = build(ModelConfig(name="resnet8"), 10)  # groups of 16, 16, 32, 32, 64, 64
    graph = build_graph(model)
    asked = [8, 4, 16, 24, 56, 40]
    cfg = channel_config(widths=asked, rate=0.9, channel_multiple=8)  # widths win over both
    keep = choose_channels(model, graph, cfg)
    groups = prunable_groups(graph)
    assert [int(keep[g.root].sum()) for g in groups] == asked
    for group in groups:
        mask, score = keep[group.root], group_scores(model, graph, group, "l1", True)
        assert score[mask].min() >= score[~mask].max()
    smaller = remove_channels(model, cfg)
    assert widths(smaller)["stage3_a_conv"] == 56 and widths(smaller)["stage3_shortcut"] == 40
    settings = settings_from(compose_config(["prune=channel", "prune.widths=[8,4,16,24,56,40]"]))
    assert method_label(settings) == "channel 8-4-16-24-56-40 ft2"
    assert row_name({"model": {"name": "resnet8"}, "quant": {"mode": "int8"},
                     "prune": {"method": "channel", "rate": 0.5, "widths": asked}}) == \
        "resnet8-channel-w8-4-16-24-56-40-int8"


@pytest.mark.parametrize("asked, message", [
    ([8, 8, 16], r"3 widths for the model's 6 channel groups, in order: stem_conv\+stage1_b_conv "
                 r"\(16\), stage1_a_conv \(16\)"),
    ([8, 8, 16, 16, 65, 48], r"stage3_a_conv has 64 channels, cannot keep 65")])
def test_widths_that_do_not_fit_the_groups_are_refused_listing_them(asked, message):
    model = build(ModelConfig(name="resnet8"), 10)
    with pytest.raises(ConfigError, match=r"prune.widths: " + message):
        remove_channels(model, channel_config(widths=asked))


def test_groups_tie_residual_adds_and_pin_the_head():
    graph = build_graph(build(TINY_MODELS["resnet8"], 10))
    groups = {tuple(sorted(g.producers)): g for g in graph.groups().values() if g.producers}
    assert ("stage2_b_conv", "stage2_shortcut") in groups  # the shortcut is cut with the add
    assert ("stage1_b_conv", "stem_conv") in groups  # identity shortcut: stem joins stage 1
    assert groups[("predictions",)].pinned


@pytest.mark.parametrize("override, key", [
    ("prune.criterion=l3", "prune.criterion"), ("prune.scope=net", "prune.scope"),
    ("prune.min_channels=0", "prune.min_channels"), ("prune.rate=1.0", "prune.rate"),
    ("prune.magnitude_rate=1.0", "prune.magnitude_rate"),
    ("prune.channel_multiple=0", "prune.channel_multiple"),
    ("prune.widths=[8,-1]", "prune.widths"),
    ("prune.widths=[]", "prune.widths"),
    ("prune.widths=[8,8] prune.rates_from=abc", "prune.widths"),
    ("prune.method=flat prune.widths=[8,8]", "prune.widths")])
def test_bad_channel_settings_are_refused_by_key(make_cfg, override, key):
    with pytest.raises(ConfigError, match=key):
        settings_from(make_cfg("prune=channel", *override.split()))


def test_min_channels_that_make_the_rate_unreachable_is_refused():
    model = build(TINY_MODELS["resnet8"], 10)
    with pytest.raises(ConfigError, match="prune.min_channels"):
        remove_channels(model, channel_config(rate=0.9, min_channels=4))


def zero_removed_channels(model: keras.Model, graph, keep) -> None:
    """Zeros, in the original model, every channel the rebuild will remove.

    Each layer is zeroed by its own output channels (filter and bias, BatchNorm gamma and
    beta, depthwise kernel), so the outputs only match if the rebuild drops the very same
    input rows in every consumer.
    """
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in CHANNELED:
            continue
        gone = ~graph.mask(graph.outputs[layer.name], keep)
        weights = layer.get_weights()
        if kind == "BatchNormalization":
            gamma, beta, mean, var = weights
            gamma[gone], beta[gone], mean[gone], var[gone] = 0, 0, 0, 1  # output exactly 0
            weights = [gamma, beta, mean, var]
        elif kind == "DepthwiseConv2D":
            weights[0][:, :, gone, :] = 0
        else:
            weights[0][..., gone] = 0
        for bias in weights[1:] if kind != "BatchNormalization" else []:
            bias[gone] = 0
        layer.set_weights(weights)


def concat_flatten_model() -> keras.Model:
    """A model with a concatenation, a BatchNorm and depthwise conv on it, and Flatten -> Dense."""
    inputs = keras.Input((8, 8, 3))
    a = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(6, 3, padding="same")(inputs)))
    b = layers.BatchNormalization()(layers.Conv2D(4, 1)(inputs))
    x = layers.Concatenate()([a, b])
    x = layers.BatchNormalization()(layers.DepthwiseConv2D(3, padding="same")(x))
    x = layers.MaxPooling2D()(layers.Conv2D(5, 3, padding="same")(x))
    x = layers.Dense(7, activation="relu")(layers.Flatten()(x))
    return keras.Model(inputs, layers.Dense(3)(layers.Dropout(0.1)(x)))


@pytest.mark.parametrize("name", [*TINY_MODELS, "concat_flatten"])
def test_rebuild_equals_the_original_with_removed_channels_zeroed(name):
    model = concat_flatten_model() if name == "concat_flatten" else build(TINY_MODELS[name], 10)
    randomise_biases_and_batchnorms(model)
    graph = build_graph(model)
    keep = choose_channels(model, graph, channel_config(rate=0.5))
    zero_removed_channels(model, graph, keep)
    smaller = rebuild(model, graph, keep)
    assert smaller.count_params() < model.count_params()
    size = model.input.shape[1]
    x = np.random.default_rng(2).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    np.testing.assert_allclose(smaller(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-6)


def concat_branch_model() -> keras.Model:
    """A two-conv branch into a Concatenate: cutting its first conv to 0 takes the second."""
    inputs = keras.Input((8, 8, 3))
    side = layers.Conv2D(5, 3, padding="same", name="side")(inputs)
    side = layers.ReLU()(layers.BatchNormalization()(side))
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(3, 1, name="branch_a")(inputs)))
    x = layers.Conv2D(4, 3, padding="same", name="branch_b")(x)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.Concatenate(name="joined")([side, x])
    x = layers.ReLU()(layers.BatchNormalization()(layers.Conv2D(6, 3, name="after")(x)))
    return keras.Model(inputs, layers.Dense(3)(layers.GlobalAveragePooling2D()(x)))


ZERO_CUTS = {  # model: (prune.widths, or the groups cut to 0 with the rest whole; what goes)
    "resnet8": ([2, 0, 4, 6, 0, 6], ["stage1_a_conv", "stage1_b_bn", "stage1_add",
                                     "stage1_out", "stage3_a_relu", "stage3_b_conv",
                                     "stage3_add"]),
    "concat_flatten": ([0, 2, 3, 4], ["conv2d", "batch_normalization", "re_lu", "concatenate"]),
    "concat_branch": ({"branch_a"}, ["branch_a", "branch_b", "joined"]),
    "mobilenetv2_cifar": ({"block2_expand"}, ["block2_expand", "block2_depthwise",
                                              "block2_project_bn", "block2_add"]),
}


@pytest.mark.parametrize("name", list(ZERO_CUTS))
def test_a_branch_cut_to_zero_channels_is_removed_and_the_rest_computes_the_same(name):
    keras.backend.clear_session()  # the default layer names the cases list
    builders = {"concat_flatten": concat_flatten_model, "concat_branch": concat_branch_model}
    model = builders[name]() if name in builders else build(TINY_MODELS[name], 10)
    randomise_biases_and_batchnorms(model)
    graph = build_graph(model)
    groups = prunable_groups(graph)
    asked, gone = ZERO_CUTS[name]
    if isinstance(asked, set):
        asked = [0 if group_name(g) in asked else g.size for g in groups]
    keep = choose_channels(model, graph, channel_config(widths=asked))
    zero_removed_channels(model, graph, keep)
    smaller = rebuild(model, graph, keep)
    kept = {layer.name for layer in smaller.layers}
    assert not kept & set(gone)
    # A removed layer whose channels a group still keeps (the last conv of a branch) reads only
    # zeros and adds its bias and BatchNorm offset; the rebuild drops them, so zero them here.
    for layer in model.layers:
        if layer.name not in kept and type(layer).__name__ == "BatchNormalization":
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([gamma, 0 * beta, 0 * mean, var])
        elif layer.name not in kept and getattr(layer, "use_bias", False):
            layer.bias.assign(np.zeros(layer.bias.shape))
    size = model.input.shape[1]
    x = np.random.default_rng(2).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    np.testing.assert_allclose(smaller(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-6)
    if name == "resnet8":  # the shortcut is left: two convolutions fewer per branch
        calibration = x[:2]
        quant = QuantConfig(mode="int8", representative_samples=2)
        convs = [tflite_operators(to_tflite(m, quant, calibration)).count("CONV_2D")
                 for m in (model, smaller)]
        assert convs[0] - convs[1] == 4


@pytest.mark.parametrize("name", ["resnet8", "concat_flatten"])
def test_zeroing_one_group_computes_what_its_rebuild_computes_and_is_undone(name):
    # The sensitivity command prunes one group at a time this way, without rebuilding.
    model = concat_flatten_model() if name == "concat_flatten" else build(TINY_MODELS[name], 10)
    randomise_batchnorms(model)
    graph = build_graph(model)
    size = model.input.shape[1]
    x = np.random.default_rng(2).uniform(0, 255, (4, size, size, 3)).astype(np.float32)
    dense = model(x).numpy()
    for group in prunable_groups(graph):
        score = group_scores(model, graph, group, "l1", True)
        keep = keep_masks({group.root: score}, 0.5, "layer", 1)
        smaller = rebuild(model, graph, keep)
        with zeroed_channels(model, graph, keep) as zeroed:
            np.testing.assert_allclose(zeroed(x).numpy(), smaller(x).numpy(), rtol=1e-4,
                                       atol=1e-6, err_msg=group_name(group))
            assert not np.allclose(zeroed(x).numpy(), dense)
        np.testing.assert_array_equal(model(x).numpy(), dense)


def removed_weights(before: keras.Model, after: keras.Model) -> int:
    """Returns the kernel and bias values a TFLite export loses (BatchNorm folds into biases)."""
    def stored(model):
        total = 0
        for layer in model.layers:
            kind = type(layer).__name__
            if kind in ("Conv2D", "Dense", "DepthwiseConv2D"):
                total += layer.weights[0].shape.num_elements() + layer.output.shape[-1]
        return total
    return stored(before) - stored(after)


@pytest.mark.parametrize("mode, bytes_per_weight", [("none", 4), ("float16", 2), ("int8", 1)])
def test_exported_tflite_shrinks_by_the_removed_weights(mode, bytes_per_weight):
    model = build(ModelConfig(name="resnet8", filters=[16, 32, 64]), 10)
    smaller = remove_channels(model, channel_config(rate=0.5, min_channels=4))
    calibration = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
    quant = QuantConfig(mode=mode, representative_samples=8)
    dense, pruned = to_tflite(model, quant, calibration), to_tflite(smaller, quant, calibration)
    saved = len(dense) - len(pruned)
    removed = removed_weights(model, smaller)
    assert len(pruned) < len(dense)
    # int8 keeps biases in int32 and per-channel scales, so it saves a little more per weight.
    assert removed * bytes_per_weight * 0.95 < saved < removed * bytes_per_weight * 1.3


def test_sequential_and_saved_models_are_pruned_too(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(8, 3),
                              layers.BatchNormalization(), layers.ReLU(),
                              layers.GlobalAveragePooling2D(), layers.Dense(2)])
    model.save(tmp_path / "model.h5")
    for candidate in (model, keras.models.load_model(tmp_path / "model.h5")):
        smaller = remove_channels(candidate, channel_config(rate=0.5))
        assert [layer.output.shape[-1] for layer in smaller.layers[1:]] == [4, 4, 4, 4, 2]


def test_a_zero_width_branch_into_a_multiply_is_refused_by_name():
    inputs = keras.Input((8, 8, 3))
    hidden = layers.Conv2D(3, 1, name="hidden")(inputs)  # the group cut to 0
    gate = layers.Conv2D(4, 1, activation="sigmoid", name="gate")(hidden)
    x = layers.Multiply(name="gated")([layers.Conv2D(4, 3, padding="same")(inputs), gate])
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    assert [group_name(g) for g in prunable_groups(build_graph(model))][0] == "hidden"
    message = (r"^prune.widths: keeping 0 channels of hidden leaves 'gated' \(Multiply\) "
               r"without an input it cannot drop; only an Add or a Concatenate can lose an input$")
    with pytest.raises(ConfigError, match=message):
        check_widths(model, [0, 4])  # what a run calls before any training
    with pytest.raises(ConfigError, match=message):
        remove_channels(model, channel_config(widths=[0, 4]))


@pytest.mark.parametrize("bad", ["lambda", "separable", "grouped", "nested"])
def test_unsupported_layers_are_refused_by_name(bad):
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, name="conv")(inputs)
    if bad == "lambda":
        x = layers.Lambda(lambda t: t * 2, name="double")(x)
    elif bad == "separable":
        x = layers.SeparableConv2D(8, 3, name="sep")(x)
    elif bad == "grouped":
        x = layers.Conv2D(8, 3, groups=2, name="grouped")(x)
    else:
        inner = keras.Sequential([layers.Conv2D(8, 1)], name="inner")
        x = inner(x)
    model = keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))
    expected = {"lambda": "'double' (Lambda)", "separable": "'sep' (SeparableConv2D)",
                "grouped": "'grouped' (Conv2D with groups=2)", "nested": "'inner' (Sequential)"}
    with pytest.raises(ConfigError, match=r"prune.method: channel pruning cannot handle layer "
                                          + expected[bad].replace("(", r"\(").replace(")", r"\)")):
        remove_channels(model, channel_config())


def test_channel_run_is_smaller_and_logs_its_table(make_cfg):
    dense = run(make_cfg("prune=none", "model.filters=[8,16,16]"))
    cfg = make_cfg("prune=channel", "prune.rate=0.5", "prune.finetune_epochs=1",
                   "model.filters=[8,16,16]", "prune.min_channels=2")
    pruned = run(cfg)
    tracked = runs_of(cfg)[0]
    assert tracked.info.status == "FINISHED"
    assert pruned["params"] < dense["params"] and pruned["macs"] < dense["macs"]
    assert pruned["tflite_bytes"] < dense["tflite_bytes"]
    assert tracked.data.metrics["macs"] == pruned["macs"]
    assert "finetune_val_accuracy" in tracked.data.metrics
    files = tracked.info.artifact_uri.removeprefix("file://")
    table = open(f"{files}/channels_per_layer.csv").read().splitlines()
    assert table[0] == ("layer,type,channels_before,channels_after,params_before,params_after,"
                        "widths_group")
    rows = {line.split(",")[0]: line.split(",") for line in table[1:]}
    assert int(rows["stage3_a_conv"][3]) < int(rows["stage3_a_conv"][2])
    assert rows["predictions"][2] == rows["predictions"][3]
    assert int(rows["total"][5]) == pruned["params"]
    # Each group's position in prune.widths, on its convs, BatchNorms and adds' layers alike;
    # the run's tag gives the widths kept, ready for prune.widths.
    assert [rows[n][6] for n in ("stem_conv", "stem_bn", "stage1_b_conv", "stage1_a_conv",
                                 "stage3_a_conv", "stage3_shortcut", "predictions")] == \
        ["1", "1", "1", "2", "5", "6", ""]
    kept = [next(int(r[3]) for r in rows.values() if r[6] == str(i)) for i in range(1, 7)]
    assert tracked.data.tags["channel_widths"] == "-".join(map(str, kept))
    # The run's Keras file is the smaller model, and it can be cut again (model=file) to
    # given widths; widths that do not fit the file's groups are refused before a run opens.
    again = ["model=file", f"model.path={files}/model.h5", "prune=channel",
             "prune.finetune_epochs=1"]
    with pytest.raises(ConfigError, match=r"prune.widths: 1 widths for the model's 6 channel"):
        run(make_cfg(*again, "prune.widths=[1]"))
    assert len(runs_of(cfg)) == 2
    assert run(make_cfg(*again, "prune.widths=[2,2,2,2,2,2]"))["params"] < pruned["params"]
    assert runs_of(cfg)[0].data.tags["channel_widths"] == "2-2-2-2-2-2"
    assert run(make_cfg(*again, "prune.rate=0.3", "prune.min_channels=2"))["params"] < \
        pruned["params"]  # or by a rate again, in rounds


@pytest.mark.parametrize("channels", ["prune.rate=0.5", "prune.widths=[2,0,4,4,4,4]"])
def test_channel_then_magnitude_in_one_run(make_cfg, channels):
    cfg = make_cfg("prune=channel", channels, "prune.min_channels=2",
                   "prune.magnitude_rate=0.6", "prune.finetune_epochs=1")  # filters 4, 8, 8
    metrics = run(cfg)
    assert abs(metrics["sparsity_global"] - 0.6) < 0.01  # the flat masks held while fine-tuning
    assert "channels_per_layer.csv" in {a.path for a in _artifacts(cfg)}
    if "widths" in channels:
        assert runs_of(cfg)[0].data.tags["channel_widths"] == "2-0-4-4-4-4"  # stage 1's
        # branch is gone from the model, so the widths are the cut's, ready for prune.widths


@pytest.mark.parametrize("widths, message", [
    ("[1]", r"1 widths for the model's 6 channel groups, in order: stem_conv\+stage1_b_conv "
            r"\(4\)"),
    ("[4,0,8,0,8,8]", r"keeping 0 channels of stage2_b_conv\+stage2_shortcut leaves the "
                      r"model's output nothing to compute from")])  # stage1_a_conv's 0 is fine
def test_widths_that_do_not_fit_fail_before_training_and_record_nothing(make_cfg, widths,
                                                                        message):
    cfg = make_cfg("prune=channel", f"prune.widths={widths}", "train.epochs=50")
    with pytest.raises(ConfigError, match=r"^prune.widths: " + message):
        run(cfg)
    assert runs_of(cfg) == []  # refused before a run opened, let alone a 50-epoch baseline


def _artifacts(cfg):
    import mlflow

    tracked = runs_of(cfg)[0]
    return mlflow.MlflowClient(cfg.tracking.uri).list_artifacts(tracked.info.run_id)
