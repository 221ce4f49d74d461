"""Search early stopping: the same seeded study with and without trial early stopping.

    python -m benchmarks.early_stop [--trials 12] [--finetune-epochs 4] [--limit-train 5000]
                                    [--rule median|percentile|hyperband] [--percentile 50]

Prints fine-tuning epochs spent and the best objective of each. Both studies share one
cached baseline, trained before either starts, so only the trials are compared.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna

from benchmarks.common import data_label, data_overrides, machine
from src.config import compose_config
from src.search import run_search


def study(root: Path, name: str, rule: str, args: argparse.Namespace) -> optuna.Study:
    """Runs one seeded study under root and returns it."""
    base = [f"paths.root={root}", *data_overrides(args.limit_train), "data.limit_test=2000",
            "model=resnet8", "train.epochs=3", "train.verbose=0", "search=accuracy_per_mb",
            f"search.study_name={name}", f"search.n_trials={args.trials}",
            f"search.early_stop.rule={rule}", "search.early_stop.startup_trials=3",
            f"search.early_stop.max_epochs={args.finetune_epochs}",
            f"search.early_stop.percentile={args.percentile}",
            "search.accuracy_floor=null", "~search.space",
            "+search.space={method: {path: prune, choices: [flat, layer]}, "
            "rate: {path: prune.rate, low: 0.5, high: 0.95}, "
            f"epochs: {{path: prune.finetune_epochs, low: {args.finetune_epochs}, "
            f"high: {args.finetune_epochs}, type: int}}, "
            "lr: {path: prune.finetune_lr, low: 1.0e-4, high: 0.3, log: true}, "
            "quant: {path: quant, choices: [int8]}}"]

    return run_search(compose_config(base), lambda extra: compose_config(base + extra))


def main() -> None:
    """Runs both studies and prints the comparison."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--limit-train", type=int, default=5000)
    parser.add_argument("--rule", choices=["median", "percentile", "hyperband"], default="median")
    parser.add_argument("--percentile", type=float, default=50.0,
                        help="percentile rule: stop trials below this percentile")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-early-") as tmp:
        stopped = f"{args.rule} rule"
        if args.rule == "percentile":
            stopped += f" ({args.percentile:g})"
        for label, rule in [("without early stopping", "none"), (stopped, args.rule)]:
            done = study(Path(tmp), f"bench_{rule}", rule, args)
            # Every fine-tuning epoch reports once, stopped early or not.
            epochs = sum(len(t.intermediate_values) for t in done.trials)
            rows[label] = (epochs, done.best_value, len(done.trials),
                           sum(t.state.name == "PRUNED" for t in done.trials))
    print(f"# search early stopping: {args.trials} seeded TPE trials, flat/layer, rate, lr, "
          f"{args.finetune_epochs} fine-tuning epochs each, ResNet-8 on {args.limit_train} "
          f"images of {data_label()}; {machine()}")
    (full_epochs, full_best, *_), (stop_epochs, stop_best, _, stopped) = rows.values()
    for label, (epochs, best, trials, pruned) in rows.items():
        print(f"{label:24s} epochs spent {epochs:4d}, best accuracy_per_mb {best:8.2f}, "
              f"{pruned} of {trials} trials stopped early")
    print(f"epochs saved: {100 * (1 - stop_epochs / full_epochs):.0f}% (target >= 40%); "
          f"best objective changed by {100 * (stop_best / full_best - 1):+.1f}% "
          "(target within 1 point)")


if __name__ == "__main__":
    main()
