"""The command line of one compression experiment:
``python -m src.run prune=flat prune.rate=0.7 quant=int8``.

``main`` is the Hydra entry point: it runs ``src.experiment.run`` and returns the configured
objective for sweepers. TensorFlow is imported only inside it, so overrides Hydra refuses fail
without paying TensorFlow's import (about 7 s here).
"""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from src import hydra_errors, interrupt, onednn, sweep_callback, tracking
from src.config import ConfigError, TrackingConfig, check_top_level, register_resolvers
from src.data import DataError


def sweep_tags() -> dict[str, str]:
    """Returns the job's command line, and its sweep id and number under --multirun."""
    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    # The command that reproduces this very job (one point of a sweep, as a single run).
    tags = {"command": shlex.join(["python", "-m", "src.run", *hydra_cfg.overrides.task])}
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return tags
    sweep_dir = Path(hydra_cfg.sweep.dir)
    return {**tags, "sweep_id": sweep_callback.sweep_id(sweep_dir),
            "sweep_job": str(hydra_cfg.job.num), **sweep_callback.parent_tag(sweep_dir)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Hydra entry point: runs one experiment and returns the configured objective.

    Under --multirun a failed job returns NaN after recording its FAILED run (tags sweep_id,
    sweep_job, failure_reason), so the sweep goes on; the sweep callback reports it at the end.
    """
    hydra_errors.job_started()
    interrupt.raise_on_sigterm()
    tags = sweep_tags()
    caution = onednn.warning(cfg.prune.method, cfg.prune.finetune_epochs)
    if caution:
        print(caution, file=sys.stderr, flush=True)
    try:
        check_top_level(cfg)  # a sweep's job: recorded FAILED like any refused setting
        refuse_schema_choice()
        from src.experiment import run  # TensorFlow: only once the overrides are accepted

        # Nested: a sweep parent run, when the sweep callback keeps one active, holds the jobs.
        return run(cfg, extra_tags=tags, nested="sweep_id" in tags)[cfg.objective]
    except KeyboardInterrupt as stop:
        print(f"interrupted ({stop or 'Ctrl-C'}): the MLflow run ended as KILLED",
              file=sys.stderr)
        sys.exit(interrupt.exit_code(stop))
    except Exception as error:
        if "sweep_id" not in tags:
            if isinstance(error, (ConfigError, DataError)):
                raise SystemExit(f"error: {error}") from None
            raise
        message = str(error) if isinstance(error, (ConfigError, DataError)) \
            else f"{type(error).__name__}: {error}"
        print(f"error: job {tags['sweep_job']}: {message}", file=sys.stderr, flush=True)
        record_failed_job(cfg, tags, f"{type(error).__name__}: {error}")
        return math.nan


def refuse_schema_choice() -> None:
    """Refuses `quant=schema` and the like: Hydra lists each group's typed schema among its
    options, and choosing it would run silently on the schema's defaults."""
    if not HydraConfig.initialized():
        return
    for group, choice in HydraConfig.get().runtime.choices.items():
        if choice == "schema" and not group.startswith("hydra"):
            raise ConfigError(f"{group}=schema: the schema behind the {group} options, "
                              f"not one of them (see conf/{group}/)")


def record_failed_job(cfg: DictConfig, tags: dict[str, str], reason: str) -> None:
    """Records a sweep job that failed before its MLflow run opened as a FAILED run."""
    try:
        resolved = OmegaConf.to_container(cfg.tracking, resolve=True)  # within the whole config
        tracking_cfg = OmegaConf.to_object(OmegaConf.merge(
            OmegaConf.structured(TrackingConfig), resolved))
        tracking.record_failure(tracking_cfg, tags, reason,
                                run_name=f"sweep job {tags['sweep_job']} failed")
    except Exception as error:  # noqa: BLE001 - the job's own error was printed already
        print(f"error: job {tags['sweep_job']} could not be recorded in MLflow ({error})",
              file=sys.stderr)


if __name__ == "__main__":
    register_resolvers()
    hydra_errors.run(main)
