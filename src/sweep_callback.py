"""A ``--multirun`` sweep as one MLflow parent run, with every job nested under it.

Hydra calls ``SweepRun`` (registered in conf/config.yaml under ``hydra.callbacks``) at the
sweep's start, where it opens the parent run and writes its id into the sweep folder, and
at its end, where it attaches the sweep's table and plots, names any failed job and closes
the parent.  Jobs read the id from the sweep folder (``parent_tag``), so nesting works with
any launcher, jobs in this process or in others, on this machine or on a shared file system.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import shlex
from pathlib import Path
from typing import Any

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from src import interrupt, tracking
from src.config import TrackingConfig
from src.locks import file_lock

PARENT_FILE = "mlflow_parent_run_id"
SWEEP_ID_FILE = "sweep_id"  # only in the folder of a sweep that continues an interrupted one
SKIPPED_IN_NAME = ("paths.", "tracking.", "hydra.")  # where, not what: left out of the name


def sweep_id(sweep_dir: Path) -> str:
    """Returns the sweep's id as its jobs tag it: '<date>_<time>' of its folder, or the id of
    the interrupted sweep it continues (written into the folder at its start)."""
    try:
        return (sweep_dir / SWEEP_ID_FILE).read_text().strip()
    except OSError:
        return f"{sweep_dir.parent.name}_{sweep_dir.name}"


def parent_tag(sweep_dir: Path) -> dict[str, str]:
    """Returns the MLflow tag that nests a job under its sweep's parent run, if there is one."""
    try:
        return {"mlflow.parentRunId": (sweep_dir / PARENT_FILE).read_text().strip()}
    except OSError:
        return {}


class SweepRun(Callback):
    """Hydra callback: opens the sweep's parent run, and at the end summarises and closes it.

    The same --multirun command after an interruption (Ctrl-C, SIGTERM, SIGKILL) continues
    that sweep (tracking.continue_interrupted): its parent run and id are taken over, so its
    finished jobs are not run again and its interrupted job goes on in its run
    (see tracking.interrupted_sweep, tracking.finished_job).
    """

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.identity = ""
        self.continuable = True  # tracking.continue_interrupted
        self._live = contextlib.ExitStack()  # held while this sweep runs (tracking.HOST)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its lock (the submitit launcher ships the callbacks to each job,
        where only the sweep's own process holds the lock)."""
        return {**self.__dict__, "_live": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._live = contextlib.ExitStack()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        interrupt.raise_on_sigterm()  # SIGTERM ends the parent run KILLED, as Ctrl-C does
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tracking_cfg = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
        experiment_id = tracking.connect(tracking_cfg)
        overrides = list(config.hydra.overrides.task)
        command = shlex.join(["python", "-m", "src.run", "--multirun", *overrides])
        commit = tracking.git_commit()
        self.continuable = tracking_cfg.continue_interrupted
        key = hashlib.sha256(f"{experiment_id} {command}".encode()).hexdigest()[:16]
        runs_dir = Path(config.paths.cache_dir) / "runs"
        locks = runs_dir / f"sweep-{key}"
        with file_lock(locks.with_suffix(".lock")):
            with file_lock(locks.with_suffix(".live"), wait=False) as nobody_running:
                pass
            left, dead = tracking.interrupted_sweep(tracking_cfg, command, commit,
                                                    not nobody_running) \
                if tracking_cfg.continue_interrupted else (None, None)
            if left:
                refuse_while_jobs_run(left, runs_dir)
                self._take_over(left, sweep_dir, commit)
            else:
                shown = [o for o in overrides if not o.lstrip("+~").startswith(SKIPPED_IN_NAME)]
                (sweep_dir / SWEEP_ID_FILE).unlink(missing_ok=True)  # a reused folder's
                self.identity = sweep_id(sweep_dir)
                self.run_id = mlflow.MlflowClient().create_run(
                    experiment_id, run_name=f"sweep {' '.join(shown)}".strip(),
                    tags={**tracking_cfg.tags, "role": "sweep", "sweep_id": self.identity,
                          "command": command, "git_commit": commit, "host": tracking.HOST,
                          "user": tracking.USER}).info.run_id
            if dead:  # killed under another commit: closed, not continued
                tracking.close_run(dead, f"its process is gone; sweep run {self.run_id} has "
                                         "the same command under another commit")
            self._live.enter_context(file_lock(locks.with_suffix(".live"), shared=True))
        (sweep_dir / PARENT_FILE).write_text(self.run_id)
        atexit.register(self._close, RunStatus.KILLED)  # Ctrl-C skips on_multirun_end

    def _take_over(self, left: mlflow.entities.Run, sweep_dir: Path, commit: str) -> None:
        """Makes this sweep the interrupted one: its parent run, RUNNING again on this host,
        and its id."""
        client = mlflow.MlflowClient()
        self.run_id, self.identity = left.info.run_id, left.data.tags["sweep_id"]
        (sweep_dir / SWEEP_ID_FILE).write_text(self.identity)
        client.update_run(self.run_id, RunStatus.to_string(RunStatus.RUNNING))
        for key, value in {"resumes": int(left.data.tags.get("resumes", 0)) + 1,
                           "host": tracking.HOST, "git_commit": commit}.items():
            client.set_tag(self.run_id, key, str(value))  # where it lives now
        if "closed_because" in left.data.tags:
            client.delete_tag(self.run_id, "closed_because")
        finished = [r for r in tracking.latest_attempts(jobs_of(left)) if
                    r.info.status == "FINISHED"]
        how = "interrupted" if left.info.status == "KILLED" else \
            "left RUNNING by a process that is gone"
        print(f"sweep {self.identity}: continuing it (MLflow run {self.run_id}), {how}; "
              f"{len(finished)} finished job{'s' * (len(finished) != 1)} not run again",
              flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        from src.summary import sweep_report  # matplotlib only when a sweep ends

        sweep_dir = Path(config.hydra.sweep.dir)
        identity = self.identity
        client = mlflow.MlflowClient()
        # a job failed, then run again: its newest run
        jobs = tracking.latest_attempts(jobs_of(client.get_run(self.run_id)))
        failed = [r for r in jobs if r.info.status != "FINISHED"]
        try:
            text, files = sweep_report(jobs, sweep_dir / "summary", identity)
            (sweep_dir / "summary" / "summary.md").write_text(text + "\n")
            print(text, flush=True)
            for path in [*files, sweep_dir / "summary" / "summary.md"]:  # where src.summary
                client.log_artifact(self.run_id, str(path), artifact_path="summary")  # puts them
            client.set_tag(self.run_id, "mlflow.note.content", text.splitlines()[0])
        except (ValueError, OSError) as error:  # no plot must hide the sweep's outcome
            print(f"sweep {identity}: no summary ({error})")
        # Tags, not metrics: the UI's default charts would plot these counts for every sweep.
        client.set_tag(self.run_id, "jobs_finished", str(len(jobs) - len(failed)))
        client.set_tag(self.run_id, "jobs_failed", str(len(failed)))
        parent, status = self.run_id, RunStatus.FAILED if failed else RunStatus.FINISHED
        self._close(status)
        if failed:
            raise SystemExit(failed_line(identity, failed, len(jobs), swept_keys(config)))
        print(f"sweep {identity}: {len(jobs)} jobs finished; table and plots on its MLflow "
              f"run {parent}")

    def _close(self, status: int) -> None:
        if self.run_id is not None:
            mlflow.MlflowClient().set_terminated(self.run_id, RunStatus.to_string(status))
            self.run_id = None
            if status == RunStatus.KILLED and self.continuable:
                print(f"sweep {self.identity} interrupted: the same command continues it, "
                      "without running its finished jobs again", flush=True)
        self._live.close()  # only once the parent run has ended


def jobs_of(parent: mlflow.entities.Run) -> list[mlflow.entities.Run]:
    """Returns the job runs nested under a sweep's parent run (its id may be another's too:
    a sweep folder given twice)."""
    identity = parent.data.tags["sweep_id"]
    return [r for r in mlflow.search_runs(
        [parent.info.experiment_id], output_format="list",
        filter_string=f"tags.sweep_id = '{identity}'")
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def refuse_while_jobs_run(parent: mlflow.entities.Run, runs_dir: Path) -> None:
    """Refuses to continue a sweep with a job still running: on another host (a Slurm job
    outliving its launcher) or on this one (its <config_hash>.live held, see
    experiment.tracked): it would run a second time beside itself."""
    for job in jobs_of(parent):
        if job.info.status != "RUNNING":
            continue
        tags = job.data.tags
        elsewhere = tags.get("host") != tracking.HOST
        if not elsewhere:
            with file_lock(runs_dir / f"{tags.get('config_hash')}.live", wait=False) as free:
                if free:
                    continue
        where = f"on {tags.get('host')}" if elsewhere else "here"
        raise SystemExit(
            f"error: sweep {parent.data.tags['sweep_id']}: job {tags.get('sweep_job', '?')} "
            f"(run {job.info.run_id}) is still running {where}; let it end or stop it, or "
            "start a new sweep with tracking.continue_interrupted=false")


def swept_keys(config: DictConfig) -> set[str]:
    """Returns the keys the sweep varies, e.g. {'prune', 'prune.rate'}."""
    parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    return {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def failed_line(identity: str, failed: list[mlflow.entities.Run], total: int,
                keys: set[str]) -> str:
    """Returns one line naming each failed job by number, its swept values and its reason."""
    parts = []
    for run in sorted(failed, key=lambda r: int(r.data.tags.get("sweep_job", "0") or 0)):
        tags = run.data.tags
        try:
            words = shlex.split(tags.get("command", ""))
        except ValueError:  # a command joined without quoting
            words = tags.get("command", "").split()
        values = [o for o in words if o.split("=", 1)[0].lstrip("+~") in keys]
        reason = tags.get("failure_reason", run.info.status).splitlines()[0]
        parts.append(f"#{tags.get('sweep_job', '?')} {' '.join(values)} ({reason})")
    return f"sweep {identity}: {len(failed)} of {total} jobs failed: " + "; ".join(parts)
