"""Latency of several exported models measured side by side, interleaved invoke by invoke.

    python -m benchmarks.latency results/models/channel-*.tflite [--threads 1] [--runs 200] \\
        [--kernels builtin]

A noisy machine slows every model alike when their invokes alternate, so the ratios to the
first file hold even when the absolute times drift. Prints the median of round medians, the
p90 over all timed invokes, each model's ratio to the first, and its MACs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import add_kernels_argument, latency_table, machine
from src import speed


def main(argv: list[str] | None = None) -> None:
    """Measures the given .tflite files side by side and prints one row each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    add_kernels_argument(parser)
    args = parser.parse_args(argv)
    models = {path.name: path.read_bytes() for path in args.files}
    stats = speed.compare_latency(models, args.threads, args.warmup, args.runs, args.repeats,
                                  args.kernels)
    print(f"LiteRT latency ({args.kernels} kernels), batch 1, {args.threads} thread(s), "
          f"{args.repeats} rounds of {args.runs} invokes per model, interleaved; {machine()}")
    print("\n".join(latency_table(models, stats)))

if __name__ == "__main__":
    main()
