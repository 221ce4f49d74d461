"""Grid sweeps share one baseline; summaries and the MLflow server show what they logged."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from src.config import PROJECT_ROOT
from src.summary import report
from tests.conftest import TINY, assert_png, compose_config, runs_of


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory) -> Path:
    """Runs a 2x2 multirun (flat/layer x two rates) once for the tests of this module."""
    root = tmp_path_factory.mktemp("sweep")
    done = subprocess.run(
        [sys.executable, "-m", "src.run", "--multirun", f"paths.root={root}", *TINY["data"],
         *TINY["model"], *TINY["train"], "prune=flat,layer", "prune.rate=0.3,0.6"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_multirun_shares_one_baseline(sweep_root):
    runs = runs_of(compose_config([f"paths.root={sweep_root}"]))
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["baseline_key"] for r in runs}) == 1
    assert [r.data.tags["baseline_reused"] for r in runs].count("False") == 1
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    assert sorted(r.data.tags["sweep_job"] for r in runs) == ["0", "1", "2", "3"]
    assert all(r.data.tags["command"].startswith("python -m src.run ") for r in runs)
    assert any("prune=layer prune.rate=0.6" in r.data.tags["command"] for r in runs)
    combos = {(r.data.params["prune.method"], r.data.params["prune.rate"]) for r in runs}
    assert combos == {(m, r) for m in ("flat", "layer") for r in ("0.3", "0.6")}


def test_sweep_and_run_summaries_write_plots(sweep_root, capsys):
    text, files = report("sweep", "latest", [f"paths.root={sweep_root}"])
    assert text.count("| flat |") == 2 and text.count("| layer |") == 2
    (plot,) = files
    assert plot.name == "accuracy_vs_rate.png"
    assert_png(plot)
    text, files = report("run", "latest", [f"paths.root={sweep_root}"])
    assert "TFLite zipped:" in text
    assert_png(files[0])
    summaries = [r for r in runs_of(compose_config([f"paths.root={sweep_root}"]))
                 if r.data.tags.get("role") == "summary"]
    assert len(summaries) == 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_server_serves_the_runs(sweep_root):
    port = free_port()
    uri = f"sqlite:///{sweep_root}/mlruns/mlflow.db"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=prunesweep")
        experiment = json.load(urllib.request.urlopen(request, timeout=10))["experiment"]
        body = json.dumps({"experiment_ids": [experiment["experiment_id"]],
                           "filter": "tags.sweep_id != ''"}).encode()
        search = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", data=body,
                                        headers={"Content-Type": "application/json"})
        runs = json.load(urllib.request.urlopen(search, timeout=10))["runs"]
        assert len(runs) == 4
        for run in runs:
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert {"tflite_accuracy", "sparsity_global", "tflite_zip_bytes",
                    "accuracy_per_mb"} <= set(metrics)
    finally:
        server.terminate()
        server.wait(timeout=30)
