"""``python -m src.search``: the Hydra entry point of a search worker."""

from __future__ import annotations

import sys

import hydra
import optuna
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from src import hydra_errors, interrupt
from src.config import ConfigError, check_top_level, register_resolvers
from src.data import DataError
from src.search.worker import SearchAborted, run_search


@hydra.main(version_base="1.3", config_path="../../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    """Runs the configured Optuna search; exits 1 on bad settings, 130/143 when stopped."""
    hydra_errors.job_started()
    # Optuna's own INFO line per trial would repeat ours (src.search.worker.trial_line).
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    interrupt.raise_on_sigterm()
    task_overrides = list(HydraConfig.get().overrides.task)
    replay = [o for o in task_overrides if not o.lstrip("~+").startswith("search")]
    try:
        check_top_level(cfg)
        run_search(cfg, lambda extra: hydra.compose("config", overrides=task_overrides + extra),
                   replay)
    except (ConfigError, DataError, SearchAborted) as error:
        raise SystemExit(f"error: {error}") from None
    except KeyboardInterrupt as stop:
        print(f"interrupted ({stop or 'Ctrl-C'}): the current trial failed (to be retried) and "
              "this worker's MLflow runs ended as KILLED", file=sys.stderr)
        sys.exit(interrupt.exit_code(stop))


if __name__ == "__main__":
    register_resolvers()
    hydra_errors.run(main)
