"""Shared fixtures: the real Hydra config, composed and shrunk to tiny models and data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
from omegaconf import DictConfig

from src.config import compose_config

# Small enough that a whole experiment (train, prune, convert, evaluate) takes seconds.
# The data and model entries give way when a test picks another option of that group.
TINY = {
    "data": ["data=synthetic", "data.n_train=160", "data.n_test=64", "data.num_classes=4"],
    "model": ["model=resnet8", "model.filters=[4,8,8]"],
    "train": ["train.epochs=1", "train.batch_size=32", "train.verbose=0"],
}


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Returns a function composing a tiny config whose files all live under tmp_path."""

    def make(*overrides: str, tiny: bool = True) -> DictConfig:
        base = [f"paths.root={tmp_path}"]
        for group, entries in TINY.items():
            if tiny and not any(o.startswith(f"{group}=") for o in overrides):
                base += entries
        return compose_config(base + list(overrides))

    return make


def runs_of(cfg: DictConfig) -> list[mlflow.entities.Run]:
    """Returns every run in the config's MLflow experiment, newest first."""
    mlflow.set_tracking_uri(cfg.tracking.uri)
    return mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")


def assert_png(path: Path) -> None:
    """Asserts that path is a real, non-trivial PNG image."""
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000, path
