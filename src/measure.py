"""Measurements of exported artifacts: real sizes on disk, sparsity per layer and in TFLite."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from src.keras_env import keras
from src.prune.common import KERNEL_ATTRIBUTE

_TFLITE_DTYPES = {
    schema.TensorType.FLOAT32: np.float32,
    schema.TensorType.FLOAT16: np.float16,
    schema.TensorType.INT8: np.int8,
    schema.TensorType.UINT8: np.uint8,
}


@dataclass
class LayerSparsity:
    """Zeros in one layer's kernel."""

    layer: str
    kind: str
    weights: int
    zeros: int
    prunable: bool

    @property
    def sparsity(self) -> float:
        """Returns the fraction of zero weights."""
        return self.zeros / self.weights if self.weights else 0.0


def layer_sparsity(model: keras.Model, layer_types: Sequence[str]) -> list[LayerSparsity]:
    """Returns one row per layer with a conv, depthwise or dense kernel."""
    rows = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in KERNEL_ATTRIBUTE:
            kernel = getattr(layer, KERNEL_ATTRIBUTE[kind]).numpy()
            rows.append(LayerSparsity(layer.name, kind, kernel.size,
                                      int(kernel.size - np.count_nonzero(kernel)),
                                      kind in layer_types))
    return rows


def global_sparsity(rows: Sequence[LayerSparsity]) -> float:
    """Returns the fraction of zeros over the prunable kernels."""
    chosen = [r for r in rows if r.prunable]
    total = sum(r.weights for r in chosen)
    return sum(r.zeros for r in chosen) / total if total else 0.0


def parameter_sparsity(model: keras.Model) -> float:
    """Returns the fraction of zeros over all of the model's parameters (BN, biases included)."""
    weights = model.get_weights()
    total = sum(w.size for w in weights)
    return sum(w.size - np.count_nonzero(w) for w in weights) / total if total else 0.0


def sparsity_table(rows: Sequence[LayerSparsity]) -> str:
    """Returns the per-layer rows as CSV text."""
    lines = ["layer,type,prunable,weights,zeros,sparsity"]
    lines += [f"{r.layer},{r.kind},{r.prunable},{r.weights},{r.zeros},{r.sparsity:.6f}"
              for r in rows]
    return "\n".join(lines) + "\n"


def tflite_weight_sparsity(flatbuffer: bytes) -> float:
    """Returns the fraction of zeros in the TFLite file's constant weight tensors (rank >= 2).

    Reads the buffers of the flatbuffer itself; a quantized weight counts as zero when it
    equals its zero point.
    """
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    total = zeros = 0
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            data = model.buffers[tensor.buffer].data
            dtype = _TFLITE_DTYPES.get(tensor.type)
            if data is None or dtype is None or len(tensor.shape) < 2:
                continue
            values = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=dtype)
            zero_points = tensor.quantization.zeroPoint if tensor.quantization else None
            zero = int(zero_points[0]) if zero_points is not None and len(zero_points) == 1 else 0
            # A sparse-encoded tensor (quant.sparse_encoding) stores only some of its values;
            # the ones it leaves out are zeros.
            size = int(np.prod(tensor.shape)) if tensor.sparsity is not None else values.size
            total += size
            zeros += size - int(np.count_nonzero(values != zero))
    return zeros / total if total else 0.0


class Stopwatch:
    """Adds up wall time per phase (train, evaluate, export) and for the whole run."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.phases: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        """Counts seconds spent elsewhere (e.g. a baseline trained inside the cache) to phase."""
        self.phases[phase] += seconds

    def totals(self) -> dict[str, float]:
        """Returns seconds per phase (train, evaluate, export) and 'run' since creation."""
        return {"train": 0.0, "evaluate": 0.0, **self.phases,
                "run": time.perf_counter() - self.started}
