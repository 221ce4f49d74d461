"""Channel pruning: remove whole output channels and rebuild a physically smaller dense model.

The groups of layers whose channels change together come from src.prune.graph. Each group is
scored per channel, the lowest channels are removed (one threshold over all groups, the same
fraction in each, each group's share from a channel sensitivity run: prune.rates_from, or the
number of channels each group keeps: prune.widths), and the functional model is rebuilt from
its config with the new widths, the surviving weights copied over. Unlike magnitude sparsity,
this shrinks the raw .tflite file and the multiply-accumulates, so it runs faster on any
interpreter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from src.checkpoint import EpochCheckpoint
from src.config import ConfigError, PruneConfig, TrainConfig, widths_text
from src.data import Dataset
from src.distill import Distillation
from src.keras_env import keras, tf
from src.prune import allocate
from src.prune.common import PruneResult
from src.prune.graph import ChannelGraph, ChannelGroup, build_graph
from src.prune.magnitude import prune_magnitude
from src.train import fit

TABLE_NAME = "channels_per_layer.csv"


def filter_norms(kernel: np.ndarray, axis: int, criterion: str) -> np.ndarray:
    """Returns the L1 or L2 norm of each slice of kernel along axis (one per channel)."""
    moved = np.moveaxis(np.abs(kernel.astype(np.float64)), axis, 0).reshape(kernel.shape[axis], -1)
    return moved.sum(axis=1) if criterion == "l1" else np.sqrt((moved ** 2).sum(axis=1))


def group_scores(model: keras.Model, graph: ChannelGraph, group: ChannelGroup, criterion: str,
                 bn_scale: bool) -> np.ndarray:
    """Returns one importance score per channel of the group, summed over its members.

    Members are the group's Conv2D/Dense filters and the DepthwiseConv2D kernels it feeds,
    each times the |gamma| of the BatchNorm reading it (bn_scale). Each member's scores are
    divided by their mean first, so a 1x1 shortcut counts as much as a 3x3 conv.
    """
    total = np.zeros(group.size)
    members = [(name, -1) for name in group.producers] + [(name, 2) for name in group.depthwise]
    for name, axis in members:
        layer = model.get_layer(name)
        kernel = (layer.depthwise_kernel if axis == 2 else layer.kernel).numpy()
        score = filter_norms(kernel, axis % kernel.ndim, criterion)
        bn = graph.bn_after.get(name)
        if bn_scale and bn and model.get_layer(bn).gamma is not None:
            score = score * np.abs(model.get_layer(bn).gamma.numpy())
        mean = score.mean()
        total += score / mean if mean > 0 else score
    return total


def keep_masks(scores: dict[int, np.ndarray], rate: float, scope: str,
               min_channels: int) -> dict[int, np.ndarray]:
    """Returns a boolean keep mask per group removing the lowest-scoring channels.

    global: exactly round(rate * all channels) removed under one threshold over scores divided
    by their group's mean; layer: round(rate * n) in each group. Each group keeps at least
    min(min_channels, n) channels; global raises ConfigError when that makes rate unreachable.
    """
    ranked = {}
    for root, score in scores.items():
        normalised = score / score.mean() if score.mean() > 0 else score.copy()
        order = np.argsort(normalised, kind="stable")  # lowest first; ties by channel index
        protected = min(min_channels, len(score))
        ranked[root] = (normalised, order[: len(score) - protected])
    if scope == "layer":
        return {root: _drop(len(scores[root]),
                            order[: min(round(rate * len(scores[root])), len(order))])
                for root, (_, order) in ranked.items()}
    total = sum(len(score) for score in scores.values())
    n_remove = round(rate * total)
    candidates = [(normalised[c], root, c) for root, (normalised, order) in ranked.items()
                  for c in order]
    if n_remove > len(candidates):
        raise ConfigError(f"prune.min_channels: keeping {min_channels} channels per group leaves "
                          f"{len(candidates)} of {total} removable, fewer than prune.rate {rate}")
    candidates.sort(key=lambda item: (item[0], item[1], item[2]))
    removed: dict[int, list[int]] = {root: [] for root in scores}
    for _, root, channel in candidates[:n_remove]:
        removed[root].append(channel)
    return {root: _drop(len(scores[root]), removed[root]) for root in scores}


def _drop(size: int, channels: Sequence[int]) -> np.ndarray:
    keep = np.ones(size, dtype=bool)
    keep[list(channels)] = False
    return keep


def group_name(group: ChannelGroup) -> str:
    """Returns a group's name: its producer layers joined by '+', in model order."""
    return "+".join(group.producers)


def prunable_groups(graph: ChannelGraph) -> list[ChannelGroup]:
    """Returns the groups channel pruning may cut (not pinned, with a producer), in model
    order, or raises ConfigError when there are none."""
    groups = [g for g in graph.groups().values() if not g.pinned and g.producers]
    if not groups:
        raise ConfigError("prune.method: the model has no channels that channel pruning may "
                          "remove (only the input and output channels)")
    return groups


def choose_channels(model: keras.Model, graph: ChannelGraph, cfg: PruneConfig,
                    ) -> dict[int, np.ndarray]:
    """Returns keep masks for every prunable group of the model, as cfg asks."""
    groups = prunable_groups(graph)
    scores = {g.root: group_scores(model, graph, g, cfg.criterion, cfg.bn_scale) for g in groups}
    if cfg.widths is not None:
        return _keep_widths(groups, scores, [int(w) for w in cfg.widths])
    if cfg.rates_from:
        keep = _keep_from_sensitivity(groups, scores, cfg)
    else:
        keep = keep_masks(scores, cfg.rate, cfg.scope, cfg.min_channels)
    if cfg.channel_multiple == 1:
        return keep
    return {root: round_to_multiple(mask, scores[root], cfg.channel_multiple, cfg.min_channels)
            for root, mask in keep.items()}


def _keep_widths(groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                 widths: list[int]) -> dict[int, np.ndarray]:
    """Returns keep masks of each group's widths[i] highest-scoring channels (prune.widths)."""
    _check_widths(groups, widths)
    return {g.root: _drop(g.size, np.argsort(scores[g.root], kind="stable")[: g.size - width])
            for g, width in zip(groups, widths)}


def check_widths(model: keras.Model, widths: Sequence[int]) -> None:
    """Raises ConfigError naming the model's channel groups when prune.widths does not fit
    them, or cuts to 0 a group the output needs (run before any training: the untrained model
    has the same groups)."""
    model = as_functional(model)
    graph = build_graph(model)
    groups = prunable_groups(graph)
    widths = [int(w) for w in widths]
    _check_widths(groups, widths)
    keep = {g.root: np.arange(g.size) < width for g, width in zip(groups, widths)}
    remove_branches(model.get_config(), graph, keep)


def _check_widths(groups: list[ChannelGroup], widths: list[int]) -> None:
    listing = ", ".join(f"{group_name(g)} ({g.size})" for g in groups)
    if len(widths) != len(groups):
        raise ConfigError(f"prune.widths: {len(widths)} widths for the model's {len(groups)} "
                          f"channel groups, in order: {listing}")
    for group, width in zip(groups, widths):
        if width > group.size:
            raise ConfigError(f"prune.widths: {group_name(group)} has {group.size} channels, "
                              f"cannot keep {width}; the groups: {listing}")


def round_to_multiple(keep: np.ndarray, score: np.ndarray, multiple: int,
                      min_channels: int) -> np.ndarray:
    """Returns a keep mask of the highest-scoring channels whose count is the kept count
    rounded to the nearest multiple (at least one multiple and min_channels, at most all)."""
    size = len(score)
    count = max(multiple * round(int(keep.sum()) / multiple), multiple, min(min_channels, size))
    if count >= size:
        return np.ones(size, dtype=bool)
    return _drop(size, np.argsort(score, kind="stable")[: size - count])


def _keep_from_sensitivity(groups: list[ChannelGroup], scores: dict[int, np.ndarray],
                           cfg: PruneConfig) -> dict[int, np.ndarray]:
    """Returns keep masks removing round(cfg.rate * all channels), each group's share derived
    from the channel sensitivity table of the MLflow run cfg.rates_from."""
    table = allocate.read_table(cfg.rates_from, "channel")
    sizes = np.array([g.size for g in groups])
    removable = np.array([g.size - min(cfg.min_channels, g.size) for g in groups])
    n_remove = round(cfg.rate * sizes.sum())
    if n_remove > removable.sum():
        raise ConfigError(f"prune.min_channels: keeping {cfg.min_channels} channels per group "
                          f"leaves {removable.sum()} of {sizes.sum()} removable, fewer than "
                          f"prune.rate {cfg.rate}")
    rates = allocate.allocate(table, [group_name(g) for g in groups], sizes.tolist(), cfg.rate,
                              caps=(removable / sizes).tolist())
    counts = _apportion(np.array(rates) * sizes, n_remove, removable)
    return {g.root: _drop(g.size, np.argsort(scores[g.root], kind="stable")[:count])
            for g, count in zip(groups, counts)}


def _apportion(shares: np.ndarray, total: int, limits: np.ndarray) -> np.ndarray:
    """Returns whole counts, each at most its limit, summing to total, close to the shares
    (largest remainders first), so the overall rate is exact rather than off by rounding."""
    counts = np.minimum(np.floor(shares + 1e-9).astype(int), limits)
    order = np.argsort(-(shares - counts), kind="stable")
    step = 0
    while counts.sum() < total:  # ends: the caller checked total <= limits.sum()
        group = order[step % len(order)]
        if counts[group] < limits[group]:
            counts[group] += 1
        step += 1
    return counts


def _output_variables(layer: keras.layers.Layer) -> list[tuple[tf.Variable, int]]:
    """Returns (variable, channel axis) of each weight of a layer indexed by its output
    channels."""
    kind = type(layer).__name__
    if kind == "BatchNormalization":  # gamma and beta zero the output; the mean, with no gamma
        found = [(layer.gamma, 0), (layer.beta, 0), (layer.moving_mean, 0)]
    elif kind == "DepthwiseConv2D":
        found = [(layer.depthwise_kernel, 2), (layer.bias, 0)]
    else:
        found = [(layer.kernel, -1), (layer.bias, 0)]
    return [(variable, axis) for variable, axis in found if variable is not None]


@contextlib.contextmanager
def zeroed_channels(model: keras.Model, graph: ChannelGraph,
                    keep: dict[int, np.ndarray]) -> Iterator[keras.Model]:
    """Yields the model computing what rebuild(model, graph, keep) computes, then restores it.

    Instead of rebuilding (slow), the removed channels' outputs are zeroed in every layer
    that makes or scales them (filters and bias, depthwise kernel, BatchNorm gamma and beta):
    consumers then read zeros from them, as if their input rows were gone. Exact for
    activations that map 0 to 0 (the ReLU family), as in every model here, and for groups
    that keep a channel (a group kept at 0 makes rebuild drop the offset its branch adds).
    """
    saved = []
    for layer in model.layers:
        if graph.kinds.get(layer.name) not in ("Conv2D", "Dense", "DepthwiseConv2D",
                                               "BatchNormalization"):
            continue
        gone = ~graph.mask(graph.outputs[layer.name], keep)
        if not gone.any():
            continue
        for variable, axis in _output_variables(layer):
            value = variable.numpy()
            saved.append((variable, value))
            index = [slice(None)] * value.ndim
            index[axis] = gone
            zeroed = value.copy()
            zeroed[tuple(index)] = 0
            variable.assign(zeroed)
    try:
        yield model
    finally:
        for variable, value in saved:
            variable.assign(value)


def as_functional(model: keras.Model) -> keras.Model:
    """Returns a functional model over the same layers (a Sequential one wrapped as a graph)."""
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs)
    return model


def rebuild(model: keras.Model, graph: ChannelGraph, keep: dict[int, np.ndarray]) -> keras.Model:
    """Returns a new functional model with only the kept channels, surviving weights copied.

    A group kept at 0 channels removes its layers and every layer that reads only them, up to
    the Add that joins them to a residual path (see remove_branches)."""
    return _rebuilt(model, graph, keep)[0]


def _rebuilt(model: keras.Model, graph: ChannelGraph, keep: dict[int, np.ndarray],
             ) -> tuple[keras.Model, dict[int, np.ndarray]]:
    """Returns rebuild's model and the keep masks it was cut to (remove_branches': groups
    whose layers all went count as 0)."""
    config, keep = remove_branches(model.get_config(), graph, keep)
    for spec in config["layers"]:
        name = spec["name"]
        if graph.kinds[name] in ("Conv2D", "Dense"):
            width = int(graph.mask(graph.outputs[name], keep).sum())
            spec["config"]["filters" if graph.kinds[name] == "Conv2D" else "units"] = width
    smaller = keras.Model.from_config(config)
    kept = {spec["name"] for spec in config["layers"]}
    for layer in model.layers:
        weights = layer.get_weights()
        if weights and layer.name in kept:
            smaller.get_layer(layer.name).set_weights(
                _sliced(graph, layer.name, weights, keep))
    return smaller, keep


@dataclasses.dataclass
class _Removal:
    """What groups kept at 0 channels take out of a functional config."""

    removed: set[str] = dataclasses.field(default_factory=set)
    replaced: dict[str, list] = dataclasses.field(default_factory=dict)  # -> inbound entry
    inbound: dict[str, list] = dataclasses.field(default_factory=dict)  # kept -> live inputs
    refused: str | None = None  # a layer that cannot drop an input it loses


def remove_branches(config: dict, graph: ChannelGraph, keep: dict[int, np.ndarray],
                    ) -> tuple[dict, dict[int, np.ndarray]]:
    """Returns a copy of the functional config without the layers that groups kept at 0
    channels leave nothing to compute, and the keep masks with every group whose layers all
    went cut to 0 too (a concatenation then drops their channels); or raises ConfigError naming
    the groups when that reaches the output or a merge that cannot lose an input.

    A layer goes when it makes 0 channels or every input it reads has gone. An Add or a
    Concatenate left with one input is replaced by it, and so is a ReLU that would then read
    a ReLU's output (applying it twice changes nothing). The branch's constant (its last
    BatchNorm's offset on a zero input) goes with it, as a removed channel's offset does;
    fine-tuning makes up for it. A residual block's branch, cut to 0, leaves its shortcut: the
    block becomes one layer shallower, and at full resolution that is most of its latency."""
    config = copy.deepcopy(config)
    while True:
        removal = _removal(config, graph, keep)
        if removal.refused or _output_removed(config, removal):
            raise _zero_error(config, graph, keep, removal)
        emptied = {g.root: np.zeros(g.size, dtype=bool) for g in graph.groups().values()
                   if g.producers and _mask(keep, g).any()
                   and all(name in removal.removed for name in g.producers)}
        if not emptied:
            break
        keep = {**keep, **emptied}
    if not removal.removed:
        return config, keep
    config["output_layers"] = [removal.replaced.get(entry[0], entry)[:3]
                               for entry in config["output_layers"]]
    config["layers"] = [spec for spec in config["layers"] if spec["name"] not in removal.removed]
    for spec in config["layers"]:
        if spec["name"] in removal.inbound:
            spec["inbound_nodes"] = [removal.inbound[spec["name"]]]
    return config, keep


def _mask(keep: dict[int, np.ndarray], group: ChannelGroup) -> np.ndarray:
    return keep.get(group.root, np.ones(group.size, dtype=bool))


def _removal(config: dict, graph: ChannelGraph, keep: dict[int, np.ndarray]) -> _Removal:
    """Returns the layers groups kept at 0 take out of config (in model order, so a layer's
    inputs are settled before it), and the inputs each kept layer then reads."""
    found = _Removal()
    specs = {spec["name"]: spec for spec in config["layers"]}
    for spec in config["layers"]:
        name, kind = spec["name"], spec["class_name"]
        nodes = spec.get("inbound_nodes") or []
        if not nodes:
            continue
        entries = [found.replaced.get(entry[0], entry) for entry in nodes[0]]
        live = [entry for entry in entries if entry[0] not in found.removed]
        makes_none = (kind in ("Conv2D", "Dense")
                      and not graph.mask(graph.outputs[name], keep).any())
        if not live or makes_none:
            found.removed.add(name)
        elif len(live) < len(entries) and kind not in ("Add", "Concatenate"):
            found.refused = found.refused or f"'{name}' ({kind})"
            found.inbound[name] = live
        elif len(live) == 1 and len(entries) > 1:
            found.removed.add(name)
            found.replaced[name] = live[0]
        elif (_is_relu(spec) and entries[0][0] != nodes[0][0][0]
              and _is_relu(specs[entries[0][0]])):
            found.removed.add(name)
            found.replaced[name] = entries[0]
        elif live != nodes[0]:  # an input went or was replaced
            found.inbound[name] = live
    return found


def _output_removed(config: dict, removal: _Removal) -> bool:
    return any(entry[0] in removal.removed and entry[0] not in removal.replaced
               for entry in config["output_layers"])


def _zero_error(config: dict, graph: ChannelGraph, keep: dict[int, np.ndarray],
                removal: _Removal) -> ConfigError:
    """Returns the error naming the groups at 0 that, each alone, cause what removal found."""
    zero = [g for g in prunable_groups(graph) if not _mask(keep, g).any()]
    culprits = []
    for group in zero:
        alone = _removal(config, graph, {**{g.root: np.ones(g.size, dtype=bool) for g in zero},
                                         group.root: np.zeros(group.size, dtype=bool)})
        if alone.refused or _output_removed(config, alone):
            culprits.append(group_name(group))
    named = ", ".join(culprits or [group_name(g) for g in zero])
    if removal.refused:
        return ConfigError(f"prune.widths: keeping 0 channels of {named} leaves "
                           f"{removal.refused} without an input it cannot drop; only an Add or "
                           "a Concatenate can lose an input")
    return ConfigError(f"prune.widths: keeping 0 channels of {named} leaves the model's output "
                       "nothing to compute from; 0 removes only a branch that ends in an Add "
                       "with another input")


def _is_relu(spec: dict) -> bool:
    """Whether a layer config is a plain ReLU (max(x, 0), which is idempotent)."""
    config = spec["config"]
    if spec["class_name"] == "Activation":
        return config.get("activation") == "relu"
    return (spec["class_name"] == "ReLU" and config.get("max_value") is None
            and not config.get("negative_slope") and not config.get("threshold"))


def _sliced(graph: ChannelGraph, name: str, weights: list[np.ndarray],
            keep: dict[int, np.ndarray]) -> list[np.ndarray]:
    """Returns a layer's weights cut to the kept input and output channels."""
    kind = graph.kinds[name]
    into = graph.mask(graph.inputs[name], keep)
    if kind in ("Conv2D", "Dense"):
        out = graph.mask(graph.outputs[name], keep)
        kernel = weights[0][..., into, :][..., out]
        return [kernel, *(bias[out] for bias in weights[1:])]
    if kind == "DepthwiseConv2D":
        return [weights[0][:, :, into, :], *(bias[into] for bias in weights[1:])]
    if kind == "BatchNormalization":
        return [w[into] for w in weights]
    raise AssertionError(f"layer {name} ({kind}) has weights but no channel rule")


def channel_table(before: keras.Model, after: keras.Model) -> str:
    """Returns CSV rows (layer, type, channels and params before/after, and the position in
    prune.widths of the group its output channels belong to) for layers with weights."""
    graph = build_graph(as_functional(before))
    position = {g.root: i for i, g in enumerate(prunable_groups(graph), start=1)}
    lines = ["layer,type,channels_before,channels_after,params_before,params_after,widths_group"]
    kept = {layer.name: layer for layer in after.layers}
    for layer in before.layers:
        if not layer.weights:
            continue
        new = kept.get(layer.name)  # None: a group cut to 0 removed it
        channels, params = (new.output.shape[-1], new.count_params()) if new else (0, 0)
        out = graph.outputs.get(layer.name)
        group = position.get(graph.root(out), "") if isinstance(out, int) else ""
        lines.append(f"{layer.name},{type(layer).__name__},{layer.output.shape[-1]},"
                     f"{channels},{layer.count_params()},{params},{group}")
    lines.append(f"total,,,,{before.count_params()},{after.count_params()},")
    return "\n".join(lines) + "\n"


def remove_channels(model: keras.Model, cfg: PruneConfig) -> keras.Model:
    """Returns the physically smaller model with cfg.rate of its prunable channels removed
    (or each group cut to cfg.widths)."""
    return _cut(as_functional(model), cfg)[0]


def _cut(model: keras.Model, cfg: PruneConfig) -> tuple[keras.Model, list[int]]:
    """Returns remove_channels' model and the channels each prunable group of model kept, in
    prune.widths order (0 for a group whose layers went)."""
    graph = build_graph(model)
    smaller, keep = _rebuilt(model, graph, choose_channels(model, graph, cfg))
    return smaller, [int(keep[g.root].sum()) for g in prunable_groups(graph)]


def prune_channel(model: keras.Model, cfg: PruneConfig, data: Dataset, train_cfg: TrainConfig,
                  callbacks: Sequence[keras.callbacks.Callback] = (),
                  distill: Distillation | None = None,
                  checkpoint: EpochCheckpoint | None = None) -> PruneResult:
    """Returns the channel-pruned model, fine-tuned and magnitude-pruned as configured.

    With prune.magnitude_rate > 0, flat magnitude masks are applied right after the channels
    are removed and the same fine-tuning (prune.finetune_epochs) holds them, so the run has
    one fine-tuning phase.
    """
    model = as_functional(model)
    smaller, kept = _cut(model, cfg)
    artifacts = {TABLE_NAME: channel_table(model, smaller)}
    # The widths the cut kept, as prune.widths takes them: a rate's cut, adjusted by hand (a
    # group cut to 0 is gone from the smaller model, so they are counted in this one).
    tags = {"channel_widths": widths_text(kept)}
    if cfg.magnitude_rate > 0:
        flat = dataclasses.replace(cfg, method="flat", rate=cfg.magnitude_rate, widths=None,
                                   rates_from=None)  # those chose the channels, not the weights
        result = prune_magnitude(smaller, flat, data, train_cfg, callbacks, distill,
                                 checkpoint)
        return dataclasses.replace(result, artifacts=artifacts, tags=tags)
    history = {}
    if cfg.finetune_epochs:
        history = fit(smaller, data.x_train, data.y_train, data.x_val, data.y_val,
                      data.num_classes, train_cfg, epochs=cfg.finetune_epochs,
                      lr=cfg.finetune_lr, warmup_epochs=0, callbacks=list(callbacks),
                      distill=distill, checkpoint=checkpoint)
    return PruneResult(smaller, history, {}, artifacts, tags)

