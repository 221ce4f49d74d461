"""A search worker: runs trials until its budget is spent or too many fail, says how each
went in one line, and ends with the study's best trials on its parent MLflow run."""

from __future__ import annotations

import os
import shlex
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import optuna
from omegaconf import DictConfig

from src import tracking, units
from src.config import ConfigError, Settings, TrackingConfig, settings_from
from src.search.objectives import format_value
from src.search.orphans import close_orphan_runs, fail_dead_trials, retry_trial
from src.search.settings import (
    SearchConfig,
    refuse_model_dims,
    refuse_qat_dims,
    refuse_tfmot_dims,
    refuse_widths_dims,
    search_settings_from,
)
from src.search.study import judged_settings, make_study
from src.search.trial import Composer, run_trial

TrialState = optuna.trial.TrialState


class SearchAborted(RuntimeError):
    """The search stopped itself because too many of its trials failed."""


class FailureCap:
    """Optuna callback that stops the study when too many of this worker's trials fail."""

    def __init__(self, max_rate: float, min_trials: int):
        self.max_rate, self.min_trials = max_rate, min_trials
        self.finished = self.failed = 0
        self.tripped = ""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.finished += 1
        self.failed += trial.state == TrialState.FAIL
        if self.finished >= self.min_trials and self.failed / self.finished > self.max_rate:
            reason = trial.user_attrs.get("failure_reason", "see the failed trials")
            self.tripped = (f"search.max_failure_rate: {self.failed} of {self.finished} trials "
                            f"failed (last: {reason})")
            study.stop()


def run_search(cfg: DictConfig, compose: Composer, replay: Sequence[str] = ()) -> optuna.Study:
    """Runs search.n_trials trials (or until search.timeout) and returns the study.

    replay: the command-line overrides that, with a trial's sampled ones, make
    ``python -m src.run`` repeat that trial; each trial run is tagged with that command.
    """
    search = search_settings_from(cfg)
    base = settings_from(cfg)  # the untouched settings must be valid too
    if base.model.name == "file":
        refuse_model_dims(search.space)
    if base.prune.widths is not None:
        refuse_widths_dims(search.space)
    if base.train.swa_start is not None:
        refuse_tfmot_dims(search.space)
    if base.quant.qat_epochs:
        refuse_qat_dims(search.space)
    if search.early_stop.rule != "none" and base.data.val_fraction == 0:
        raise ConfigError("search.early_stop.rule: trial early stopping judges validation "
                          "accuracy; set data.val_fraction > 0 or the rule to none")
    study = make_study(search, judged_settings(cfg))
    clean_up(study, search, base.tracking)
    tags = {"role": "search_worker", "study_name": search.study_name,
            "host": socket.gethostname(), "pid": str(os.getpid())}
    cap = FailureCap(search.max_failure_rate, search.failure_rate_min_trials)
    lines = TrialLines(search)
    current: list[int] = []  # the trial this worker is running, to retry it if interrupted

    with tracking.tracked_run(base.tracking, tags,
                              run_name=f"search:{search.study_name}") as worker_run:

        def objective(trial: optuna.Trial) -> list[float]:
            current[:] = [trial.number]
            return run_trial(trial, search, compose, base.tracking, replay,
                             parent_run_id=worker_run.info.run_id)

        tracking.log_params({"search.objectives": ",".join(search.objectives),
                             "search.size": search.size,
                             "search.storage": tracking.safe_url(search.storage),
                             "search.n_trials": search.n_trials, "search.seed": search.seed})
        try:
            study.optimize(objective, n_trials=search.n_trials, timeout=search.timeout,
                           catch=(Exception,),
                           # Optuna fails stale trials before each new one: close their runs too.
                           callbacks=[lines, cap,
                                      lambda s, _: close_orphan_runs(s, base.tracking)])
        except KeyboardInterrupt:
            if current:  # Optuna failed it; its parameters deserve another go
                retry_trial(study, current[0], search.max_retries)
            raise
        finally:
            clean_up(study, search, base.tracking)
        if cap.tripped:
            raise SearchAborted(cap.tripped)
        default_storage = f"sqlite:///{base.paths.mlruns_dir}/optuna.db"
        print(closing_block(study, search, replay, default_storage), flush=True)
        log_study(study, search, base)
    return study


def clean_up(study: optuna.Study, search: SearchConfig, tracking_cfg: TrackingConfig) -> None:
    """Fails and retries trials of dead workers (heartbeat or gone from this host), and
    closes the MLflow runs they left RUNNING; at worker start and before it exits."""
    if search.heartbeat_seconds:
        optuna.storages.fail_stale_trials(study)
    fail_dead_trials(study, search.max_retries)
    close_orphan_runs(study, tracking_cfg)


class TrialLines:
    """Optuna callback printing one line per finished trial of this worker."""

    def __init__(self, search: SearchConfig):
        self.search, self.count = search, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.count += 1
        print(trial_line(trial, self.search, self.count), flush=True)


def trial_line(trial: optuna.trial.FrozenTrial, search: SearchConfig, count: int) -> str:
    """Returns e.g. 'trial 3/20 (#12) COMPLETE tflite_accuracy=0.8123 ... 42 s  method=flat'."""
    budget = search.n_trials if search.n_trials is not None else "?"
    parts = [f"trial {count}/{budget} (#{trial.number}) {trial.state.name}"]
    if trial.state == TrialState.COMPLETE:
        parts += [f"{name}={format_value(name, value)}"
                  for name, value in zip(search.objectives, trial.values)]
    if trial.duration is not None:
        parts.append(f"{trial.duration.total_seconds():.0f} s")
    line = " ".join(parts) + "  " + " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    reason = trial.user_attrs.get("failure_reason") or trial.user_attrs.get("early_stop_reason")
    return f"{line}  ({reason})" if reason and trial.state != TrialState.COMPLETE else line


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def chosen_trials(study: optuna.Study, top: int = 5) -> list[optuna.trial.FrozenTrial]:
    """Returns the Pareto front (two objectives) or the best feasible trials, best first."""
    if len(study.directions) > 1:
        return sorted(study.best_trials, key=lambda t: -t.values[0])
    complete = study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])
    feasible = [t for t in complete if all(c <= 0 for c in t.constraints.values())]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(feasible, key=lambda t: t.values[0], reverse=maximize)[:top]


def closing_block(study: optuna.Study, search: SearchConfig, replay: Sequence[str] = (),
                  default_storage: str = "") -> str:
    """Returns the worker's last words: the best trials or the front, their runs, and the
    command that summarises the study."""
    chosen = chosen_trials(study)
    title = (f"Pareto front of study {study.study_name!r} ({len(chosen)} trials):"
             if len(search.objectives) > 1 else f"Best trials of study {study.study_name!r}:")
    header = ["trial", *search.objectives, "MLflow run", "params"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for trial in chosen:
        values = [format_value(n, v) for n, v in zip(search.objectives, trial.values)]
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        rows.append(f"| {trial.number} | " + " | ".join(values)
                    + f" | {trial.user_attrs.get('run_id', '?')} | {params} |")
    if not chosen:
        rows = ["(no complete trial meets the constraints yet)"]
    arguments = ["python", "-m", "src.summary", "study", study.study_name, *replay]
    if search.storage != default_storage:
        arguments.append(f"search.storage={tracking.safe_url(search.storage)}")
    return "\n".join([title, *rows, f"summary: {shlex.join(arguments)}"])


def log_study(study: optuna.Study, search: SearchConfig, settings: Settings) -> None:
    """Puts the study's best values (or front size), a one-line description, its summary
    table and plots (under summary/, where `src.summary study` puts them too) on the active
    (worker's parent) run, so the MLflow UI shows the study there."""
    from src.summary import study_report, study_subtitle  # matplotlib only when a study ends

    chosen = chosen_trials(study)
    counts = {state: 0 for state in ("COMPLETE", "PRUNED", "FAIL")}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    metrics = {f"trials_{state.lower()}": n for state, n in counts.items()}
    if len(search.objectives) > 1:
        metrics["pareto_front_size"] = len(chosen)
    elif chosen:
        metrics[f"best_{search.objectives[0]}"] = chosen[0].values[0]
        tracking.set_tags({"best_trial": chosen[0].number,
                           "best_run_id": chosen[0].user_attrs.get("run_id", "")})
    tracking.log_metrics(metrics)
    tracking.set_tags({"mlflow.note.content": study_headline(study, search, chosen, counts)})
    with tempfile.TemporaryDirectory(prefix="study-") as tmp:
        text, plots = study_report(study, Path(tmp), study_subtitle(settings, search))
        (Path(tmp) / "summary.md").write_text(text + "\n")
        tracking.log_artifacts([*plots, Path(tmp) / "summary.md"], folder="summary")


def study_headline(study: optuna.Study, search: SearchConfig,
                   chosen: list[optuna.trial.FrozenTrial], counts: dict[str, int]) -> str:
    """Returns the worker run's description: the trials and the best one (or the front)."""
    line = (f"study {study.study_name}: {sum(counts.values())} trials ({counts['COMPLETE']} "
            f"complete, {counts['PRUNED']} stopped early, {counts['FAIL']} failed)")

    def shown(trial: optuna.trial.FrozenTrial) -> str:
        attrs = trial.user_attrs
        return (f"#{trial.number} {attrs.get('tflite_accuracy', float('nan')):.2%} at "
                f"{units.kb(attrs.get('tflite_zip_bytes', float('nan')))} zipped")

    if not chosen:
        return line + "; no complete trial meets the constraints"
    if len(search.objectives) > 1:
        ends = f"{shown(chosen[0])} to {shown(chosen[-1])}" if len(chosen) > 1 \
            else shown(chosen[0])
        return line + f"; Pareto front of {len(chosen)}: {ends}"
    best = chosen[0]
    return (line + f"; best {shown(best)}: {search.objectives[0]} "
            f"{format_value(search.objectives[0], best.values[0])}, run "
            f"{best.user_attrs.get('run_id', '?')}")
