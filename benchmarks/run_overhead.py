"""Per-run overhead: the share of a standard run spent outside training and evaluation.

    python -m benchmarks.run_overhead [--epochs 5] [--limit-train 0]
    python -m benchmarks.run_overhead [--log FILE] -- OVERRIDES...

A standard run here: ResNet-8 baseline trained for --epochs on the training split, flat
pruning at 0.7, int8 TFLite export, both models evaluated on the whole test split. The decoded
dataset is cached beforehand (decoding is a one-off, not per-run, cost).

With OVERRIDES, it times `python -m src.run OVERRIDES` itself instead, in the project's own
MLflow store (e.g. a results row at full scale); that run must train its own baseline.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import mlflow

from benchmarks.common import data_label, data_overrides, machine, runs, timed_cli
from src.config import compose_config, settings_from


def main() -> None:
    """Times one standard run and prints where the time went."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--limit-train", type=int, default=0, help="0 = all training images")
    parser.add_argument("--log", type=Path, help="with OVERRIDES: where the run's output goes")
    parser.add_argument("overrides", nargs="*", help="time python -m src.run OVERRIDES instead")
    args = parser.parse_args()
    if args.overrides:
        time_given_run(args.overrides, args.log)
        return
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
    report(f"ResNet-8, {args.epochs} epochs, flat 0.7, int8, {data_label()}", wall,
           tracked.data.metrics)


def time_given_run(overrides: list[str], log: Path | None) -> None:
    """Times python -m src.run OVERRIDES and reports its overhead from its MLflow run."""
    tracking = settings_from(compose_config(overrides)).tracking
    wall = timed_cli("src.run", *overrides, log=log)
    mlflow.set_tracking_uri(tracking.uri)
    (tracked,) = mlflow.search_runs(experiment_names=[tracking.experiment], max_results=1,
                                    order_by=["attributes.start_time DESC"], output_format="list")
    if tracked.data.tags["baseline_reused"] == "True":
        raise SystemExit("error: the run reused a cached baseline, so it is not a standard run; "
                         "time one that trains its baseline")
    report(f"python -m src.run {' '.join(overrides)}", wall, tracked.data.metrics)


def report(title: str, wall: float, m: dict[str, float]) -> None:
    """Prints where the run's wall time went and the overhead's share."""
    train, evaluate, export, inside = (m["train_seconds"], m["evaluate_seconds"],
                                       m["export_seconds"], m["run_seconds"])
    overhead = wall - train - evaluate
    print(f"# per-run overhead: {title}; {machine()}")
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
