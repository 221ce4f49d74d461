"""Shared fixtures: the real Hydra config, composed and shrunk to tiny models and data."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import mlflow
import pytest
from omegaconf import DictConfig

from src import baseline
from src.config import PROJECT_ROOT, compose_config

# Small enough that a whole experiment (train, prune, convert, evaluate) takes seconds.
# The data and model entries give way when a test picks another option of that group.
TINY = {
    "data": ["data=synthetic", "data.n_train=160", "data.n_test=64", "data.num_classes=4"],
    "model": ["model=resnet8", "model.filters=[4,8,8]"],
    "train": ["train.epochs=1", "train.batch_size=32", "train.verbose=0"],
}


# The slowest tests, slowest first (node id prefixes; see pytest --durations). They start
# first, so the two xdist workers (--dist loadgroup) end together rather than one of them
# running a long test alone at the end. Only the order changes; a test missing here runs
# after these, in file order.
SLOW_FIRST = (
    "tests/test_model_file.py::test_multirun_shares_one_loaded_baseline",  # and its group
    "tests/test_workers.py::test_killed_worker_trial_is_retried_at_once",
    "tests/test_isolation.py::test_a_trial_killed_by_a_signal_fails_alone",
    "tests/test_sweep.py::test_multirun_shares_one_baseline",  # and its group
    "tests/test_workers.py::test_two_workers_share_one_postgresql_study",
    "tests/test_distill.py::test_distillation_from_another_cached_baseline_with_tfmot",
    "tests/test_run.py::test_every_model_runs[mobilenetv2]",
    "tests/test_train.py::test_killed_baseline_training_resumes_at_epoch_3",
    "tests/test_finetune_resume.py::test_killed_finetuning_resumes_at_epoch_3",
    "tests/test_run.py::test_every_model_runs[mobilenetv2_cifar]",
    "tests/test_search.py::test_a_three_objective_study",  # two trials, each in its process
    "tests/test_cli.py::test_a_bad_multirun_job_is_recorded_and_the_others_run",
    "tests/test_search.py::test_pareto_study_and_resume_by_name",
    "tests/test_cli.py::test_readme_quick_try",
    "tests/test_search.py::test_early_stopping_study_records_trials_and_nested_runs",
    "tests/test_results.py::test_collect_reads_a_server_with_proxied_artifacts",
    "tests/test_results.py::test_runs_differing_in_one_setting",
    "tests/test_prune.py::test_tfmot_reaches_final_sparsity_and_leaves_depthwise_dense",
    "tests/test_speed.py::test_every_quantization_mode",
    "tests/test_config.py::test_a_fixed_value_sweeps_with_the_group_options",
    "tests/test_results.py::test_collect_then_check_reevaluates_every_row",
    "tests/test_run.py::test_same_config_and_seed_give_the_same_model",
    "tests/test_workers.py::test_ctrl_c_and_sigterm_end_the_run_as_killed",
    "tests/test_ui.py",
    "tests/test_channel.py::test_channel_run_is_smaller_and_logs_its_table",
    "tests/test_workers.py::test_failure_rate_cap",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Puts SLOW_FIRST first, and each module's users of a module-scoped fixture in one group.

    The group (xdist_group) keeps them on one xdist worker, so the fixture is set up once.
    """
    rank = {}
    for item in items:
        rank[item] = next((i for i, prefix in enumerate(SLOW_FIRST)
                           if item.nodeid.startswith(prefix)), len(SLOW_FIRST))
        defs = item._fixtureinfo.name2fixturedefs.values()  # noqa: SLF001 - pytest offers no API
        if any(d[-1].scope in ("module", "class", "package") for d in defs if d):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    groups: dict[str, int] = {}
    for item in items:
        if mark := item.get_closest_marker("xdist_group"):
            groups[mark.args[0]] = min(groups.get(mark.args[0], rank[item]), rank[item])
    order = {item: i for i, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple[int, int]:
        mark = item.get_closest_marker("xdist_group")
        return (groups[mark.args[0]] if mark else rank[item], order[item])

    items.sort(key=key)


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


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """Returns an empty MLflow sqlite store made once per test process.

    Creating one runs MLflow's schema migrations, several seconds on 2 busy cores; a copy
    opens at once.
    """
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("mlflow-template")
    store = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"))
    store.engine.dispose()
    return folder / "mlflow.db"


def seed_mlflow_store(root: Path, template: Path) -> None:
    """Puts an empty MLflow store where paths.root=root keeps it (mlruns/mlflow.db)."""
    target = root / "mlruns" / "mlflow.db"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, target)


@pytest.fixture(autouse=True)
def empty_mlflow_store(request, mlflow_template: Path) -> None:
    """Gives a test's tmp_path (its paths.root) its own empty MLflow store, copied."""
    if "tmp_path" in request.fixturenames:
        seed_mlflow_store(request.getfixturevalue("tmp_path"), mlflow_template)


@pytest.fixture(scope="session")
def baseline_store(tmp_path_factory) -> Path:
    """Returns this test process's folder of dense baselines trained so far, by cache key."""
    return tmp_path_factory.mktemp("baseline-store")  # per xdist worker: its own basetemp


@pytest.fixture(autouse=True)
def shared_baselines(request, monkeypatch, baseline_store: Path) -> None:
    """Copies a dense baseline this process already trained into the test's own cache.

    Many tests need the same tiny baseline (TINY's data, model and recipe) and would each
    train it again in their own folder. The cache key covers everything that shapes the
    weights, so the first test to need a key trains it for real and keeps a copy in
    baseline_store; later ones get that copy in their own cache folder, reported exactly as
    a training would be (reused=False). Tests marked fresh_baseline always train.
    """
    if request.node.get_closest_marker("fresh_baseline"):
        return
    train_and_store = baseline._train_and_store

    def copy_or_train(entry: Path, key: str, data, model_cfg, train_cfg, callbacks):
        kept = baseline_store / key
        if not kept.exists():
            trained = train_and_store(entry, key, data, model_cfg, train_cfg, callbacks)
            staging = baseline_store / f".{key}.tmp"
            shutil.copytree(entry, staging)
            staging.rename(kept)
            return trained
        if entry.exists():
            shutil.rmtree(entry)  # a corrupt entry the caller found
        shutil.copytree(kept, entry)
        copied = baseline._load(entry, key)
        copied.reused = False
        if copied.test_fingerprint != data.fingerprint:  # as load_or_train does
            copied.test_accuracy = baseline.evaluate(copied.model, data.x_test, data.y_test)
            copied.test_fingerprint = data.fingerprint
        return copied

    monkeypatch.setattr(baseline, "_train_and_store", copy_or_train)


def runs_of(cfg: DictConfig) -> list[mlflow.entities.Run]:
    """Returns every run in the config's MLflow experiment, newest first."""
    mlflow.set_tracking_uri(cfg.tracking.uri)
    return mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")


def tflite_operators(flatbuffer: bytes) -> list[str]:
    """Returns the operator names of a TFLite model, in execution order."""
    from ai_edge_litert.interpreter import Interpreter

    return [op["op_name"] for op in Interpreter(model_content=flatbuffer)._get_ops_details()]


def assert_png(path: Path) -> None:
    """Asserts that path is a real, non-trivial PNG image."""
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 2000, path


T = TypeVar("T")

# For the MLflow servers tests start: MLflow 3's server also starts a job runner for its GenAI
# jobs by default, one more process importing MLflow while the test waits, and none uses it.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


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


# Loaded by the first run of kill_after_epoch_2_and_rerun (a sitecustomize on its PYTHONPATH):
# after saving epoch 2 under the watched folder it waits to be killed. Tiny epochs follow each
# other within one poll of the folder, so without the wait epoch 2's entry could be replaced by
# epoch 3's, or the run end, before the test saw it.
PAUSE_AFTER_EPOCH_2 = """
import os, time
from pathlib import Path
import src.checkpoint

_save = src.checkpoint.EpochCheckpoint.save

def save(self, epoch):
    entry = _save(self, epoch)
    if epoch == 2 and self.folder.parent.resolve() == Path(os.environ["PAUSE_UNDER"]).resolve():
        time.sleep(600)
    return entry

src.checkpoint.EpochCheckpoint.save = save
"""


def kill_after_epoch_2_and_rerun(overrides: list[str], checkpoints: Path) -> str:
    """Returns the output of `src.run` run again after a first run of the same overrides was
    SIGKILLed as soon as its epoch-2 checkpoint appeared under checkpoints (``*.ckpt/``)."""
    command = [sys.executable, "-m", "src.run", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory(prefix="pause-hook-") as hook:
        (Path(hook) / "sitecustomize.py").write_text(PAUSE_AFTER_EPOCH_2)
        paths = [hook, str(PROJECT_ROOT), env.get("PYTHONPATH", "")]
        paused = {**env, "PAUSE_UNDER": str(checkpoints),
                  "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
        first = subprocess.Popen(command, cwd=PROJECT_ROOT, env=paused,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: first.poll() is not None
                       or list(checkpoints.glob("*.ckpt/epoch-0002")), 300,
                       "an epoch-2 checkpoint")
            assert first.poll() is None, "the first run ended before it could be killed"
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    assert [p.name for p in checkpoints.glob("*.ckpt/epoch-*")] == ["epoch-0002"]
    second = subprocess.run(command, cwd=PROJECT_ROOT, env=env, text=True, timeout=300,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert second.returncode == 0, second.stdout[-3000:]
    return second.stdout
