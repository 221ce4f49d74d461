"""Trials in processes of their own: a native crash fails one trial, and the worker goes on."""

from __future__ import annotations

import signal
import subprocess
import sys

import optuna
import pytest

from src.config import PROJECT_ROOT
from src.search.settings import search_settings_from
from src.search.study import make_study
from src.search.trial_process import CRASH_ENV, isolated
from tests.conftest import TINY, compose_config, runs_of, wait_until
from tests.test_workers import alive, finish, start

TrialState = optuna.trial.TrialState
SIGSEGV_REASON = "trial process killed by signal SIGSEGV"


def test_a_trial_killed_by_a_signal_fails_alone_and_the_search_goes_on(tmp_path):
    # Trial 0's process kills itself with SIGSEGV while fine-tuning, as TensorFlow did; then an
    # int8 trial completes, and a float32 one (four times the bytes per weight, far below the
    # median accuracy per MB) is stopped early from its own process by the median rule.
    overrides = [
        f"paths.root={tmp_path}", *TINY["data"], *TINY["model"], *TINY["train"],
        "search=accuracy_per_mb", "search.accuracy_floor=null", "search.n_trials=3",
        "search.study_name=crash", "search.early_stop.startup_trials=1", "~search.space",
        "+search.space={method: {path: prune, choices: [flat]}, "
        "rate: {path: prune.rate, low: 0.4, high: 0.4}, "
        "finetune_epochs: {path: prune.finetune_epochs, low: 2, high: 2, type: int}, "
        "quant: {path: quant, choices: [int8, none]}}",
    ]
    cfg = compose_config(overrides)
    study = make_study(search_settings_from(cfg))
    for quant in ("int8", "int8", "none"):
        study.enqueue_trial({"method": "flat", "rate": 0.4, "finetune_epochs": 2, "quant": quant})
    output = finish(start("src.search", *overrides, env={CRASH_ENV: "0"}))
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED]
    assert trials[0].user_attrs["failure_reason"] == SIGSEGV_REASON
    assert list(trials[2].intermediate_values) == [1]  # reported from its process, then stopped
    runs = {r.data.tags.get("trial_number", "worker"): r for r in runs_of(cfg)}
    assert sorted(runs) == ["0", "1", "2", "worker"]
    assert [runs[n].info.status for n in ("0", "1", "2", "worker")] == \
        ["FAILED", "FINISHED", "KILLED", "FINISHED"]
    assert runs["0"].data.tags["failure_reason"] == SIGSEGV_REASON
    assert runs["2"].data.tags["stopped_early"].startswith("stopped after epoch 1")
    assert trials[1].user_attrs["run_id"] == runs["1"].info.run_id
    assert trials[1].value == pytest.approx(runs["1"].data.metrics["accuracy_per_mb"])
    for number in ("0", "1", "2"):  # nested under the worker's run, named for the study
        assert runs[number].data.tags["mlflow.parentRunId"] == runs["worker"].info.run_id
        assert runs[number].info.run_name.startswith(f"crash#{number} ")
    (line,) = [x for x in output.splitlines() if x.startswith("trial 1/3 (#0) FAIL")]
    assert line.endswith(f"({SIGSEGV_REASON})")
    assert [x for x in output.splitlines() if x.startswith("trial 2/3 (#1) COMPLETE")]
    assert "summary: python -m src.summary study crash" in output


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
