"""Raw .tflite bytes with and without the names no device reads (quant.strip_names).

    python -m benchmarks.strip_names results/models/channel_long-*.tflite

Each file is stripped as `quant.strip_names=true` strips an export (src.quantize.strip_names:
description, subgraph and tensor names go, signatures stay), then both versions run on the same
random input through LiteRT: the outputs must be identical. Prints the bytes before and after,
what stripping saved, and whether the outputs matched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from benchmarks.common import machine
from src.quantize import strip_names


def outputs(flatbuffer: bytes, seed: int = 0) -> np.ndarray:
    """Returns the model's output for one random input in its input tensor's dtype."""
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    rng = np.random.default_rng(seed)
    if np.issubdtype(detail["dtype"], np.integer):
        info = np.iinfo(detail["dtype"])
        data = rng.integers(info.min, info.max, detail["shape"], endpoint=True)
    else:
        data = rng.uniform(0, 255, detail["shape"])
    interpreter.set_tensor(detail["index"], data.astype(detail["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def main(argv: list[str] | None = None) -> None:
    """Strips each file's names and prints one row per file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print(f"raw .tflite bytes with and without names (src.quantize.strip_names); outputs on one "
          f"random input compared by LiteRT; {machine()}")
    print("| file | bytes | stripped | saved | same outputs |")
    print("|---|---|---|---|---|")
    for path in args.files:
        named = path.read_bytes()
        stripped = strip_names(named)
        same = np.array_equal(outputs(named), outputs(stripped))
        saved = len(named) - len(stripped)
        print(f"| {path.name} | {len(named)} | {len(stripped)} | {saved} "
              f"({saved / len(named):.1%}) | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
