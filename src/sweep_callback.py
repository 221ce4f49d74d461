"""A ``--multirun`` sweep as one MLflow parent run, with every job nested under it.

Hydra calls ``SweepRun`` (registered in conf/config.yaml under ``hydra.callbacks``) at the
sweep's start, where it opens the parent run and writes its id into the sweep folder, and
at its end, where it attaches the sweep's table and plots, names any failed job and closes
the parent.  Jobs read the id from the sweep folder (``parent_tag``), so nesting works with
any launcher, jobs in this process or in others, on this machine or on a shared file system.
"""

from __future__ import annotations

import atexit
import shlex
from pathlib import Path
from typing import Any

import mlflow
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from mlflow.entities import RunStatus
from omegaconf import DictConfig, OmegaConf

from src import tracking
from src.config import TrackingConfig

PARENT_FILE = "mlflow_parent_run_id"
SKIPPED_IN_NAME = ("paths.", "tracking.", "hydra.")  # where, not what: left out of the name


def sweep_id(sweep_dir: Path) -> str:
    """Returns the sweep's id as its jobs tag it: '<date>_<time>' of its folder."""
    return f"{sweep_dir.parent.name}_{sweep_dir.name}"


def parent_tag(sweep_dir: Path) -> dict[str, str]:
    """Returns the MLflow tag that nests a job under its sweep's parent run, if there is one."""
    try:
        return {"mlflow.parentRunId": (sweep_dir / PARENT_FILE).read_text().strip()}
    except OSError:
        return {}


class SweepRun(Callback):
    """Hydra callback: opens the sweep's parent run, and at the end summarises and closes it."""

    def __init__(self) -> None:
        self.run_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        tracking_cfg = TrackingConfig(**OmegaConf.to_container(config.tracking, resolve=True))
        experiment_id = tracking.connect(tracking_cfg)
        overrides = list(config.hydra.overrides.task)
        shown = [o for o in overrides if not o.lstrip("+~").startswith(SKIPPED_IN_NAME)]
        run = mlflow.MlflowClient().create_run(
            experiment_id, run_name=f"sweep {' '.join(shown)}".strip(),
            tags={**tracking_cfg.tags, "role": "sweep", "sweep_id": sweep_id(sweep_dir),
                  "command": shlex.join(["python", "-m", "src.run", "--multirun", *overrides]),
                  "git_commit": tracking.git_commit()})
        self.run_id = run.info.run_id
        (sweep_dir / PARENT_FILE).write_text(self.run_id)
        atexit.register(self._close, RunStatus.KILLED)  # Ctrl-C skips on_multirun_end

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        from src.summary import sweep_report  # matplotlib only when a sweep ends

        sweep_dir = Path(config.hydra.sweep.dir)
        identity = sweep_id(sweep_dir)
        client = mlflow.MlflowClient()
        experiment_id = client.get_run(self.run_id).info.experiment_id
        jobs = [r for r in mlflow.search_runs([experiment_id], output_format="list",
                                              filter_string=f"tags.sweep_id = '{identity}'")
                if r.info.run_id != self.run_id]
        failed = [r for r in jobs if r.info.status != "FINISHED"]
        try:
            text, files = sweep_report(jobs, sweep_dir / "summary", identity)
            (sweep_dir / "summary" / "summary.md").write_text(text + "\n")
            for path in [*files, sweep_dir / "summary" / "summary.md"]:
                client.log_artifact(self.run_id, str(path))
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
