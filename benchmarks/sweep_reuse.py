"""Sweep reuse: a flat-vs-layer sweep over 9 rates sharing one baseline, against the same runs
each training its own baseline.

    python -m benchmarks.sweep_reuse [--epochs 3] [--limit-train 20000]
    python -m benchmarks.sweep_reuse --sweep SWEEP_ID --experiment reference

Prints the wall time of both, one baseline training, and the ratios. With --sweep it times a
sweep that already ran at full scale instead (e.g. the reference study's, whose own-baseline
arm would take hours): the sweep's wall time is the span of its MLflow runs, first start to
last end, and the own-baseline arm is each job's run time plus one baseline training.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import data_label, data_overrides, machine, runs, timed_cli
from src.config import PROJECT_ROOT

RATES = [round(0.1 * i, 1) for i in range(1, 10)]


def main() -> None:
    """Times the shared-baseline sweep and the same jobs alone."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=20000)
    parser.add_argument("--sweep", help="sweep_id tag of a finished sweep to time instead")
    parser.add_argument("--experiment", default="reference", help="MLflow experiment of --sweep")
    args = parser.parse_args()
    if args.sweep:
        from_sweep(args.sweep, args.experiment)
        return
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


def from_sweep(sweep_id: str, experiment: str) -> None:
    """Times a finished sweep from its MLflow runs (start and end times, train_seconds)."""
    done = [r for r in runs(PROJECT_ROOT, experiment) if r.data.tags.get("sweep_id") == sweep_id]
    if not done or any(r.info.status != "FINISHED" for r in done):
        raise SystemExit(f"error: --sweep {sweep_id}: no finished sweep of that id in "
                         f"experiment {experiment} (every job must have finished)")
    trained = [r for r in done if r.data.tags["baseline_reused"] == "False"]
    if len(trained) != 1:
        raise SystemExit(f"error: --sweep {sweep_id}: {len(trained)} jobs trained a baseline; "
                         "time a sweep that trained exactly one")
    baseline_seconds = trained[0].data.metrics["train_seconds"]
    sweep_seconds = (max(r.info.end_time for r in done)
                     - min(r.info.start_time for r in done)) / 1000
    job_seconds = [(r.info.end_time - r.info.start_time) / 1000 for r in done]
    alone_seconds = sum(job_seconds) - baseline_seconds + len(done) * baseline_seconds
    config = trained[0].data.params
    print(f"# sweep reuse, from MLflow: sweep {sweep_id} of experiment {experiment}, "
          f"{len(done)} jobs, {config.get('model.name')}, {config.get('train.epochs')} epochs, "
          f"data {config.get('data.path')}; timed {machine()}")
    print(f"one baseline training:          {baseline_seconds:8.1f} s")
    print(f"sweep sharing the baseline:     {sweep_seconds:8.1f} s "
          f"= {sweep_seconds / baseline_seconds:.2f}x one baseline training (target <= 1.3x)")
    print("  (first run start to last run end; the sweep process's imports before its first "
          "run are not in it)")
    print(f"same jobs, own baseline each:   {alone_seconds:8.1f} s "
          f"= {alone_seconds / sweep_seconds:.1f}x the sweep (each job's time + one baseline "
          "training; not run)")
    print(f"per-job cost in the sweep:      "
          f"{(sweep_seconds - baseline_seconds) / len(done):8.1f} s")


if __name__ == "__main__":
    main()
