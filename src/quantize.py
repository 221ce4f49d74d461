"""Post-training quantization with the TFLite converter, and batched LiteRT evaluation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from ai_edge_litert.interpreter import Interpreter
from tensorflow.lite.tools import flatbuffer_utils

from src.config import QuantConfig
from src.keras_env import keras, tf


def to_tflite(model: keras.Model, cfg: QuantConfig, calibration: np.ndarray) -> bytes:
    """Returns the model converted to a TFLite flatbuffer, quantized per cfg.mode (and with
    sparse weights stored compressed when cfg.sparse_encoding, without names when
    cfg.strip_names)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    optimizations = [tf.lite.Optimize.DEFAULT] if cfg.mode != "none" else []
    if cfg.sparse_encoding:
        # Sparse weights are stored in a compressed block format where the converter deems
        # them sparse enough; other tensors stay dense (see README, "Sparse encoding").
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    if cfg.mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if cfg.mode == "int8":
        # A fixed random subset: image-folder data is sorted by class.
        picked = np.random.default_rng(0).permutation(len(calibration))[
            : cfg.representative_samples]
        # In the model's own input dtype and scale (a loaded model may take uint8 pixels).
        samples = calibration[np.sort(picked)].astype(model.inputs[0].dtype.as_numpy_dtype)

        def representative() -> Iterator[list[np.ndarray]]:
            for image in samples:
                yield [image[None]]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if cfg.integer_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    flatbuffer = converter.convert()
    return strip_names(flatbuffer) if cfg.strip_names else flatbuffer


def strip_names(flatbuffer: bytes) -> bytes:
    """Returns the TFLite model without its description, subgraph and tensor names: strings
    that inference never reads. Signatures stay (they map their own input and output names to
    tensor indices), so LiteRT's signature runner works on the result."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    model.description = None
    for subgraph in model.subgraphs:
        subgraph.name = None
        for tensor in subgraph.tensors:
            tensor.name = None
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def evaluate_tflite(flatbuffer: bytes, x: np.ndarray, y: np.ndarray, batch_size: int = 256,
                    num_threads: int | None = None) -> float:
    """Returns the TFLite model's top-1 accuracy on (x, y), run in batches by LiteRT."""
    interpreter = Interpreter(model_content=flatbuffer, num_threads=num_threads)
    input_detail = interpreter.get_input_details()[0]
    output_index = interpreter.get_output_details()[0]["index"]
    correct, allocated = 0, None
    for start in range(0, len(x), batch_size):
        batch = _to_input(x[start:start + batch_size], input_detail)
        if allocated != len(batch):
            interpreter.resize_tensor_input(input_detail["index"], batch.shape)
            interpreter.allocate_tensors()
            allocated = len(batch)
        interpreter.set_tensor(input_detail["index"], batch)
        interpreter.invoke()
        scores = interpreter.get_tensor(output_index)
        correct += int(np.sum(np.argmax(scores, axis=1) == y[start:start + batch_size]))
    return correct / max(len(x), 1)


def _to_input(images: np.ndarray, detail: dict) -> np.ndarray:
    """Returns the images in the input tensor's dtype, quantized when the input is quantized."""
    dtype = detail["dtype"]
    scale, zero_point = detail["quantization"]
    if np.issubdtype(dtype, np.integer) and scale:  # scale 0: an unquantized uint8 input
        info = np.iinfo(dtype)
        quantized = np.round(images.astype(np.float32) / scale + zero_point)
        return np.clip(quantized, info.min, info.max).astype(dtype)
    return images.astype(dtype)
