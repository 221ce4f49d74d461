"""The MLflow UI, opened in headless Chromium, shows a sweep's runs by their descriptive names."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from src import report, tracking
from src.config import settings_from
from tests.conftest import MLFLOW_SERVER_ENV

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

# CI sets PRUNESWEEP_REQUIRE_BROWSER=1 (it installs both), so a missing browser fails there.
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists())
                       and not os.environ.get("PRUNESWEEP_REQUIRE_BROWSER"),
                       reason="needs Debian's chromium and chromium-driver"),
]


def small_sweep(make_cfg) -> tuple[str, str, list[str]]:
    """Logs a sweep parent with four nested jobs, named as src.run names them.

    Returns the tracking URI, the experiment id and the job names.
    """
    cfg = make_cfg("quant=int8")
    settings = settings_from(cfg)
    experiment_id = tracking.connect(settings.tracking)
    client = mlflow.MlflowClient()
    parent = client.create_run(experiment_id, run_name="sweep prune=flat,layer prune.rate=0.3,0.7",
                               tags={"role": "sweep", "sweep_id": "test"})
    names = []
    for job, (method, rate) in enumerate([(m, r) for m in ("flat", "layer") for r in (0.3, 0.7)]):
        job_settings = settings_from(make_cfg(f"prune={method}", f"prune.rate={rate}",
                                              "quant=int8"))
        name = report.run_name(job_settings)
        run = client.create_run(experiment_id, run_name=name, tags={
            "mlflow.parentRunId": parent.info.run_id, "sweep_id": "test", "sweep_job": str(job)})
        client.log_metric(run.info.run_id, "tflite_accuracy", 0.8 - rate / 2)
        client.log_metric(run.info.run_id, "tflite_zip_kb", 60 * (1 - rate))
        client.set_terminated(run.info.run_id)
        names.append(name)
    client.set_terminated(parent.info.run_id)
    return settings.tracking.uri, experiment_id, names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_ui(make_cfg, tmp_path):
    """Yields (base URL, experiment id, job names) of `mlflow ui` serving a small sweep."""
    uri, experiment_id, names = small_sweep(make_cfg)
    port = free_port()
    log = (tmp_path / "mlflow-ui.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **MLFLOW_SERVER_ENV})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240  # a busy 2-core machine needs a minute or more
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "mlflow-ui.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(0.5)
        yield base, experiment_id, names
    finally:  # the server's own process group: the CLI and the uvicorn process it starts
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def chromium(tmp_path: Path):
    """Returns headless Chromium driven through Debian's chromedriver (nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1400,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_runs_page_shows_the_descriptive_names(mlflow_ui, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, experiment_id, names = mlflow_ui
    browser = chromium(tmp_path)
    try:
        browser.get(f"{base}/#/experiments/{experiment_id}/runs")
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: "sweep prune=flat,layer" in b.find_element(By.TAG_NAME, "body").text)
        # Jobs are nested under the sweep's row: expand it (the run-name cell's toggle).
        for toggle in browser.find_elements(
                By.CSS_SELECTOR, "button[data-component-id*='runnamecellrenderer']"):
            toggle.click()
        wait.until(lambda b: all(n in b.find_element(By.TAG_NAME, "body").text for n in names))
        browser.save_screenshot(str(tmp_path / "runs.png"))
        text = browser.find_element(By.TAG_NAME, "body").text
    finally:
        browser.quit()
    assert sorted(names) == ["resnet8 flat 0.30 int8", "resnet8 flat 0.70 int8",
                             "resnet8 layer 0.30 int8", "resnet8 layer 0.70 int8"]
    assert all(name in text for name in names)
    assert report.EXPERIMENT_NOTE[:40] in text  # the experiment's description is shown
    assert (tmp_path / "runs.png").stat().st_size > 10_000
