"""Search early stopping: the same seeded study with and without trial early stopping.

    python -m benchmarks.early_stop [--trials 12] [--finetune-epochs 4] [--limit-train 5000]
                                    [--rule median|percentile|hyperband] [--percentile 50]
                                    [--tfmot-as-trained]

Prints fine-tuning epochs spent and the best objective of each, and per method how many
trials were stopped early. Both studies share one cached baseline, trained before either
starts, so only the trials are compared. The space has flat, layer and tfmot trials: tfmot
ramps its sparsity while fine-tuning, so its per-epoch size estimate is taken at the
schedule's final sparsity; --tfmot-as-trained counts its weights as they are instead (the
estimate before that fix), to measure the bias against tfmot.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import optuna

from benchmarks.common import data_label, data_overrides, machine
from src.config import compose_config
from src.search.worker import run_search


def study(root: Path, name: str, rule: str, args: argparse.Namespace) -> optuna.Study:
    """Runs one seeded study under root and returns it."""
    base = [f"paths.root={root}", *data_overrides(args.limit_train), "data.limit_test=2000",
            "model=resnet8", "train.epochs=3", "train.verbose=0", "search=accuracy_per_mb",
            f"search.study_name={name}", f"search.n_trials={args.trials}",
            f"search.early_stop.rule={rule}", "search.early_stop.startup_trials=3",
            f"search.early_stop.max_epochs={args.finetune_epochs}",
            f"search.early_stop.percentile={args.percentile}",
            "search.accuracy_floor=null", "~search.space",
            # in this process, so that --tfmot-as-trained's patch reaches the trials
            "search.trial_process=false",
            "+search.space={method: {path: prune, choices: [flat, layer, tfmot]}, "
            "rate: {path: prune.rate, low: 0.5, high: 0.95, when: {method: [flat, layer]}}, "
            "final_sparsity: {path: prune.final_sparsity, low: 0.5, high: 0.95, "
            "when: {method: [tfmot]}}, "
            f"epochs: {{path: prune.finetune_epochs, low: {args.finetune_epochs}, "
            f"high: {args.finetune_epochs}, type: int}}, "
            "lr: {path: prune.finetune_lr, low: 1.0e-4, high: 0.3, log: true}, "
            "quant: {path: quant, choices: [int8]}}"]

    return run_search(compose_config(base), lambda extra: compose_config(base + extra))


def stopped_by_method(done: optuna.Study) -> str:
    """Returns e.g. 'flat 1/4, layer 2/5, tfmot 3/3': trials stopped early of each method."""
    counts: dict[str, list[int]] = {}
    for trial in done.trials:
        stopped, total = counts.setdefault(trial.params.get("method", "?"), [0, 0])
        counts[trial.params.get("method", "?")] = [stopped + (trial.state.name == "PRUNED"),
                                                   total + 1]
    return ", ".join(f"{m} {s}/{n}" for m, (s, n) in sorted(counts.items()))


def main() -> None:
    """Runs both studies and prints the comparison."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=4)
    parser.add_argument("--limit-train", type=int, default=5000)
    parser.add_argument("--rule", choices=["median", "percentile", "hyperband"], default="median")
    parser.add_argument("--percentile", type=float, default=50.0,
                        help="percentile rule: stop trials below this percentile")
    parser.add_argument("--tfmot-as-trained", action="store_true",
                        help="estimate tfmot trials at their current, still ramping sparsity")
    args = parser.parse_args()
    if args.tfmot_as_trained:
        import src.search.early_stop

        src.search.early_stop.final_sparsity_of = lambda *_: None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows, by_method = {}, {}
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
            by_method[label] = stopped_by_method(done)
    estimate = "as trained" if args.tfmot_as_trained else "at final sparsity"
    print(f"# search early stopping: {args.trials} seeded TPE trials, flat/layer/tfmot (tfmot "
          f"estimated {estimate}), rate or final sparsity, lr, "
          f"{args.finetune_epochs} fine-tuning epochs each, ResNet-8 on {args.limit_train} "
          f"images of {data_label()}; {machine()}")
    (full_epochs, full_best, *_), (stop_epochs, stop_best, _, stopped) = rows.values()
    for label, (epochs, best, trials, pruned) in rows.items():
        print(f"{label:24s} epochs spent {epochs:4d}, best accuracy_per_mb {best:8.2f}, "
              f"{pruned} of {trials} trials stopped early ({by_method[label]})")
    print(f"epochs saved: {100 * (1 - stop_epochs / full_epochs):.0f}% (target >= 40%); "
          f"best objective changed by {100 * (stop_best / full_best - 1):+.1f}% "
          "(target within 1 point)")


if __name__ == "__main__":
    main()
