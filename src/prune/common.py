"""What every pruning method shares: the kernels it may prune and the result it returns."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from src.keras_env import keras, tf

# The prunable layer classes and the attribute holding each one's kernel.
KERNEL_ATTRIBUTE = {"Conv2D": "kernel", "Dense": "kernel", "DepthwiseConv2D": "depthwise_kernel"}


@dataclass
class PruneResult:
    """The pruned model, its fine-tuning history, the schedule in steps (tfmot), files and
    tags to log.

    artifacts maps a file name to its text (e.g. channel pruning's per-layer table).
    """

    model: keras.Model
    history: dict = field(default_factory=dict)
    schedule_steps: dict = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def kernel_layers(model: keras.Model,
                  prefix: str = "") -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yields (name, layer) of each layer with a kernel, nested models' too ("outer/inner")."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):  # e.g. a backbone inside Sequential([backbone, head])
            yield from kernel_layers(layer, f"{prefix}{layer.name}/")
        elif type(layer).__name__ in KERNEL_ATTRIBUTE:
            yield f"{prefix}{layer.name}", layer


def prunable_kernels(
    model: keras.Model, layer_types: Sequence[str]
) -> list[tuple[str, tf.Variable]]:
    """Returns (layer name, kernel variable) of every layer whose class is in layer_types."""
    return [(name, getattr(layer, KERNEL_ATTRIBUTE[type(layer).__name__]))
            for name, layer in kernel_layers(model)
            if type(layer).__name__ in layer_types]
