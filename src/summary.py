"""Reports: a study's best trial or Pareto front, a sweep's accuracy-vs-rate, a run's sizes.

    python -m src.summary study accuracy_per_mb     # table, counts, importances, plots
    python -m src.summary sweep latest              # header, rows by method and rate, plots
    python -m src.summary run latest                # name, config, accuracies, sizes

Plots are PNG files in a report folder (default mlruns/reports/...), and are attached to
the MLflow run they describe (under ``summary/``): the run itself, the sweep's parent run,
or the study's newest search-worker run.
"""

from __future__ import annotations

import argparse
import math
import shlex
import warnings
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import mlflow
import optuna
from mlflow.entities import Run

from src import plots, tracking
from src.config import (
    ConfigError,
    Settings,
    compose_config,
    settings_from,
    under,
    widths_text,
)
from src.report import count
from src.search.objectives import OBJECTIVES, format_value
from src.search.settings import SearchConfig, search_settings_from
from src.search.trial import RECORDED
from src.units import KB

MIN_TRIALS_FOR_IMPORTANCES = 10
SIZE_OBJECTIVES = ("tflite_zip_bytes", "tflite_bytes", "model_zip_bytes", "model_bytes")
# The costs a study's accuracy is plotted against: trial attribute -> (divisor, unit, label, file).
COST_AXES = {
    "tflite_zip_bytes": (KB, "KB", "zipped .tflite size", "pareto_front.png"),
    "tflite_bytes": (KB, "KB", "raw .tflite size", "accuracy_vs_raw_size.png"),
    "tflite_latency_ms": (1.0, "ms", "latency (batch 1)", "accuracy_vs_latency.png"),
    "macs": (1e6, "millions", "MACs", "accuracy_vs_macs.png"),
}

# ------------------------------------------------------------------------------ study


def study_subtitle(settings: Settings, search: SearchConfig) -> str:
    """Returns the data set and quantization a study ran on, e.g. 'cifar10, int8'."""
    searched = any(under(d.path, "quant") for d in search.space.values())
    quant = "quantization searched" if searched else (
        "float32" if settings.quant.mode == "none" else settings.quant.mode)
    return f"{settings.data.name}, {quant}"


def study_report(study: optuna.Study, out_dir: Path, subtitle: str = "",
                 ) -> tuple[str, list[Path]]:
    """Returns the study's summary text and writes its plots to out_dir.

    subtitle names the data set and quantization (``study_subtitle``) in the plot titles.
    """
    states: dict[str, int] = defaultdict(int)
    for trial in study.trials:
        states[trial.state.name] += 1
    lines = [f"study {study.study_name}: {len(study.trials)} trials: "
             f"{states['COMPLETE']} complete, {states['PRUNED']} early-stopped, "
             f"{states['FAIL']} failed, {states['RUNNING']} running"]
    multi = len(study.directions) > 1
    chosen = pareto_trials(study) if multi else best_feasible(study)
    lines.append("Pareto front (accuracy up, size down):" if multi else "Best feasible trials:")
    lines.extend(trial_table(chosen, study.user_attrs.get("size", "zipped")))
    lines.extend(importance_lines(study))
    return "\n".join(lines), study_plots(study, out_dir, subtitle)


def best_feasible(study: optuna.Study, top: int = 5) -> list[optuna.trial.FrozenTrial]:
    """Returns up to `top` complete trials meeting the accuracy floor, best first."""
    feasible = [t for t in _complete(study) if all(c <= 0 for c in t.constraints.values())]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(feasible, key=lambda t: t.values[0], reverse=reverse)[:top]


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Returns the Pareto-optimal trials, most accurate first."""
    return sorted(study.best_trials, key=lambda t: -t.values[0])


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])


def trial_table(trials: list[optuna.trial.FrozenTrial], size: str = "zipped") -> list[str]:
    """Returns a Markdown table of trials: params, accuracy, sizes, and accuracy per MB of the
    size the study divides by (search.size: zipped or raw)."""
    if not trials:
        return ["(no complete trial meets the constraints yet)"]
    rows = [f"| trial | tflite acc | keras acc | tflite KB | tflite zip KB | acc/MB ({size}) | "
            "weights | sparsity | params |",
            "|---|---|---|---|---|---|---|---|---|"]
    for t in trials:
        a = {key: math.nan for key in RECORDED} | t.user_attrs
        params = ", ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        rows.append(f"| {t.number} | {a['tflite_accuracy']:.4f} | {a['test_accuracy']:.4f} | "
                    f"{a['tflite_bytes'] / KB:.1f} | {a['tflite_zip_bytes'] / KB:.1f} | "
                    f"{OBJECTIVES['accuracy_per_mb'].value(a, size):.2f} | "
                    f"{count(a['params'])} | {a['sparsity_global']:.3f} | {params} |")
    return rows


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _objective_names(study: optuna.Study) -> list[str]:
    return study.user_attrs.get("objectives") or [
        f"objective {i}" for i in range(len(study.directions))]


def importances(study: optuna.Study) -> dict[str, dict[str, float]] | str:
    """Returns each objective's parameter importances, or why there are none yet."""
    complete = len(_complete(study))
    if complete < MIN_TRIALS_FOR_IMPORTANCES:
        return (f"need {MIN_TRIALS_FOR_IMPORTANCES} complete trials, have {complete}: "
                "fewer would rank parameters by noise")
    found = {}
    for index, name in enumerate(_objective_names(study)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API notices
                found[name] = optuna.importance.get_param_importances(
                    study, target=lambda t, i=index: t.values[i])
        except (RuntimeError, ValueError) as error:
            return str(error)
    return found


def importance_lines(study: optuna.Study) -> list[str]:
    """Returns the parameter importances per objective as text, or one line saying why not."""
    found = importances(study)
    if isinstance(found, str):
        return [f"Parameter importances: not shown ({found})"]
    lines = []
    for name, values in found.items():
        lines.append(f"Parameter importances for {name}:")
        lines.extend(f"  {param}: {value:.3f}" for param, value in values.items())
    return lines


def study_plots(study: optuna.Study, out_dir: Path, subtitle: str = "") -> list[Path]:
    """Writes the accuracy-vs-size front, the history and (with enough trials) importances."""
    head = f"study {study.study_name}" + (f" ({subtitle})" if subtitle else "")
    complete = _complete(study)
    names = _objective_names(study)
    winner = best_feasible(study, top=1) if len(study.directions) == 1 else []
    best = (f"#{winner[0].number}", f"best {names[0]} "
            f"({format_value(names[0], winner[0].values[0])})") if winner else None
    written = []
    for attr, (scale, unit, what, file_name) in COST_AXES.items():
        if attr != "tflite_zip_bytes" and attr not in names:
            continue  # the zipped size always; raw size, latency, MACs when they are objectives
        points = [plots.Point(f"#{t.number}", t.user_attrs.get(attr, math.nan) / scale,
                              t.user_attrs.get("tflite_accuracy", math.nan), _choices(t))
                  for t in complete]
        if any(plots.plottable(p) for p in points):
            written.append(plots.accuracy_vs_size(
                points, f"{head}: accuracy vs {what}, trials by number", out_dir / file_name,
                size_name=what, unit=unit, best=best))
    if complete:
        series = {}
        for index, (name, direction) in enumerate(zip(names, study.directions)):
            in_kb = name in SIZE_OBJECTIVES
            series[_axis_label(name, study.user_attrs.get("size", "zipped"))] = (
                [t.number for t in complete],
                [t.values[index] / (KB if in_kb else 1) for t in complete],
                direction == optuna.study.StudyDirection.MAXIMIZE)
        stopped = [t.number for t in study.get_trials(
            deepcopy=False, states=[optuna.trial.TrialState.PRUNED])]
        written.append(plots.history(series, f"{head}: optimization history",
                                     out_dir / "optimization_history.png", stopped))
    found = importances(study)
    if not isinstance(found, str) and found:
        written.append(plots.importances(found, f"{head}: parameter importances",
                                         out_dir / "param_importances.png"))
    return written


def _axis_label(objective: str, size: str) -> str:
    """Returns an objective's history axis label with its unit."""
    if objective == "accuracy_per_mb":
        return f"accuracy per MB\n(TFLite accuracy / {size} MB)"
    if objective in COST_AXES:
        _, unit, what, _ = COST_AXES[objective]
        return f"{what} ({unit})"
    return objective.replace("_", " ")


def _choices(trial: optuna.trial.FrozenTrial) -> str:
    """Returns the config-group options a trial sampled, e.g. 'prune=flat, quant=int8'."""
    groups = [o for o in trial.user_attrs.get("overrides", []) if "=" in o
              and "." not in o.split("=", 1)[0]]
    return ", ".join(groups)


# ------------------------------------------------------------------------------ sweep


def is_sweep_parent(run: Run) -> bool:
    """Returns whether a run is a sweep's parent run rather than one of its jobs."""
    return run.data.tags.get("role") == "sweep"


def _rate(params: dict[str, str]) -> float:
    """Returns the run's pruning rate: tfmot's final sparsity, 0 for dense."""
    method = params.get("prune.method", "none")
    if method == "tfmot":
        if params.get("prune.structured_2_4") == "True":  # 2:4 is half, whatever the schedule
            return 0.5
        return _number(params.get("prune.final_sparsity") or 0.0)
    return _number(params.get("prune.rate") or 0.0) if method != "none" else 0.0


def _number(value: str | float) -> float:
    """Returns a param as a float; nan for a value a failed job was refused for ('abc')."""
    try:
        return float(value)
    except ValueError:
        return math.nan


def _widths(params: dict[str, str]) -> str:
    """Returns a channel run's kept widths per group ('8-8-16-16-64-48'), '' for a rate's run."""
    return widths_text(params.get("prune.widths"))


def _rate_or_widths(params: dict[str, str]) -> str:
    """Returns the rate ('0.70') or, for a run given widths instead, 'w' and the widths."""
    return f"w{_widths(params)}" if _widths(params) else f"{_rate(params):.2f}"


def _values(runs: Iterable[Run], key: str) -> str:
    return "/".join(sorted({r.data.params[key] for r in runs if key in r.data.params})) or "?"


def _job_params(run: Run) -> dict[str, str]:
    """Returns a job's params; for a job that failed before its run started (no params),
    those its command line sets (prune=flat as prune.method=flat)."""
    if run.data.params:
        return run.data.params
    try:
        words = shlex.split(run.data.tags.get("command", ""))
    except ValueError:
        words = run.data.tags.get("command", "").split()
    given = dict(w.lstrip("+~").split("=", 1) for w in words if "=" in w)
    groups = {"prune": "prune.method", "quant": "quant.mode", "model": "model.name",
              "data": "data.name"}
    return {groups.get(key, key): value for key, value in given.items()}


def sweep_report(runs: list[Run], out_dir: Path, sweep_id: str = "") -> tuple[str, list[Path]]:
    """Returns a sweep's header and table and writes accuracy-vs-rate and -vs-size plots."""
    jobs = tracking.latest_attempts([r for r in runs if not is_sweep_parent(r)])
    sweep_id = sweep_id or next((r.data.tags.get("sweep_id", "") for r in jobs), "")
    finished = [r for r in jobs if "tflite_accuracy" in r.data.metrics]
    dense = sorted({r.data.metrics["baseline_test_accuracy"] for r in finished
                    if "baseline_test_accuracy" in r.data.metrics})
    dense_accuracy = dense[0] if len(dense) == 1 else math.nan  # one dashed line, if one
    quant = _values(jobs, "quant.mode").replace("none", "float32")
    data_name, model = _values(jobs, "data.name"), _values(jobs, "model.name")
    # A sweep over quantization modes, quantization-aware epochs or models gets one series per
    # combination, not one line zig-zagging through them.
    varying = [key for key in ("model.name", "quant.mode", "quant.qat_epochs")
               if len({r.data.params[key] for r in jobs if key in r.data.params}) > 1]

    given = {r.info.run_id: _job_params(r) for r in jobs}

    def as_label(key: str, value: str) -> str:
        return f"qat{value}" if key == "quant.qat_epochs" else value.replace("none", "float32")

    def label(r: Run) -> str:
        return " ".join([given[r.info.run_id].get("prune.method", "?"), *(
            as_label(key, given[r.info.run_id].get(key, "?")) for key in varying)])

    shown = "/".join(f"{a:.2%}" for a in dense) or "n/a"
    lines = [f"sweep {sweep_id}: {len(jobs)} jobs ({len(finished)} finished), model {model}, "
             f"data {data_name}, quantization {quant}, dense accuracy {shown}",
             "| job | method | rate | keras acc | tflite acc | sparsity | tflite KB | zip KB "
             "| acc/MB | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    points = []
    order = sorted(jobs, key=lambda r: (label(r), _rate_or_widths(given[r.info.run_id]),
                                        _job(r)))
    for r in order:
        m, method, rate = r.data.metrics, label(r), _rate(given[r.info.run_id])
        shown_rate = _rate_or_widths(given[r.info.run_id])
        get = lambda key, m=m: m.get(key, math.nan)  # noqa: E731
        lines.append(f"| {_job(r)} | {method} | {shown_rate} | {get('test_accuracy'):.2%} | "
                     f"{get('tflite_accuracy'):.2%} | {get('sparsity_global'):.3f} | "
                     f"{get('tflite_bytes') / KB:.1f} | {get('tflite_zip_bytes') / KB:.1f} | "
                     f"{get('accuracy_per_mb'):.2f} | {r.info.status} |")
        if r in finished:
            if not _widths(r.data.params):  # a run given widths has no rate to plot against
                series[method].append((rate, get("test_accuracy"), get("tflite_accuracy")))
            points.append(plots.Point(f"#{_job(r)} {shown_rate}", get("tflite_zip_bytes") / KB,
                                      get("tflite_accuracy"), method))
    title = f"sweep {sweep_id}: {model} on {data_name}, {quant}"
    files = [plots.accuracy_vs_size(points, title + " (jobs by number and rate)",
                                    out_dir / "accuracy_vs_size.png")]
    if series:  # none when every job was given its widths: no rate, no empty chart
        files.insert(0, plots.accuracy_vs_rate(series, dense_accuracy, title,
                                               out_dir / "accuracy_vs_rate.png"))
    return "\n".join(lines), files


def _job(run: Run) -> str:
    return run.data.tags.get("sweep_job", "?")


# -------------------------------------------------------------------------------- run


def run_report(run: Run, out_dir: Path) -> tuple[str, list[Path]]:
    """Returns a run's name, id, config, accuracies and sizes, and writes its size chart."""
    m, p = run.data.metrics, run.data.params
    get = lambda key: m.get(key, math.nan)  # noqa: E731
    name = run.info.run_name or run.info.run_id
    quant = p.get("quant.mode", "?").replace("none", "float32")
    config = (f"data {p.get('data.name', '?')}, model {p.get('model.name', '?')}, "
              f"prune {p.get('prune.method', '?')} {_rate_or_widths(p)}, quantization {quant}, "
              f"{p.get('train.epochs', '?')} baseline epochs, "
              f"{p.get('prune.finetune_epochs', '0')} fine-tuning epochs")
    labels = ["model .h5", "model .h5 zipped", ".tflite", ".tflite zipped"]
    keys = ["model_bytes", "model_zip_bytes", "tflite_bytes", "tflite_zip_bytes"]
    sizes_kb = [get(k) / KB for k in keys]
    lines = [f"run {name} (id {run.info.run_id}, {run.info.status})",
             f"config: {config}",
             f"headline: {run.data.tags.get('mlflow.note.content', '(none)')}",
             f"accuracy: TFLite {get('tflite_accuracy'):.2%}, Keras {get('test_accuracy'):.2%}, "
             f"dense baseline {get('baseline_test_accuracy'):.2%}; "
             f"sparsity {get('sparsity_global'):.1%}",
             "sizes: " + ", ".join(f"{label} {kb:.1f} KB" for label, kb in zip(labels, sizes_kb))]
    if "command" in run.data.tags:
        lines.append(f"command: {run.data.tags['command']}")
    chart = plots.sizes(labels, sizes_kb, f"sizes of run {name}\n{p.get('data.name', '?')}, "
                        f"{quant}", out_dir / "sizes.png")
    return "\n".join(lines), [chart]


# ------------------------------------------------------------------- finding, attaching


def _search(experiment: str, query: str, newest: str = "start_time") -> list[Run]:
    return mlflow.search_runs(experiment_names=[experiment], filter_string=query,
                              order_by=[f"attributes.{newest} DESC"], output_format="list")


def find_run(name: str, experiment: str) -> Run:
    """Returns the run with this id, or for 'latest' the experiment run that finished last
    (a continued run keeps the start time of its first attempt)."""
    if name != "latest":
        try:
            return mlflow.MlflowClient().get_run(name)
        except mlflow.exceptions.MlflowException:
            raise ConfigError(f"run: no run {name!r}") from None
    runs = _search(experiment, "metrics.tflite_bytes > 0 and attributes.status = 'FINISHED'",
                   newest="end_time")
    if not runs:
        raise ConfigError(f"run: no finished run in experiment {experiment!r}")
    return runs[0]


def find_sweep(name: str, experiment: str) -> tuple[str, list[Run]]:
    """Returns a sweep's id and its runs (jobs and parent), 'latest' meaning the newest."""
    if name == "latest":
        newest = _search(experiment, "tags.sweep_id != ''")
        if not newest:
            raise ConfigError(f"sweep: no sweep in experiment {experiment!r}")
        name = newest[0].data.tags["sweep_id"]
    runs = _search(experiment, f"tags.sweep_id = '{name}'")
    if not [r for r in runs if not is_sweep_parent(r)]:
        raise ConfigError(f"sweep: no sweep {name!r} in experiment {experiment!r}")
    return name, runs


def sweep_parent(sweep_id: str, runs: list[Run], experiment_id: str) -> str:
    """Returns the sweep's parent run id, creating it (with the jobs nested) for older sweeps."""
    parents = [r for r in runs if is_sweep_parent(r)]
    if parents:
        return parents[0].info.run_id
    client = mlflow.MlflowClient()
    parent = client.create_run(experiment_id, run_name=f"sweep {sweep_id}",
                               tags={"role": "sweep", "sweep_id": sweep_id})
    client.set_terminated(parent.info.run_id)
    for run in runs:
        client.set_tag(run.info.run_id, "mlflow.parentRunId", parent.info.run_id)
    return parent.info.run_id


def study_run(study_name: str, experiment: str) -> str | None:
    """Returns the newest search-worker run of the study, which holds its summary."""
    runs = _search(experiment, f"tags.role = 'search_worker' and tags.study_name = "
                               f"'{study_name}'") if "'" not in study_name else []
    return runs[0].info.run_id if runs else None


def attach(run_id: str, files: list[Path]) -> None:
    """Uploads report files to an existing run's artifacts, under summary/."""
    client = mlflow.MlflowClient()
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="summary")


# ---------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> None:
    """Command line: prints a report and attaches its plots to the run it describes."""
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
    """Builds the report for a study, sweep or run; returns its text and plot files.

    The files are attached to the MLflow run described (see the module's docstring).
    """
    defaults = ["search=accuracy_per_mb"] if what == "study" and not any(
        o.startswith("search=") for o in overrides) else []
    cfg = compose_config(defaults + overrides)
    settings = settings_from(cfg)
    experiment = settings.tracking.experiment
    experiment_id = tracking.connect(settings.tracking)
    target: str | None
    if what == "study":
        search = search_settings_from(cfg)
        try:
            study = optuna.load_study(study_name=name, storage=search.storage)
        except KeyError:
            raise ConfigError(f"study: no study {name!r} in "
                              f"{tracking.safe_url(search.storage)}") from None
        out_dir = out or Path(settings.paths.mlruns_dir) / "reports" / f"study-{name}"
        text, files = study_report(study, out_dir, study_subtitle(settings, search))
        target = study_run(name, experiment)
    elif what == "sweep":
        sweep_id, runs = find_sweep(name, experiment)
        out_dir = out or Path(settings.paths.mlruns_dir) / "reports" / f"sweep-{sweep_id}"
        text, files = sweep_report(runs, out_dir, sweep_id)
        target = sweep_parent(sweep_id, runs, experiment_id)
    else:
        run = find_run(name, experiment)
        out_dir = out or Path(settings.paths.mlruns_dir) / "reports" / f"run-{run.info.run_id}"
        text, files = run_report(run, out_dir)
        target = run.info.run_id
    (out_dir / "summary.md").write_text(text + "\n")
    if target:
        attach(target, [*files, out_dir / "summary.md"])
        text += f"\nattached to MLflow run {target}"
    return text, files


if __name__ == "__main__":
    main()
