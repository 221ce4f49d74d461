"""Reports: a study's best trial or Pareto front, a sweep's accuracy-vs-rate, a run's sizes.

    python -m src.summary study accuracy_per_mb     # table, counts, importances, plots
    python -m src.summary sweep latest              # accuracy vs rate, flat vs layer
    python -m src.summary run latest                # size bars of one run

Plots are PNG files in a report folder (default mlruns/reports/...) and are logged to
MLflow as a run named ``summary:<what>``.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections import defaultdict
from pathlib import Path

import matplotlib
import mlflow
import optuna
from matplotlib.figure import Figure

from src import tracking
from src.config import ConfigError, compose_config, settings_from
from src.search.settings import search_settings_from
from src.units import KB


def study_report(study: optuna.Study, out_dir: Path) -> tuple[str, list[Path]]:
    """Returns the study's summary text and writes its plots to out_dir."""
    states = defaultdict(int)
    for trial in study.trials:
        states[trial.state.name] += 1
    lines = [f"study {study.study_name}: {len(study.trials)} trials: "
             f"{states['COMPLETE']} complete, {states['PRUNED']} early-stopped, "
             f"{states['FAIL']} failed, {states['RUNNING']} running"]
    multi = len(study.directions) > 1
    chosen = pareto_trials(study) if multi else best_feasible(study)
    lines.append("Pareto front (accuracy up, size down):" if multi else "Best feasible trials:")
    lines.extend(trial_table(chosen))
    lines.extend(importance_lines(study))
    return "\n".join(lines), study_plots(study, out_dir)


def best_feasible(study: optuna.Study, top: int = 5) -> list[optuna.trial.FrozenTrial]:
    """Returns up to `top` complete trials meeting the accuracy floor, best first."""
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    feasible = [t for t in complete if all(c <= 0 for c in t.constraints.values())]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(feasible, key=lambda t: t.values[0], reverse=reverse)[:top]


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Returns the Pareto-optimal trials, most accurate first."""
    return sorted(study.best_trials, key=lambda t: -t.values[0])


def trial_table(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    """Returns a Markdown table of trials: params, accuracy, sizes, accuracy per MB."""
    if not trials:
        return ["(no complete trial meets the constraints yet)"]
    rows = ["| trial | tflite acc | keras acc | tflite zip KB | acc/MB | sparsity | params |",
            "|---|---|---|---|---|---|---|"]
    for t in trials:
        a = t.user_attrs
        params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        rows.append(f"| {t.number} | {a.get('tflite_accuracy', math.nan):.4f} | "
                    f"{a.get('test_accuracy', math.nan):.4f} | "
                    f"{a.get('tflite_zip_bytes', math.nan) / KB:.1f} | "
                    f"{a.get('accuracy_per_mb', math.nan):.2f} | "
                    f"{a.get('sparsity_global', math.nan):.3f} | {params} |")
    return rows


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _first_objective_to_minimize(study: optuna.Study):
    """Returns a target for importances: Optuna's evaluator ranks params by low target values."""
    sign = -1.0 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return lambda trial: sign * trial.values[0]


def importance_lines(study: optuna.Study) -> list[str]:
    """Returns parameter importances for the first objective, or why there are none."""
    try:
        with warnings.catch_warnings():  # the target is already oriented for the evaluator
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(
                study, target=_first_objective_to_minimize(study))
    except (RuntimeError, ValueError) as error:
        return [f"Parameter importances: not available ({error})"]
    return ["Parameter importances (first objective):"] + [
        f"  {name}: {value:.3f}" for name, value in importances.items()]


def study_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Writes history, Pareto front and importance plots as PNG; returns their paths."""
    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator", category=UserWarning)

    out_dir.mkdir(parents=True, exist_ok=True)
    multi = len(study.directions) > 1
    names = study.user_attrs.get("objectives", ["objective 0", "objective 1"])
    plots = {
        "pareto_front.png": (lambda: optuna_plots.plot_pareto_front(study, target_names=names))
        if multi else None,
        "optimization_history.png": (lambda: optuna_plots.plot_optimization_history(
            study, target=lambda t: t.values[0], target_name=names[0])),
        "param_importances.png": (lambda: optuna_plots.plot_param_importances(
            study, target=_first_objective_to_minimize(study), target_name=names[0])),
    }
    written = []
    for name, draw in plots.items():
        if draw is None:
            continue
        try:
            axes = draw()
        except (RuntimeError, ValueError):
            continue  # e.g. too few complete trials for importances
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.savefig(out_dir / name, dpi=100, bbox_inches="tight")
        matplotlib.pyplot.close(figure)
        written.append(out_dir / name)
    return written


def sweep_report(runs: list[mlflow.entities.Run], out_dir: Path) -> tuple[str, list[Path]]:
    """Returns a table of a sweep's runs and writes the accuracy-vs-rate plot (per method)."""
    by_method: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    lines = ["| method | rate | keras acc | tflite acc | sparsity | tflite zip KB |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        m, p = r.data.metrics, r.data.params
        method = p.get("prune.method", "?")
        rate = float(p.get("prune.rate") or p.get("prune.final_sparsity") or 0.0)
        by_method[method].append((rate, m.get("test_accuracy", math.nan),
                                  m.get("tflite_accuracy", math.nan)))
        lines.append(f"| {method} | {rate:.2f} | {m.get('test_accuracy', math.nan):.4f} | "
                     f"{m.get('tflite_accuracy', math.nan):.4f} | "
                     f"{m.get('sparsity_global', math.nan):.3f} | "
                     f"{m.get('tflite_zip_bytes', math.nan) / KB:.1f} |")
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for method, points in sorted(by_method.items()):
        points.sort()
        axes.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"{method} (Keras)")
        axes.plot([p[0] for p in points], [p[2] for p in points], "x--", label=f"{method} (TFLite)")
    axes.set(xlabel="pruning rate", ylabel="test accuracy", title="Accuracy vs pruning rate")
    axes.grid(alpha=0.3)
    axes.legend()
    out_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_dir / "accuracy_vs_rate.png", dpi=100, bbox_inches="tight")
    return "\n".join(lines), [out_dir / "accuracy_vs_rate.png"]


def run_report(run: mlflow.entities.Run, out_dir: Path) -> tuple[str, list[Path]]:
    """Returns a run's sizes as text and writes them as a bar chart."""
    names = ["model_bytes", "model_zip_bytes", "tflite_bytes", "tflite_zip_bytes"]
    labels = ["model", "model zipped", "TFLite", "TFLite zipped"]
    sizes = [run.data.metrics.get(n, math.nan) / KB for n in names]
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    bars = axes.bar(labels, sizes, color=["#888", "#aaa", "#37c", "#6ae"])
    axes.bar_label(bars, fmt="%.1f")
    axes.set(ylabel="KB", title=f"Sizes of run {run.info.run_name or run.info.run_id[:8]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_dir / "sizes.png", dpi=100, bbox_inches="tight")
    text = "\n".join(f"{label}: {size:.1f} KB" for label, size in zip(labels, sizes))
    return text, [out_dir / "sizes.png"]


def _find_runs(what: str, name: str, experiment: str) -> list[mlflow.entities.Run]:
    """Returns the runs of one sweep (or the run) named, 'latest' meaning the newest."""
    tag = "sweep_id" if what == "sweep" else None
    query = f"tags.{tag} != ''" if tag and name == "latest" else (
        f"tags.{tag} = '{name}'" if tag else "metrics.tflite_bytes > 0")
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=query,
                              order_by=["attributes.start_time DESC"], output_format="list")
    if what == "run":
        runs = [r for r in runs if name in ("latest", r.info.run_id)][:1]
    elif name == "latest" and runs:
        newest = runs[0].data.tags["sweep_id"]
        runs = [r for r in runs if r.data.tags.get("sweep_id") == newest]
    if not runs:
        raise ConfigError(f"{what}: no {what} {name!r} in experiment {experiment!r}")
    return runs


def main(argv: list[str] | None = None) -> None:
    """Command line: prints a report and logs its plots to MLflow."""
    parser = argparse.ArgumentParser(prog="python -m src.summary", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["study", "sweep", "run"])
    parser.add_argument("name", nargs="?", default="latest",
                        help="study name, sweep id or run id ('latest' for sweeps and runs)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. search=pareto "
                        "search.storage=postgresql://... tracking.uri=...")
    parser.add_argument("--out", type=Path, help="report folder (default mlruns/reports/...)")
    args = parser.parse_args(argv)
    try:
        text, files = report(args.what, args.name, args.overrides, args.out)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None
    print(text)
    print("plots: " + ", ".join(str(f) for f in files))


def report(what: str, name: str, overrides: list[str], out: Path | None = None,
           ) -> tuple[str, list[Path]]:
    """Builds the report for a study, sweep or run; returns its text and plot files."""
    defaults = ["search=accuracy_per_mb"] if what == "study" and not any(
        o.startswith("search=") for o in overrides) else []
    cfg = compose_config(defaults + overrides)
    settings = settings_from(cfg)
    out_dir = out or Path(settings.paths.mlruns_dir) / "reports" / f"{what}-{name}"
    tracking.connect(settings.tracking)
    if what == "study":
        storage = search_settings_from(cfg).storage
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise ConfigError(f"study: no study {name!r} in {tracking.safe_url(storage)}") from None
        text, files = study_report(study, out_dir)
    elif what == "sweep":
        text, files = sweep_report(_find_runs("sweep", name, settings.tracking.experiment),
                                   out_dir)
    else:
        text, files = run_report(_find_runs("run", name, settings.tracking.experiment)[0],
                                 out_dir)
    (out_dir / "summary.md").write_text(text + "\n")
    tags = {"role": "summary", "summary_of": f"{what}:{name}"}
    with tracking.tracked_run(settings.tracking, tags, run_name=f"summary:{what}:{name}"):
        tracking.log_artifacts([*files, out_dir / "summary.md"])
    return text, files


if __name__ == "__main__":
    main()
