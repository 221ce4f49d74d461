"""Shared fixtures: the real Hydra config, composed and shrunk to tiny models and data."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

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


T = TypeVar("T")


def free_port() -> int:
    """Returns a loopback TCP port free right now (the suite runs tests in parallel)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Returns condition()'s first truthy value, polled until timeout seconds have passed.

    Tests wait on the event they need (a file, a run in the store, a server answering), never
    on a fixed sleep that a faster or slower machine breaks."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
