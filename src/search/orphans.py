"""What dead workers leave behind: RUNNING Optuna trials and RUNNING MLflow runs.

A worker on the same host can tell at once that another worker's process is gone, without
waiting for its heartbeat to go stale; workers on other hosts are left to the heartbeat.
"""

from __future__ import annotations

import copy
import os
import socket

import optuna

from src import tracking
from src.config import TrackingConfig
from src.search.study import retry_callback

WORKER_ATTR = "worker"  # user attr: {"host", "pid", "trial"} of the process running the trial


def mark_worker(trial: optuna.Trial) -> None:
    """Records this process as the one running the trial, so its death can be seen."""
    # The trial number is recorded too: a retried trial inherits its user attrs.
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid(),
                                      "trial": trial.number})


def fail_dead_trials(study: optuna.Study, max_retries: int) -> list[int]:
    """Fails the RUNNING trials whose worker process is gone from this host, retrying their
    parameters (up to max_retries times); returns their numbers."""
    retry = retry_callback(max_retries)
    storage = study._storage  # Optuna's own fail_stale_trials works on the storage the same way
    failed = []
    for trial in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
        worker = trial.user_attrs.get(WORKER_ATTR)
        if not worker or worker.get("trial") != trial.number \
                or worker["host"] != socket.gethostname() or _alive(int(worker["pid"])):
            continue
        try:  # the reason first: a finished trial takes no more attributes
            storage.set_trial_user_attr(trial._trial_id, "failure_reason",
                                        "its search worker died")
            if not storage.set_trial_state_values(trial._trial_id,
                                                  state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        failed.append(trial.number)
        if retry is not None:
            retry(study, _as_retried(storage.get_trial(trial._trial_id)))
    return failed


def retry_trial(study: optuna.Study, number: int, max_retries: int) -> None:
    """Enqueues a FAILED trial's parameters again (an interrupted trial), within max_retries."""
    retry = retry_callback(max_retries)
    trial = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(
        study._study_id, number))
    if retry is not None and trial.state == optuna.trial.TrialState.FAIL:
        retry(study, _as_retried(trial))


def _as_retried(trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
    """Returns a copy without the attributes of the failed attempt, which Optuna's retry
    callback would otherwise copy onto the new trial."""
    copied = copy.deepcopy(trial)
    copied.user_attrs = {k: v for k, v in copied.user_attrs.items()
                         if k not in (WORKER_ATTR, "failure_reason")}
    return copied


def close_orphan_runs(study: optuna.Study, tracking_cfg: TrackingConfig) -> list[str]:
    """Ends as KILLED the MLflow runs left RUNNING by workers that died; returns their ids.

    A trial run is orphaned when its Optuna trial is no longer running; a worker's parent run
    when its process is gone from this host (workers on other hosts close their own). Runs
    at worker start and after every trial.
    """
    running = tracking.running_runs(tracking_cfg, {"study_name": study.study_name})
    # States after runs: a trial started in between is then known, and still RUNNING.
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    closed = []
    for tracked in running:
        tags = tracked.data.tags
        if "trial_number" in tags:
            state = states.get(int(tags["trial_number"]), optuna.trial.TrialState.RUNNING)
            orphan = state != optuna.trial.TrialState.RUNNING
        else:
            orphan = (tags.get("host") == socket.gethostname() and "pid" in tags
                      and not _alive(int(tags["pid"])))
        if orphan:
            tracking.close_run(tracked.info.run_id, "its search worker died")
            closed.append(tracked.info.run_id)
    return closed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
