"""MLflow at the edge: one run per experiment, its params, metrics, tags and artifacts."""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import sqlalchemy
from mlflow.entities import Metric, RunStatus

from src.config import PROJECT_ROOT, ConfigError, TrackingConfig
from src.locks import file_lock
from src.report import EXPERIMENT_NOTE


def connect(cfg: TrackingConfig) -> str:
    """Points MLflow at the configured store and returns the experiment id."""
    mlflow.set_tracking_uri(cfg.uri)
    patience = contextlib.nullcontext() if cfg.uri in _ANSWERED else _impatient(cfg.uri)
    try:
        with _creating(cfg.uri), patience:
            experiment = mlflow.get_experiment_by_name(cfg.experiment)
    except (mlflow.exceptions.MlflowException, OSError) as error:
        reason = _reason(error)
        raise ConfigError(f"tracking.uri: cannot open {safe_url(cfg.uri)} ({reason})") from None
    _ANSWERED.add(cfg.uri)
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


def _reason(error: Exception) -> str:
    """The error's first line, or for a failed HTTP request its innermost cause (MLflow wraps
    "Connection refused" in three exceptions' worth of text)."""
    text = str(error).strip()
    innermost = re.search(r"\[Errno -?\d+\] ([^'\")(]+)", text)
    if "Caused by" in text and innermost:
        return innermost.group(1).strip()
    return (text.splitlines() or [type(error).__name__])[0][:300]


# A tracking server's first answer in a process: one try of FIRST_CONTACT_TIMEOUT seconds, so
# a wrong or unreachable tracking.uri fails in seconds instead of after MLflow's retries (about
# four minutes). Once a store has answered (_ANSWERED), every call keeps MLflow's retries, which
# ride out a blip during a long training or between search trials.
FIRST_CONTACT_TIMEOUT = 10
_ANSWERED: set[str] = set()


@contextlib.contextmanager
def _impatient(uri: str) -> Iterator[None]:
    """Lowers MLflow's HTTP retries and timeout for one call, unless the user set them."""
    patience = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(FIRST_CONTACT_TIMEOUT)}
    lowered = {name: value for name, value in patience.items() if name not in os.environ
               and uri.startswith(("http://", "https://"))}
    os.environ.update(lowered)
    try:
        yield
    finally:
        for name in lowered:
            os.environ.pop(name, None)


def _creating(uri: str) -> contextlib.AbstractContextManager:
    """A file lock while a new sqlite store is created: MLflow's schema migrations, run by
    two processes at once (parallel sweep jobs), fail."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return file_lock(Path(uri.removeprefix("sqlite:///") + ".lock"))


class StoppedEarly(Exception):
    """Raised by a training callback that ends a run on purpose (e.g. a hopeless search trial)."""


HOST = socket.gethostname()  # tags every run: whether a RUNNING run's process is gone is
# known only on its own host


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid with no name (some containers)
        return str(os.getuid())


USER = _user()  # tags a sweep: only its own user's command continues it


@contextlib.contextmanager
def tracked_run(cfg: TrackingConfig, tags: Mapping[str, str], run_name: str | None = None,
                nested: bool = False, continuing: mlflow.entities.Run | None = None,
                ) -> Iterator[mlflow.ActiveRun]:
    """Yields an active MLflow run that ends FINISHED, FAILED, or KILLED (Ctrl-C, StoppedEarly):
    a new one, or the run continuing names (see unfinished_run), tagged with its resumes."""
    experiment_id = connect(cfg)
    if continuing:
        run = mlflow.start_run(run_id=continuing.info.run_id, nested=nested,
                               tags={**cfg.tags, **tags})
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name or cfg.run_name,
                               nested=nested, tags={**cfg.tags, **tags})
    status = RunStatus.FAILED
    try:
        if continuing:
            _forget_the_stop(continuing)
        yield run
        status = RunStatus.FINISHED
    except (KeyboardInterrupt, StoppedEarly) as stop:
        status = RunStatus.KILLED
        _tag_quietly("stopped_early" if isinstance(stop, StoppedEarly) else "interrupted",
                     str(stop) or "true")
        if isinstance(stop, StoppedEarly):  # its description in the MLflow UI
            _tag_quietly("mlflow.note.content", f"{run.info.run_name}: {stop}")
        raise
    except BaseException as error:
        _tag_quietly("failure_reason", f"{type(error).__name__}: {error}"[:5000])
        raise
    finally:  # always, so no run stays RUNNING on the active-run stack
        mlflow.end_run(RunStatus.to_string(status))


def _forget_the_stop(run: mlflow.entities.Run) -> None:
    """Counts a continued run's resumes and removes the tags of the attempt it goes on from
    (how it stopped, where that attempt resumed), which no longer describe it."""
    before = run.data.tags
    mlflow.set_tag("resumes", int(before.get("resumes", 0)) + 1)
    for gone in ("interrupted", "resumed_from_epoch", "finetune_resumed_from_epoch"):
        if gone in before:
            mlflow.MlflowClient().delete_tag(run.info.run_id, gone)


def _tag_quietly(key: str, value: str) -> None:
    """Tags the active run; a tracking store that fails here must not hide the first error."""
    try:
        mlflow.set_tag(key, value)
    except Exception:  # noqa: BLE001
        pass


# What a finished sweep job shares with the job a continued sweep skips for it, beyond its
# config_hash: the same dense baseline, data, code and kind of CPU (its latency); a continued
# run also the same machine.
SAME_RESULT = ("baseline_key", "data_fingerprint", "git_commit", "processor")
SAME_RUN = ("host", *SAME_RESULT)


def unfinished_run(cfg: TrackingConfig, tags: Mapping[str, str],
                   anyone_running: bool) -> tuple[mlflow.entities.Run | None, str | None]:
    """Returns (the run to continue, a dead RUNNING run to close instead) for the settings
    in tags (config_hash, SAME_RUN), each or both None.

    The candidate is the newest top-level run of these settings (for a sweep's job: the
    newest of that sweep, see interrupted_sweep; a search's trials are never continued),
    if it was interrupted (KILLED, tag interrupted: Ctrl-C, SIGTERM), or is RUNNING on this
    host while no process with these settings runs there (SIGKILL, a lost session). It is
    continued when it shares SAME_RUN; a dead RUNNING one that does not is returned to be
    closed. A FAILED run is a record of its failure: never continued.
    """
    sweep = tags.get("sweep_id")  # a sweep's job continues only in that sweep (its parent)
    runs = [r for r in find_runs(cfg, {"config_hash": tags["config_hash"]})
            if r.data.tags.get("sweep_id") == sweep
            and r.data.tags.get("mlflow.parentRunId") == (
                tags.get("mlflow.parentRunId") if sweep else None)]
    return _left_unfinished(runs, {key: tags.get(key) for key in SAME_RUN}, anyone_running,
                            interrupted=lambda run: "interrupted" in run.data.tags)


def _left_unfinished(runs: list[mlflow.entities.Run], same: Mapping[str, str | None],
                     anyone_running: bool, interrupted: Callable[[mlflow.entities.Run], bool],
                     ) -> tuple[mlflow.entities.Run | None, str | None]:
    """Returns (the newest of runs to continue, or the id of a dead RUNNING one to close):
    continued if it was interrupted (KILLED and interrupted(run)) or is RUNNING on this host
    with nobody running it, and its tags hold same; closed if dead and they do not."""
    if not runs:
        return None, None
    newest, status = runs[0], runs[0].info.status
    dead = status == "RUNNING" and newest.data.tags.get("host") == HOST and not anyone_running
    if not dead and not (status == "KILLED" and interrupted(newest)):
        return None, None
    if all(newest.data.tags.get(key) == value for key, value in same.items()):
        return newest, None
    return None, newest.info.run_id if dead else None


def finished_job(cfg: TrackingConfig, tags: Mapping[str, str]) -> mlflow.entities.Run | None:
    """Returns the FINISHED run of a sweep's job with these settings (config_hash,
    SAME_RESULT) under this sweep's parent run, if there is one: a continued sweep (which
    took that parent over) does not run it again; a new sweep has no such run."""
    if "mlflow.parentRunId" not in tags:  # a job of a sweep with no parent run: none
        return None
    runs = find_runs(cfg, {"sweep_id": tags["sweep_id"], "config_hash": tags["config_hash"],
                           "mlflow.parentRunId": tags["mlflow.parentRunId"]},
                     status="FINISHED")
    return next((r for r in runs if all(r.data.tags.get(key) == tags.get(key)
                                        for key in SAME_RESULT)), None)


def interrupted_sweep(cfg: TrackingConfig, command: str, git_commit: str,
                      anyone_running: bool) -> tuple[mlflow.entities.Run | None, str | None]:
    """Returns (the sweep parent run to continue, a dead RUNNING one to close instead) for a
    --multirun command, each or both None.

    Like unfinished_run: the newest sweep of this command by this user, if it was
    interrupted (KILLED: Ctrl-C, SIGTERM) or is RUNNING on this host while no process runs
    that command here (SIGKILL, a lost session); continued under the same git commit only.
    A sweep that ended FINISHED or FAILED is never continued: the same command then starts a
    new sweep.
    """
    parents = find_runs(cfg, {"role": "sweep", "command": command, "user": USER})
    return _left_unfinished(parents, {"git_commit": git_commit}, anyone_running,
                            interrupted=lambda _: True)  # KILLED: by its atexit close


def latest_attempts(jobs: list[mlflow.entities.Run]) -> list[mlflow.entities.Run]:
    """Returns each job of a sweep once: of the runs a continued sweep holds for one job
    number (the same command numbers its jobs the same way; a job that failed, then ran
    again), the newest."""
    latest: dict[str, mlflow.entities.Run] = {}
    for run in sorted(jobs, key=lambda r: r.info.start_time or 0):
        latest[run.data.tags.get("sweep_job", run.info.run_id)] = run
    return list(latest.values())


def running_runs(cfg: TrackingConfig, tags: Mapping[str, str]) -> list[mlflow.entities.Run]:
    """Returns the experiment's RUNNING runs carrying all the given tags."""
    return find_runs(cfg, tags, status="RUNNING")


def find_runs(cfg: TrackingConfig, tags: Mapping[str, str],
              status: str | None = None) -> list[mlflow.entities.Run]:
    """Returns the experiment's runs carrying all the given tags (and status), newest first."""
    clauses = [_tag_clause(key, str(value)) for key, value in tags.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    query = " and ".join(c for c in clauses if c)
    runs = mlflow.search_runs([connect(cfg)], filter_string=query, output_format="list",
                              order_by=["attributes.start_time DESC"])
    # Checked again here: a value holding both kinds of quote cannot go into the filter.
    return [r for r in runs if all(r.data.tags.get(k) == str(v) for k, v in tags.items())]


def _tag_clause(key: str, value: str) -> str:
    """Returns an MLflow filter clause matching one tag, or '' when none can express it."""
    quote = "'" if "'" not in value else '"'
    if quote in value or "`" in key:
        return ""
    return f"tags.`{key}` = {quote}{value}{quote}"


def failed_runs(cfg: TrackingConfig, sweep_id: str) -> list[mlflow.entities.Run]:
    """Returns a sweep's FAILED job runs (tags sweep_job, failure_reason), by job number."""
    runs = find_runs(cfg, {"sweep_id": sweep_id}, status="FAILED")
    jobs = [r for r in runs if "sweep_job" in r.data.tags]
    return sorted(jobs, key=lambda r: int(r.data.tags["sweep_job"]))


def record_failure(cfg: TrackingConfig, tags: Mapping[str, str], reason: str,
                   run_name: str | None = None) -> None:
    """Leaves a FAILED nested run for work refused before its own run started, unless one exists."""
    experiment_id = connect(cfg)
    if find_runs(cfg, tags):
        return
    mlflow.start_run(experiment_id=experiment_id, nested=True, run_name=run_name,
                     tags={**cfg.tags, **tags, "failure_reason": reason[:5000]})
    mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))


def close_run(run_id: str, reason: str, status: str = "KILLED") -> None:
    """Ends a run left RUNNING by a dead process as KILLED (or FAILED, with the reason as its
    failure_reason: a trial process that crashed), saying why."""
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "closed_because" if status == "KILLED" else "failure_reason",
                   reason[:5000])
    client.set_terminated(run_id, status)


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


def log_history(prefix: str, history: Mapping[str, list[float]],
                skip: Collection[int] = ()) -> None:
    """Logs per-epoch curves as metrics named <prefix>_<name> with the epoch as step, leaving
    out the epochs in skip."""
    stamp = int(time.time() * 1000)
    points = [Metric(f"{prefix}_{name}", float(value), stamp, epoch)
              for name, values in history.items() for epoch, value in enumerate(values)
              if epoch not in skip]
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics per batch
        mlflow.MlflowClient().log_batch(run_id, metrics=points[start:start + 1000])


class EpochCurves:
    """Per-epoch curves named <prefix>_<name>: each epoch logged as it ends, so an hours-long
    training shows its curves in the MLflow UI while it runs, and at the end the epochs it did
    not see (trained before a resume, or missed while the store did not answer)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.logged: set[int] = set()
        self.live = True

    def epoch_ended(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        """Logs one epoch's metrics. After one failure it stops trying (a server that does not
        answer costs minutes of retries a call) and leaves the curve to finish(): a store that
        fails here must not stop or slow the training."""
        if not self.live:
            return
        try:
            mlflow.log_metrics({f"{self.prefix}_{k}": float(v) for k, v in (logs or {}).items()},
                               step=epoch)
        except Exception as error:  # noqa: BLE001
            self.live = False
            print(f"warning: tracking: epoch {epoch + 1}'s {self.prefix} metrics not logged "
                  f"({type(error).__name__}); the rest of the curve is logged when the run "
                  "finishes", file=sys.stderr, flush=True)
            return
        self.logged.add(epoch)

    def finish(self, history: Mapping[str, list[float]]) -> None:
        """Logs the epochs of the whole history that the run does not hold yet: not logged as
        they ended, nor by the process that a continued run resumes from."""
        epochs = max((len(values) for values in history.values()), default=0)
        unseen = [epoch for epoch in range(epochs) if epoch not in self.logged]
        held = set(self.logged)
        if unseen:  # only then asks the store which steps the run holds
            client, run_id = mlflow.MlflowClient(), mlflow.active_run().info.run_id
            in_run = [{m.step for m in client.get_metric_history(run_id, f"{self.prefix}_{name}")}
                      for name in history]
            held |= {epoch for epoch in unseen if all(epoch in steps for steps in in_run)}
        log_history(self.prefix, history, skip=held)


def log_artifacts(paths: list[Path], folder: str | None = None) -> None:
    """Uploads files to the active run's artifacts (into folder, if given)."""
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path=folder)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Sets tags on the active run."""
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def safe_url(url: str) -> str:
    """Returns a storage URL with any password masked as ***, fit for logging."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:  # not a URL (e.g. "databricks"): no password in it
        return url


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
