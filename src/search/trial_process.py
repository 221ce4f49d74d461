"""Each trial in a process of its own (``search.trial_process: true``, the default).

TensorFlow can fail natively (seen: glibc's "double free or corruption" and SIGSEGV from
heap corruption in its oneDNN convolution gradient, fine-tuning some channel-pruned
ResNet-8s); in the worker's process that killed the whole study. Here the worker composes
and checks a trial's config, writes it to a spec file
and runs ``python -m src.search.trial_process SPEC``, which trains with fresh TensorFlow and
LiteRT state and memory, nests its MLflow run under the worker's, reports per-epoch
estimates to the same Optuna trial through the study's storage, and writes its metrics (or
why it stopped or failed) to a result file. A child killed by a signal fails its trial only
("trial process killed by signal SIGSEGV"), its run ends FAILED, and the worker goes on.

Stops: Ctrl-C or SIGTERM to the worker is passed on to the child, which ends its run KILLED
like ``src.run`` does; the worker then fails and retries the trial as before. A worker
SIGKILLed takes its child with it (Linux's parent-death signal), leaving what a dead worker
leaves (``orphans``). An in-memory study cannot be shared with a child: it runs in-process.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy

from src import interrupt, onednn, tracking
from src.config import PROJECT_ROOT, TrackingConfig
from src.search.settings import SearchConfig

# Test hook: the trial with this number kills its own process with SIGSEGV while it trains,
# as TensorFlow crashing natively would.
CRASH_ENV = "PRUNESWEEP_CRASH_TRIAL"
STOP_GRACE_SECONDS = 60  # for a stopped child to end its run (it may be inside a conversion)
PARENT_RUN_TAG = "mlflow.parentRunId"  # what MLflow's nested runs carry


class TrialProcessFailed(RuntimeError):
    """The trial's process failed; the message is the trial's failure reason."""


@dataclass
class TrialJob:
    """What a trial's process needs: the resolved config and where to report and log."""

    config: dict[str, Any]
    trial_id: int  # the storage's id, to report to the trial from the child
    trial_number: int
    tags: dict[str, str]
    name_prefix: str
    parent_run_id: str | None


def isolated(search: SearchConfig) -> bool:
    """Returns whether the study's trials run in processes of their own."""
    url = sqlalchemy.engine.make_url(search.storage)
    in_memory = url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")
    return search.trial_process and not in_memory


def run_in_child(job: TrialJob, tracking_cfg: TrackingConfig) -> dict[str, float]:
    """Returns the metrics of the trial's run, trained in a child process.

    Raises tracking.StoppedEarly when the trial was stopped early, TrialProcessFailed when
    it failed (its exception, a signal, an exit code), KeyboardInterrupt when stopped.
    """
    with tempfile.TemporaryDirectory(prefix="trial-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({**asdict(job), "result": str(result),
                                    "parent_pid": os.getpid()}))
        # The worker's cwd (relative paths in the config) and this checkout's src package.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            # oneDNN off for a channel fine-tuning, which it crashed on (src/onednn.py)
            **onednn.child_env(job.config["prune"]["method"],
                               job.config["prune"]["finetune_epochs"])}
        # Started from the main thread: Linux's parent-death signal follows the thread.
        child = subprocess.Popen([sys.executable, "-m", "src.search.trial_process", str(spec)],
                                 env=env)
        try:
            returncode = child.wait()
        except KeyboardInterrupt as stop:
            _stop(child, stop)
            _close_trial_runs(tracking_cfg, job.tags, str(stop) or "interrupted", "KILLED")
            raise
        outcome = json.loads(result.read_text()) if result.exists() else {}
    if "metrics" in outcome:  # a crash while exiting, after the result, does not count
        return outcome["metrics"]
    if "stopped_early" in outcome:
        raise tracking.StoppedEarly(outcome["stopped_early"])
    reason = outcome.get("error") or _death(returncode)
    _close_trial_runs(tracking_cfg, job.tags, reason, "FAILED")
    raise TrialProcessFailed(reason)


def _death(returncode: int) -> str:
    """Returns the failure reason of a child that left no result."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a real-time signal has no name
            name = str(-returncode)
        return f"trial process killed by signal {name}"
    return f"trial process exited with code {returncode} without a result"


def _stop(child: subprocess.Popen, stop: KeyboardInterrupt) -> None:
    """Passes the stop on to the child and waits for it to end its run; kills it if it hangs."""
    child.send_signal(interrupt.stop_signal(stop))
    try:
        while True:
            try:
                child.wait(timeout=STOP_GRACE_SECONDS)
                return
            except KeyboardInterrupt:  # a second stop: the first one is being handled
                continue
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _close_trial_runs(tracking_cfg: TrackingConfig, tags: dict[str, str], reason: str,
                      status: str) -> None:
    """Ends the trial's runs that its dead child left RUNNING."""
    keys = {key: tags[key] for key in ("study_name", "trial_number")}
    for left in tracking.running_runs(tracking_cfg, keys):
        tracking.close_run(left.info.run_id, reason, status)


# ------------------------------------------------------------------- in the child
def child_main(spec_path: str) -> None:
    """Runs one trial from its spec file and writes its outcome; exits 130/143 when stopped."""
    spec = json.loads(Path(spec_path).read_text())
    interrupt.die_with_parent(spec["parent_pid"])
    faulthandler.enable()  # a native crash prints the Python stack it happened in
    interrupt.raise_once_on_stop()  # the terminal's Ctrl-C and the worker's may both come
    try:
        outcome: dict[str, Any] = {"metrics": _train(spec)}
    except tracking.StoppedEarly as stop:
        outcome = {"stopped_early": str(stop)}
    except KeyboardInterrupt as stop:  # the run ended KILLED; the worker fails the trial
        sys.exit(interrupt.exit_code(stop))
    except Exception as error:  # noqa: BLE001 (the worker records it as the trial's failure)
        traceback.print_exc()  # what Optuna prints for a trial failing in the worker
        outcome = {"error": f"{type(error).__name__}: {error}"}
    written = Path(spec["result"] + ".part")
    written.write_text(json.dumps(outcome))
    written.replace(spec["result"])


def _train(spec: dict[str, Any]) -> dict[str, float]:
    """Returns the metrics of the trial's run, reporting epochs to its Optuna trial."""
    import optuna
    from omegaconf import OmegaConf

    from src.experiment import run
    from src.keras_env import keras
    from src.search.early_stop import early_stop_callbacks, reports_epochs
    from src.search.settings import search_settings_from
    from src.search.study import TRIAL_STOPPERS, open_storage

    cfg = OmegaConf.create(spec["config"])
    search = search_settings_from(cfg)
    callbacks: list[keras.callbacks.Callback] = []
    if reports_epochs(search):
        study = optuna.load_study(study_name=search.study_name, storage=open_storage(search),
                                  pruner=TRIAL_STOPPERS[search.early_stop.rule](search.early_stop))
        callbacks += early_stop_callbacks(optuna.trial.Trial(study, spec["trial_id"]), search, cfg)
    if os.environ.get(CRASH_ENV) == str(spec["trial_number"]):
        callbacks.append(keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda *_: os.kill(os.getpid(), signal.SIGSEGV)))
    tags = dict(spec["tags"])
    if spec["parent_run_id"]:
        tags[PARENT_RUN_TAG] = spec["parent_run_id"]
    metrics = run(cfg, callbacks=callbacks, extra_tags=tags, nested=True,
                  name_prefix=spec["name_prefix"])
    return {name: float(value) for name, value in metrics.items()}


if __name__ == "__main__":
    child_main(sys.argv[1])
