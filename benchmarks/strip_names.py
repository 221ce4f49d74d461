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

from benchmarks.common import machine
from src import speed
from src.quantize import strip_names


def outputs(flatbuffer: bytes) -> np.ndarray:
    """Returns the model's output for the random batch-1 input the latency measurement uses."""
    interpreter = speed._interpreter(flatbuffer, 1, speed.KERNELS[0])
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
