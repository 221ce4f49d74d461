"""Channel dependency graph of a functional Keras model, for structured (channel) pruning.

After VainF/Torch-Pruning's dependency graph: every tensor's last axis is described by a
*layout* over channel *spaces*. A Conv2D or Dense opens a new space (its output channels);
BatchNormalization, DepthwiseConv2D and element-wise layers pass their input's layout on;
Add-like merges unite the spaces of their inputs into one group (the group keeps or loses a
channel everywhere at once); Concatenate lays spaces side by side; Flatten repeats the layout
once per spatial position. The model's inputs and outputs pin their spaces (never pruned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from src.config import ConfigError
from src.keras_env import keras


@dataclass(frozen=True)
class Concat:
    """Channels of several layouts side by side (Concatenate on the channel axis)."""

    parts: tuple[Layout, ...]


@dataclass(frozen=True)
class Tile:
    """A layout repeated once per spatial position (Flatten of a channels-last tensor)."""

    part: Layout
    times: int


Layout = int | Concat | Tile  # an int is a channel space

# Layers whose output has exactly their input's channels, element for element.
PASS_THROUGH = frozenset({
    "Activation", "ReLU", "LeakyReLU", "ELU", "ThresholdedReLU", "Dropout", "SpatialDropout2D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization",
    "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
    "ZeroPadding2D", "Cropping2D", "UpSampling2D", "Rescaling",
})
MERGES = frozenset({"Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum"})
PRODUCERS = frozenset({"Conv2D", "Dense"})  # their output channels are what pruning removes
FOLLOWERS = frozenset({"BatchNormalization", "DepthwiseConv2D"})  # per-channel weights
SUPPORTED = PASS_THROUGH | MERGES | PRODUCERS | FOLLOWERS | {"InputLayer", "Concatenate",
                                                             "Flatten"}


@dataclass
class ChannelGroup:
    """Spaces that must keep the same channels, and the layers whose weights follow them."""

    root: int
    size: int
    producers: list[str] = field(default_factory=list)  # Conv2D/Dense making these channels
    depthwise: list[str] = field(default_factory=list)  # DepthwiseConv2D fed by the group
    pinned: bool = False


@dataclass
class ChannelGraph:
    """Channel layouts of every layer's input and output, and the groups of spaces."""

    inputs: dict[str, Layout] = field(default_factory=dict)
    outputs: dict[str, Layout] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    bn_after: dict[str, str] = field(default_factory=dict)  # layer -> BN reading its output
    sizes: list[int] = field(default_factory=list)  # channels per space
    parent: list[int] = field(default_factory=list)  # union-find over spaces
    pinned: set[int] = field(default_factory=set)

    def root(self, space: int) -> int:
        """Returns the representative space of space's group."""
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def groups(self) -> dict[int, ChannelGroup]:
        """Returns every group of spaces by root, with its producers and depthwise layers."""
        found = {}
        for space in range(len(self.sizes)):
            root = self.root(space)
            group = found.setdefault(root, ChannelGroup(root, self.sizes[root]))
            group.pinned = group.pinned or space in self.pinned
        for name, kind in self.kinds.items():
            if kind in PRODUCERS:
                found[self.root(self.outputs[name])].producers.append(name)
            elif kind == "DepthwiseConv2D" and isinstance(self.inputs[name], int):
                found[self.root(self.inputs[name])].depthwise.append(name)
        return found

    def mask(self, layout: Layout, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Returns the boolean mask of the channels a layout keeps, given keep masks by root."""
        if isinstance(layout, Concat):
            return np.concatenate([self.mask(part, keep) for part in layout.parts])
        if isinstance(layout, Tile):
            return np.tile(self.mask(layout.part, keep), layout.times)
        root = self.root(layout)
        return keep.get(root, np.ones(self.sizes[root], dtype=bool))

    def _new_space(self, size: int) -> int:
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        return len(self.sizes) - 1

    def _pin(self, layout: Layout) -> None:
        for space in _spaces(layout):
            self.pinned.add(space)


def _spaces(layout: Layout) -> list[int]:
    if isinstance(layout, Concat):
        return [s for part in layout.parts for s in _spaces(part)]
    if isinstance(layout, Tile):
        return _spaces(layout.part)
    return [layout]


def refuse(name: str, what: str) -> ConfigError:
    """Returns the error naming a layer that channel pruning cannot handle."""
    return ConfigError(f"prune.method: channel pruning cannot handle layer '{name}' ({what})")


def build_graph(model: keras.Model) -> ChannelGraph:
    """Returns the channel graph of a functional model, or raises ConfigError naming a layer."""
    config = model.get_config()
    if "input_layers" not in config:
        raise ConfigError("prune.method: channel pruning needs a functional model, "
                          f"not {type(model).__name__}")
    graph = ChannelGraph()
    for spec in config["layers"]:
        name, kind = spec["name"], spec["class_name"]
        if kind not in SUPPORTED:
            raise refuse(name, kind)
        sources = _inbound(spec)
        for source in sources:
            if source not in graph.outputs:
                raise refuse(name, f"{kind} whose input '{source}' comes later in the config")
        layer = model.get_layer(name)
        graph.kinds[name] = kind
        ins = [graph.outputs[s] for s in sources]
        if ins:
            graph.inputs[name] = ins[0]
        graph.outputs[name] = _output_layout(graph, layer, kind, spec["config"], ins)
        if kind == "BatchNormalization" and len(sources) == 1:
            graph.bn_after.setdefault(sources[0], name)
    for output in config["output_layers"]:
        graph._pin(graph.outputs[output[0]])
    return graph


def _inbound(spec: dict) -> list[str]:
    """Returns the names of the layers feeding this layer's one call."""
    nodes = spec.get("inbound_nodes", [])
    if len(nodes) > 1:
        raise refuse(spec["name"], f"{spec['class_name']} called more than once (shared)")
    if not nodes:
        return []
    node = nodes[0]
    if not isinstance(node, list) or not all(isinstance(t, list) and t and not t[-1]
                                             for t in node):
        raise refuse(spec["name"], f"{spec['class_name']} called with extra arguments")
    return [t[0] for t in node]


def _output_layout(graph: ChannelGraph, layer, kind: str, config: dict,
                   ins: list[Layout]) -> Layout:
    name = layer.name
    if kind == "InputLayer":
        space = graph._new_space(int(layer.output.shape[-1]))
        graph.pinned.add(space)
        return space
    if kind == "Conv2D":
        if config.get("groups", 1) != 1:
            raise refuse(name, f"Conv2D with groups={config['groups']}")
        _check_channels_last(name, kind, config)
        return graph._new_space(int(config["filters"]))
    if kind == "Dense":
        return graph._new_space(int(config["units"]))
    if kind == "DepthwiseConv2D":
        if config.get("depth_multiplier", 1) != 1:
            multiplier = config["depth_multiplier"]
            raise refuse(name, f"DepthwiseConv2D with depth_multiplier={multiplier}")
        _check_channels_last(name, kind, config)
        return ins[0]
    if kind == "BatchNormalization":
        axis = config["axis"]
        axes = axis if isinstance(axis, list) else [axis]
        rank = len(layer.input.shape)
        if [a % rank for a in axes] != [rank - 1]:
            raise refuse(name, f"BatchNormalization over axis {axis}")
        return ins[0]
    if kind == "Rescaling" and (np.ndim(config["scale"]) or np.ndim(config["offset"])):
        graph._pin(ins[0])  # a per-channel scale would need slicing too; keep those channels
    if kind in PASS_THROUGH:
        _check_channels_last(name, kind, config)
        return ins[0]
    if kind in MERGES:
        return _merge(graph, ins)
    if kind == "Concatenate":
        rank = len(layer.output.shape)
        if config["axis"] % rank != rank - 1:
            raise refuse(name, f"Concatenate on axis {config['axis']}")
        return Concat(tuple(ins))
    # Flatten: channels-last order puts position p's channel c at p * channels + c.
    _check_channels_last(name, kind, config)
    positions = math.prod(int(d) for d in layer.input.shape[1:-1])
    return Tile(ins[0], positions) if positions > 1 else ins[0]


def _merge(graph: ChannelGraph, ins: list[Layout]) -> Layout:
    """Returns the layout of an element-wise merge, uniting its inputs' spaces."""
    if all(isinstance(layout, int) for layout in ins):
        first = graph.root(ins[0])
        for other in ins[1:]:
            graph.parent[graph.root(other)] = first
        return first
    # Merging concatenations or flattened tensors: keep every channel involved.
    for layout in ins:
        graph._pin(layout)
    return ins[0]


def _check_channels_last(name: str, kind: str, config: dict) -> None:
    if config.get("data_format") == "channels_first":
        raise refuse(name, f"{kind} with data_format=channels_first")
