"""Trials in processes of their own: a native crash fails one trial, and the worker goes on."""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna

from src.config import PROJECT_ROOT
from src.search.settings import search_settings_from
from src.search.trial_process import CRASH_ENV, isolated
from tests.conftest import compose_config, runs_of, wait_until
from tests.test_workers import SEARCH, alive, finish, start

TrialState = optuna.trial.TrialState
SIGSEGV_REASON = "trial process killed by signal SIGSEGV"


def test_a_trial_killed_by_a_signal_fails_alone_and_the_search_goes_on(tmp_path):
    overrides = [
        f"paths.root={tmp_path}", *SEARCH, "search.n_trials=2", "search.study_name=crash",
        "prune.finetune_epochs=1",
        "+search.space={rate: {path: prune.rate, low: 0.3, high: 0.6}, "
        "method: {path: prune, choices: [flat]}}",
    ]
    # Trial 0's process kills itself with SIGSEGV while fine-tuning, as TensorFlow did.
    output = finish(start("src.search", *overrides, env={CRASH_ENV: "0"}))
    study = optuna.load_study(study_name="crash", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[0].user_attrs["failure_reason"] == SIGSEGV_REASON
    assert study.trials[1].intermediate_values  # its process reported epochs to the trial
    tracked = runs_of(compose_config(overrides))
    runs = {r.data.tags.get("trial_number", "worker"): r for r in tracked}
    assert sorted(runs) == ["0", "1", "worker"]
    assert runs["0"].info.status == "FAILED"
    assert runs["0"].data.tags["failure_reason"] == SIGSEGV_REASON
    assert runs["1"].info.status == runs["worker"].info.status == "FINISHED"
    assert study.trials[1].user_attrs["run_id"] == runs["1"].info.run_id
    for number in ("0", "1"):  # nested under the worker's run, named for the study
        assert runs[number].data.tags["mlflow.parentRunId"] == runs["worker"].info.run_id
        assert runs[number].info.run_name.startswith(f"crash#{number} ")
    (line,) = [x for x in output.splitlines() if x.startswith("trial 1/2 (#0) FAIL")]
    assert line.endswith(f"({SIGSEGV_REASON})")
    assert [x for x in output.splitlines() if x.startswith("trial 2/2 (#1) COMPLETE")]


def test_a_trial_process_dies_with_its_worker():
    # A stand-in worker starts a process that asks to die with it, then is SIGKILLed.
    child = ("import os, sys, time; from src.interrupt import die_with_parent; "
             "die_with_parent(int(sys.argv[1])); print(os.getpid(), flush=True); time.sleep(300)")
    worker = ("import os, subprocess, sys; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())]).wait()")
    process = subprocess.Popen([sys.executable, "-c", worker], cwd=PROJECT_ROOT,
                               stdout=subprocess.PIPE, text=True)
    pid = int(process.stdout.readline())
    assert alive(pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    wait_until(lambda: not alive(pid), 30, "the child to die with its parent")


def test_an_in_memory_study_runs_its_trials_in_the_worker(tmp_path):
    settings = [f"paths.root={tmp_path}", "search=accuracy_per_mb"]
    assert isolated(search_settings_from(compose_config(settings)))
    for storage in ("sqlite://", "sqlite:///:memory:"):
        cfg = compose_config([*settings, f"search.storage={storage}"])
        assert not isolated(search_settings_from(cfg))
    cfg = compose_config([*settings, "search.trial_process=false"])
    assert not isolated(search_settings_from(cfg))
