"""Many workers and faults: PostgreSQL-backed studies, killed workers, Ctrl-C, bad storage."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from src import tracking
from src.config import PROJECT_ROOT, ConfigError, settings_from
from src.search.settings import search_settings_from
from src.search.study import make_study
from tests import postgres
from tests.conftest import TINY, compose_config, runs_of, wait_until

TrialState = optuna.trial.TrialState
REQUIRE_POSTGRES = os.environ.get("PRUNESWEEP_REQUIRE_POSTGRES") == "1"
SEARCH = [*TINY["data"], *TINY["model"], *TINY["train"], "search=accuracy_per_mb",
          "search.accuracy_floor=null", "search.early_stop.rule=none", "~search.space"]


def start(module: str, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    # SIGINT back to its default first: a suite started in the background by a non-interactive
    # shell inherits it ignored, and Python then never turns it into KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", module, *overrides], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def trial_processes(worker_pid: int) -> list[int]:
    """Returns the pids of the worker's trial processes (from /proc, Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # not a process, or gone meanwhile
        if ppid == worker_pid and b"src.search.trial_process" in command:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Returns whether the process exists and is not a zombie waiting to be reaped."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def finish(process: subprocess.Popen, timeout: float = 900) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


@pytest.mark.skipif(not postgres.available() and not REQUIRE_POSTGRES,
                    reason="PostgreSQL is not installed (.ci/run installs it)")
def test_two_workers_share_one_postgresql_study(tmp_path):
    with postgres.server() as url:
        overrides = [
            f"paths.root={tmp_path}", *SEARCH, f"search.storage={url}/optuna",
            f"tracking.uri={url}/mlflow", "search.n_trials=2", "search.study_name=shared",
            "search.trial_process=false",  # sharing is the point here; test_isolation has those
            "+search.space={rate: {path: prune.rate, low: 0.2, high: 0.8}, "
            "method: {path: prune, choices: [flat, layer]}}",
        ]
        cfg = compose_config(overrides)
        make_study(search_settings_from(cfg))  # create schema and study before workers race
        tracking.connect(settings_from(cfg).tracking)
        workers = [start("src.search", *overrides) for _ in range(2)]
        for worker in workers:
            finish(worker)
        study = optuna.load_study(study_name="shared", storage=f"{url}/optuna")
        numbers = sorted(t.number for t in study.trials)
        assert numbers == list(range(4))
        assert all(t.state == TrialState.COMPLETE for t in study.trials)
        runs = runs_of(cfg)
        parents = [r for r in runs if r.data.tags.get("role") == "search_worker"]
        trials = [r for r in runs if "trial_number" in r.data.tags]
        assert len(parents) == 2
        for parent in parents:  # both workers contributed
            children = [r for r in trials
                        if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
            assert len(children) == 2
        assert sorted(int(r.data.tags["trial_number"]) for r in trials) == numbers
        for run in trials:  # each trial run names the single run that repeats it
            command = shlex.split(run.data.tags["command"])
            assert command[:3] == ["python", "-m", "src.run"]
            assert f"paths.root={tmp_path}" in command
            assert any(arg.lstrip("+").startswith("prune.rate=") for arg in command)
            assert not [arg for arg in command if "search" in arg]
        baselines = [r.data.tags["baseline_reused"] for r in trials]
        assert baselines.count("False") == 1  # the lock let one worker train it
        mlflow.set_tracking_uri("sqlite://")  # let go of the server before it stops


def read_until(process: subprocess.Popen, prefix: str, timeout: float) -> list[str]:
    """Returns the process's output lines up to the first starting with prefix."""
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no line {prefix!r} within {timeout} s:\n" + "".join(lines[-30:]))


def test_killed_worker_trial_is_retried_at_once_and_its_runs_closed(tmp_path):
    # A search killed mid-trial and started again at once: the heartbeat (30 s) is not stale
    # yet, but the dead worker's process is gone from this host. Its trial's process (trials
    # run in their own, the default) dies with it.
    common = [
        f"paths.root={tmp_path}", *SEARCH, "train.verbose=2", "search.study_name=faults",
        "+search.space={rate: {path: prune.rate, low: 0.3, high: 0.3}, "
        "method: {path: prune, choices: [flat]}, "
        "finetune_epochs: {path: prune.finetune_epochs, choices: [1, 8]}}",
    ]
    cfg = compose_config(common)
    study = make_study(search_settings_from(cfg))
    for epochs in (1, 8):
        study.enqueue_trial({"rate": 0.3, "method": "flat", "finetune_epochs": epochs})
    worker = start("src.search", *common, "search.n_trials=2")
    read_until(worker, "Epoch 3/8", timeout=900)  # trial 1 is fine-tuning (and then exports)
    (child,) = trial_processes(worker.pid)
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=30)
    wait_until(lambda: not alive(child), 30, "the trial process to die with its worker")
    first_value = study.trials[0].value
    assert [t.state for t in study.trials[:2]] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert [r.info.status for r in runs_of(cfg)].count("RUNNING") == 2  # trial 1 and parent

    # One trial: the killed one's retry, queued by this worker at its start.
    output = finish(start("src.search", *common, "search.n_trials=1"))
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[0].state == TrialState.COMPLETE and trials[0].value == first_value
    assert trials[1].state == TrialState.FAIL
    assert trials[1].user_attrs["failure_reason"] == "its search worker died"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == trials[1].params
    assert "failure_reason" not in retried[0].user_attrs
    runs = runs_of(cfg)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert {r.data.tags.get("trial_number", "parent") for r in killed} == {"1", "parent"}
    assert all(r.data.tags["closed_because"] == "its search worker died" for r in killed)
    # One line per trial (Optuna's own INFO line silenced), then the closing block.
    assert len([line for line in output.splitlines() if line.startswith("trial 1/1 ")]) == 1
    assert "finished with value" not in output
    assert "summary: python -m src.summary study faults" in output


def test_failure_rate_cap_stops_a_search_that_fails_everything(tmp_path):
    overrides = [
        f"paths.root={tmp_path}", *SEARCH, "search.n_trials=10", "search.failure_rate_min_trials=2",
        "+search.space={rate: {path: prune.rate, low: 0.5, high: 0.6}, "
        "method: {path: prune, choices: [flat]}, "
        "min_density: {path: prune.min_density, low: 0.9, high: 0.9}}",
    ]
    worker = start("src.search", *overrides)
    output, _ = worker.communicate(timeout=300)
    assert worker.returncode == 1
    assert "error: search.max_failure_rate: 2 of 2 trials failed (last: ConfigError: " \
           "prune.min_density" in output
    study = optuna.load_study(study_name="accuracy_per_mb",
                              storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert len(study.trials) == 2
    trial_runs = [r for r in runs_of(compose_config(overrides)) if "trial_number" in r.data.tags]
    assert sorted(r.data.tags["trial_number"] for r in trial_runs) == ["0", "1"]
    for tracked in trial_runs:  # refused before training, yet visible as failed trials
        assert tracked.info.status == "FAILED"
        assert tracked.data.tags["failure_reason"].startswith("ConfigError: prune.min_density")


def test_nan_loss_fails_the_trial_with_its_reason(make_cfg):
    from src.experiment import run

    cfg = make_cfg("prune=flat", "prune.finetune_epochs=2", "prune.finetune_lr=1e30")
    with pytest.raises(FloatingPointError, match="training loss became"):
        run(cfg)
    (failed,) = [r for r in runs_of(cfg) if r.info.status == "FAILED"]
    assert failed.data.tags["failure_reason"].startswith("FloatingPointError")


@pytest.mark.parametrize("module", ["src.run", "src.search"])
@pytest.mark.parametrize("stop,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_end_the_run_as_killed(tmp_path, module, stop, code):
    overrides = [f"paths.root={tmp_path}", *TINY["data"], *TINY["model"], "train.verbose=2",
                 "train.batch_size=32", "train.epochs=300"]
    if module == "src.search":
        overrides += ["search=accuracy_per_mb", "search.n_trials=1"]
    process = start(module, *overrides)
    read_until(process, "Epoch 3/", timeout=900)  # training is under way
    process.send_signal(stop)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == code, output[-2000:]
    # The last word is ours (Optuna logs the interrupted trial's traceback as a warning before).
    assert output.strip().splitlines()[-1].startswith("interrupted ")
    runs = runs_of(compose_config(overrides))
    assert len(runs) == (2 if module == "src.search" else 1)  # trial run under a worker run
    assert all(r.info.status == "KILLED" for r in runs)
    if stop == signal.SIGTERM:
        assert all(r.data.tags["interrupted"] == "stopped by SIGTERM" for r in runs)
    if module == "src.search":  # the trial failed, not left RUNNING, and waits to be retried
        study = optuna.load_study(study_name="accuracy_per_mb",
                                  storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
        states = [t.state for t in study.trials]
        assert states == [TrialState.FAIL, TrialState.WAITING]
        assert study.trials[1].params == study.trials[0].params


def test_unreachable_database_fails_fast(tmp_path):
    cfg = compose_config([f"paths.root={tmp_path}", "search=accuracy_per_mb",
                          "search.storage=postgresql://nobody@127.0.0.1:9/optuna"])
    started = time.time()
    with pytest.raises(ConfigError, match=r"^search.storage: cannot open postgresql://"):
        make_study(search_settings_from(cfg))
    assert time.time() - started < 15


def test_storage_passwords_are_hidden_and_quoted_tags_are_found(tmp_path):
    assert tracking.safe_url("postgresql://me:s3cr%40t@db:5432/optuna") == \
        "postgresql://me:***@db:5432/optuna"
    assert tracking.safe_url("sqlite:///x/optuna.db") == "sqlite:///x/optuna.db"
    assert tracking.safe_url("databricks") == "databricks"
    cfg = settings_from(compose_config([f"paths.root={tmp_path}"])).tracking
    odd = {"study_name": "it's", "note": 'say "hi"', "both": "it's \"x\"", "a.b": "dotted"}
    with tracking.tracked_run(cfg, odd, run_name="odd"):
        tracking.log_history("finetune", {"loss": [3.0, 2.0, 1.0]})
    (found,) = tracking.find_runs(cfg, odd)
    assert found.info.run_name == "odd"
    history = mlflow.MlflowClient().get_metric_history(found.info.run_id, "finetune_loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0), (2, 1.0)]
    assert tracking.find_runs(cfg, {**odd, "study_name": "its"}) == []


def test_a_store_that_fails_mid_training_loses_no_epoch(tmp_path, monkeypatch, capsys):
    # Curves are logged as each epoch ends; a store that does not answer then must not stop
    # or slow an hours-long training: no more live calls, the curve is logged at the end.
    cfg = settings_from(compose_config([f"paths.root={tmp_path}"])).tracking
    curves = tracking.EpochCurves("finetune")
    with tracking.tracked_run(cfg, {}, run_name="blip") as active:
        curves.epoch_ended(0, {"loss": 3.0})
        with monkeypatch.context() as patched:
            patched.setattr(mlflow, "log_metrics", lambda *a, **k: 1 / 0)
            curves.epoch_ended(1, {"loss": 2.0})
        curves.epoch_ended(2, {"loss": 1.0})  # the store answers again: not asked until the end
        assert curves.logged == {0}
        curves.finish({"loss": [3.0, 2.0, 1.0]})
    history = mlflow.MlflowClient().get_metric_history(active.info.run_id, "finetune_loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 3.0), (1, 2.0), (2, 1.0)]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["warning: tracking: epoch 2's finetune metrics not logged "
                        "(ZeroDivisionError); the rest of the curve is logged when the run "
                        "finishes"]
