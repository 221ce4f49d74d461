"""What every pruning method shares: the kernels it may prune and the result it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from src.keras_env import keras, tf

# The prunable layer classes and the attribute holding each one's kernel.
KERNEL_ATTRIBUTE = {"Conv2D": "kernel", "Dense": "kernel", "DepthwiseConv2D": "depthwise_kernel"}


@dataclass
class PruneResult:
    """The pruned model, its fine-tuning history, the schedule in steps (tfmot) and files to log.

    artifacts maps a file name to its text (e.g. channel pruning's per-layer table).
    """

    model: keras.Model
    history: dict = field(default_factory=dict)
    schedule_steps: dict = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)


def prunable_kernels(
    model: keras.Model, layer_types: Sequence[str]
) -> list[tuple[str, tf.Variable]]:
    """Returns (layer name, kernel variable) of every layer whose class is in layer_types."""
    found = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in layer_types and kind in KERNEL_ATTRIBUTE:
            found.append((layer.name, getattr(layer, KERNEL_ATTRIBUTE[kind])))
    return found
