"""quant.strip_names: the .tflite without the tensor names no device reads."""

from __future__ import annotations

import numpy as np

from src.config import ModelConfig, QuantConfig
from src.models import build
from src.quantize import to_tflite


def _run(flatbuffer: bytes, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Returns the logits by tensor index, by the signature runner, and the tensor names."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images)
    interpreter.invoke()
    by_index = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    runner = interpreter.get_signature_runner()
    (by_signature,) = runner(**{runner.get_input_details().popitem()[0]: images}).values()
    return by_index, by_signature, [t["name"] for t in interpreter.get_tensor_details()]


def test_stripped_names_make_a_smaller_file_with_the_same_outputs():
    model = build(ModelConfig(name="resnet8", filters=[4, 8, 8]), 4)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    named = to_tflite(model, QuantConfig(mode="int8"), images)
    stripped = to_tflite(model, QuantConfig(mode="int8", strip_names=True), images)
    names_bytes = sum(len(name) for name in _run(named, images[:1])[2])
    # Smaller by at least the names' bytes less a little flatbuffer padding.
    assert names_bytes > 500 and len(named) - len(stripped) >= 0.9 * names_bytes, \
        (names_bytes, len(named), len(stripped))
    logits, signature_logits, names = _run(stripped, images[:1])
    assert set(names) == {""}
    np.testing.assert_array_equal(logits, _run(named, images[:1])[0])
    np.testing.assert_array_equal(signature_logits, logits)


def test_the_strip_names_benchmark_prints_each_file_smaller_with_the_same_outputs(tmp_path,
                                                                                 capsys):
    from benchmarks import strip_names
    model = build(ModelConfig(name="resnet8", filters=[4, 8, 8]), 4)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    path = tmp_path / "tiny.tflite"
    path.write_bytes(to_tflite(model, QuantConfig(mode="int8"), images))
    strip_names.main([str(path)])
    row = [cell.strip() for cell in capsys.readouterr().out.splitlines()[3].split("|")[1:-1]]
    assert row[0] == "tiny.tflite" and int(row[2]) < int(row[1]) and row[4] == "yes"
