"""The command line as a user meets it: the README's quick try, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from src.config import PROJECT_ROOT
from tests.conftest import compose_config, runs_of


def cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "src.run", f"paths.root={tmp_path}", *overrides],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env=env)


def no_run_left_running(tmp_path: Path) -> bool:
    db = tmp_path / "mlruns" / "mlflow.db"
    if not db.exists():
        return True
    runs = runs_of(compose_config([f"paths.root={tmp_path}"]))
    return all(r.info.status != "RUNNING" for r in runs)


def test_readme_quick_try(tmp_path):
    done = cli(tmp_path, "experiment=quick", "prune=flat", "prune.rate=0.7", "quant=int8")
    assert done.returncode == 0, done.stderr[-2000:]
    (tracked,) = runs_of(compose_config([f"paths.root={tmp_path}"]))
    assert tracked.info.status == "FINISHED"
    assert abs(tracked.data.metrics["sparsity_global"] - 0.7) < 0.005
    artifact = Path(tracked.info.artifact_uri.removeprefix("file://")) / "model.tflite"
    assert tracked.data.metrics["tflite_bytes"] == artifact.stat().st_size


def make_bad_archive(tmp_path: Path) -> Path:
    archive = tmp_path / "escape.tar"
    evil = tmp_path / "evil.png"
    evil.write_bytes(b"x")
    with tarfile.open(archive, "w") as tar:
        tar.add(evil, arcname="../../evil.png")
    return archive


def make_empty_class(tmp_path: Path) -> Path:
    for split in ("train", "test"):
        (tmp_path / "imgs" / split / "cat").mkdir(parents=True)
    return tmp_path / "imgs"


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["prune=flat", "prune.rate=1.5"], "prune.rate: must be in [0, 1)"),
        (["prune=flat", "prune.rate=abc"], "full_key: prune.rate"),
        (["prune=magic"], "Could not find 'prune/magic'"),
        (["train.epochs=0"], "train.epochs: must be >= 1"),
        (["data.path={tmp}/missing.tar.gz"], "data.path: {tmp}/missing.tar.gz does not exist"),
        (["data.path={tmp}/corrupt.tar.gz"], "data.path: {tmp}/corrupt.tar.gz is not a readable"),
        (["data=image_folder", "data.path={tmp}/imgs"], "class folder train/cat has no images"),
        (["data.path={tmp}/escape.tar"], "has an unsafe member refused"),
    ],
    ids=["rate-range", "rate-type", "unknown-option", "zero-epochs", "missing-path",
         "corrupt-archive", "empty-class", "path-traversal"],
)
def test_bad_input_fails_with_one_clear_line(tmp_path, overrides, expected):
    (tmp_path / "corrupt.tar.gz").write_bytes(b"\x1f\x8b\x08 definitely not gzip")
    make_bad_archive(tmp_path)
    make_empty_class(tmp_path)
    done = cli(tmp_path, *[o.format(tmp=tmp_path) for o in overrides])
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if expected.format(tmp=tmp_path) in line]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "Epoch 1" not in done.stdout  # failed before any training
    assert no_run_left_running(tmp_path)
