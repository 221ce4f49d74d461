"""MLflow at the edge: one run per experiment, its params, metrics, tags and artifacts."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus

from src.config import PROJECT_ROOT, TrackingConfig
from src.report import EXPERIMENT_NOTE


def connect(cfg: TrackingConfig) -> str:
    """Points MLflow at the configured store and returns the experiment id."""
    if cfg.uri.startswith("sqlite:///"):
        Path(cfg.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    location = cfg.artifact_location
    if location and "://" not in location:  # a local folder; s3://... and the like pass as is
        location = Path(location).resolve().as_uri()
    try:  # the note is the experiment's description in the MLflow UI
        return mlflow.create_experiment(cfg.experiment, artifact_location=location,
                                        tags={"mlflow.note.content": EXPERIMENT_NOTE})
    except mlflow.exceptions.MlflowException:  # created meanwhile by another worker
        return mlflow.get_experiment_by_name(cfg.experiment).experiment_id


class StoppedEarly(Exception):
    """Raised by a training callback that ends a run on purpose (e.g. a hopeless search trial)."""


@contextlib.contextmanager
def tracked_run(cfg: TrackingConfig, tags: Mapping[str, str], run_name: str | None = None,
                nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Yields an active MLflow run that ends FINISHED, FAILED, or KILLED (Ctrl-C, StoppedEarly)."""
    experiment_id = connect(cfg)
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or cfg.run_name,
                           nested=nested, tags={**cfg.tags, **tags})
    status = RunStatus.FAILED
    try:
        yield run
        status = RunStatus.FINISHED
    except (KeyboardInterrupt, StoppedEarly) as stop:
        status = RunStatus.KILLED
        _tag_quietly("stopped_early" if isinstance(stop, StoppedEarly) else "interrupted",
                     str(stop) or "true")
        raise
    except BaseException as error:
        _tag_quietly("failure_reason", f"{type(error).__name__}: {error}"[:5000])
        raise
    finally:  # always, so no run stays RUNNING on the active-run stack
        mlflow.end_run(RunStatus.to_string(status))


def _tag_quietly(key: str, value: str) -> None:
    """Tags the active run; a tracking store that fails here must not hide the first error."""
    try:
        mlflow.set_tag(key, value)
    except Exception:  # noqa: BLE001
        pass


def running_runs(cfg: TrackingConfig, tags: Mapping[str, str]) -> list[mlflow.entities.Run]:
    """Returns the experiment's RUNNING runs carrying all the given tags."""
    query = f"{_tag_filter(tags)} and attributes.status = 'RUNNING'"
    return mlflow.search_runs([connect(cfg)], filter_string=query, output_format="list")


def _tag_filter(tags: Mapping[str, str]) -> str:
    """Returns an MLflow filter matching runs with all these tags.

    Tags a filter cannot express are skipped: dotted keys, and values with a quote (a command
    line); the rest (study name, trial number) identify the run."""
    return " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items()
                        if "." not in k and "'" not in str(v))


def record_failure(cfg: TrackingConfig, tags: Mapping[str, str], reason: str) -> None:
    """Leaves a FAILED nested run for work refused before its own run started, unless one exists."""
    experiment_id = connect(cfg)
    if mlflow.search_runs([experiment_id], filter_string=_tag_filter(tags), output_format="list"):
        return
    mlflow.start_run(experiment_id=experiment_id, nested=True,
                     tags={**cfg.tags, **tags, "failure_reason": reason[:5000]})
    mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))


def close_run(run_id: str, reason: str) -> None:
    """Ends a run left RUNNING by a dead process as KILLED, saying why."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "closed_because", reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Returns nested mappings as one level with dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_params(params: Mapping[str, Any]) -> None:
    """Logs params (values as strings, clipped to MLflow's limit)."""
    mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})


def log_metrics(metrics: Mapping[str, float]) -> None:
    """Logs scalar metrics."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def log_history(prefix: str, history: Mapping[str, list[float]]) -> None:
    """Logs per-epoch curves as metrics named <prefix>_<name> with the epoch as step."""
    for name, values in history.items():
        for epoch, value in enumerate(values):
            mlflow.log_metric(f"{prefix}_{name}", value, step=epoch)


def log_artifacts(paths: list[Path]) -> None:
    """Uploads files to the active run's artifacts."""
    for path in paths:
        mlflow.log_artifact(str(path))


def set_tags(tags: Mapping[str, Any]) -> None:
    """Sets tags on the active run."""
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def safe_url(url: str) -> str:
    """Returns a storage URL with any password masked, fit for logging."""
    head, at, tail = url.rpartition("@")
    if not at or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, credentials = head.partition("//")
    return f"{scheme}//{credentials.split(':', 1)[0]}:***@{tail}"


def git_commit() -> str:
    """Returns the project's git commit (with '-dirty' for local changes), or 'unknown'."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
