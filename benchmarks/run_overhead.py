"""Per-run overhead: the share of a standard run spent outside training and evaluation.

    python -m benchmarks.run_overhead [--epochs 5] [--limit-train 0]

A standard run here: ResNet-8 baseline trained for --epochs on the training split, flat
pruning at 0.7, int8 TFLite export, both models evaluated on the whole test split. The decoded
dataset is cached beforehand (decoding is a one-off, not per-run, cost).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from benchmarks.common import data_label, data_overrides, machine, runs, timed_cli


def main() -> None:
    """Times one standard run and prints where the time went."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit-train", type=int, default=0, help="0 = all training images")
    args = parser.parse_args()
    common = [*data_overrides(args.limit_train or None), "model=resnet8",
              f"train.epochs={args.epochs}", "train.verbose=0", "prune=flat", "prune.rate=0.7",
              "quant=int8"]
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        warm, root = Path(tmp) / "warm", Path(tmp) / "run"
        timed_cli("src.run", f"paths.root={warm}", *common, "train.epochs=1")  # decode once
        (root / "mlruns" / "cache").mkdir(parents=True)
        shutil.copytree(warm / "mlruns" / "cache" / "datasets",
                        root / "mlruns" / "cache" / "datasets")
        wall = timed_cli("src.run", f"paths.root={root}", *common)
        (tracked,) = runs(root)
    m = tracked.data.metrics
    train, evaluate, export, inside = (m["train_seconds"], m["evaluate_seconds"],
                                       m["export_seconds"], m["run_seconds"])
    overhead = wall - train - evaluate
    print(f"# per-run overhead: ResNet-8, {args.epochs} epochs, flat 0.7, int8, "
          f"{data_label()}; {machine()}")
    print(f"process wall time:                  {wall:7.1f} s")
    print(f"  training (baseline + pruning):    {train:7.1f} s")
    print(f"  evaluation (Keras + TFLite, test): {evaluate:6.1f} s")
    print(f"  export (save, convert, measure):  {export:7.1f} s")
    print(f"  imports and compose (before run): {wall - inside:7.1f} s")
    print(f"  data cache, baseline cache, MLflow: {inside - train - evaluate - export:5.1f} s")
    print(f"overhead outside training and evaluation: {overhead:.1f} s = "
          f"{100 * overhead / wall:.1f}% of the run (target <= 5%)")


if __name__ == "__main__":
    main()
