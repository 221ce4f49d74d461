"""Sweep reuse: a flat-vs-layer sweep over 9 rates sharing one baseline, against the same runs
each training its own baseline.

    python -m benchmarks.sweep_reuse [--epochs 3] [--limit-train 20000]

Prints the wall time of both, one baseline training, and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import data_label, data_overrides, machine, runs, timed_cli

RATES = [round(0.1 * i, 1) for i in range(1, 10)]


def main() -> None:
    """Times the shared-baseline sweep and the same jobs alone."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=20000)
    args = parser.parse_args()
    common = [*data_overrides(args.limit_train), "model=resnet8", f"train.epochs={args.epochs}",
              "train.verbose=0"]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        shared = Path(tmp) / "shared"
        sweep_seconds = timed_cli("src.run", "--multirun", f"paths.root={shared}", *common,
                                  "prune=flat,layer", f"prune.rate={','.join(map(str, RATES))}")
        done = runs(shared)
        trained = [r for r in done if r.data.tags["baseline_reused"] == "False"]
        baseline_seconds = trained[0].data.metrics["train_seconds"]
        alone_seconds = 0.0
        for method in ("flat", "layer"):
            for rate in RATES:
                alone_seconds += timed_cli("src.run", f"paths.root={Path(tmp) / f'{method}{rate}'}",
                                           *common, f"prune={method}", f"prune.rate={rate}")
    jobs = 2 * len(RATES)
    print(f"# sweep reuse: {jobs} one-shot jobs (flat, layer x rates 0.1..0.9), ResNet-8, "
          f"{args.epochs} epochs on {args.limit_train} images of {data_label()}; {machine()}")
    print(f"baselines trained in the sweep: {len(trained)} of {len(done)} runs")
    print(f"one baseline training:          {baseline_seconds:8.1f} s")
    print(f"sweep sharing the baseline:     {sweep_seconds:8.1f} s "
          f"= {sweep_seconds / baseline_seconds:.2f}x one baseline training (target <= 1.3x)")
    print(f"same jobs, own baseline each:   {alone_seconds:8.1f} s "
          f"= {alone_seconds / sweep_seconds:.1f}x the sweep")
    per_job = (sweep_seconds - baseline_seconds) / jobs
    print(f"per-job cost in the sweep:      {per_job:8.1f} s "
          "(process, export, conversion, Keras + TFLite test evaluation, MLflow)")
    print(f"the sweep stays within 1.3x once one baseline training takes >= "
          f"{jobs * per_job / 0.3:.0f} s ({jobs} jobs x {per_job:.1f} s / 0.3)")


if __name__ == "__main__":
    main()
