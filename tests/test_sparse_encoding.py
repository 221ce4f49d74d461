"""quant.sparse_encoding: the converter stores sparse weights compressed inside the .tflite."""

from __future__ import annotations

import numpy as np

from src.config import ModelConfig, QuantConfig
from src.measure import tflite_weight_sparsity
from src.models import build
from src.prune import flat_masks, prunable_kernels
from src.quantize import to_tflite


def _logits(flatbuffer: bytes, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_sparse_encoding_shrinks_the_raw_float_file_at_90_percent():
    model = build(ModelConfig(name="resnet8", filters=[4, 8, 8]), 4)
    kernels = [var for _, var in prunable_kernels(model, ("Conv2D", "Dense"))]
    weights = [k.numpy() for k in kernels]
    for kernel, weight, mask in zip(kernels, weights, flat_masks(weights, 0.9)):
        kernel.assign(weight * mask)
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype(np.float32)
    plain = to_tflite(model, QuantConfig(mode="none"), images)
    sparse = to_tflite(model, QuantConfig(mode="none", sparse_encoding=True), images)
    assert len(sparse) < 0.8 * len(plain), (len(sparse), len(plain))  # 9,908 vs 15,696 here
    # The same model: identical outputs, and the zeros the encoding leaves out still count.
    np.testing.assert_array_equal(_logits(sparse, images), _logits(plain, images))
    assert abs(tflite_weight_sparsity(sparse) - tflite_weight_sparsity(plain)) < 1e-9
    assert abs(tflite_weight_sparsity(plain) - 0.9) < 0.01
