"""The command line as a user meets it: the README's quick try, and bad input."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import mlflow
import pytest

from src import tracking
from src.config import PROJECT_ROOT, settings_from
from tests.conftest import TINY, compose_config, runs_of


def cli(tmp_path: Path, *overrides: str, flags: tuple[str, ...] = (),
        quiet: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if quiet:  # as a user runs it, whatever the test runner's environment says
        env.pop("PRUNESWEEP_VERBOSE", None)
    return subprocess.run(
        [sys.executable, "-m", "src.run", *flags, f"paths.root={tmp_path}", *overrides],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env=env)


def no_run_left_running(tmp_path: Path) -> bool:
    db = tmp_path / "mlruns" / "mlflow.db"
    if not db.exists():
        return True
    runs = runs_of(compose_config([f"paths.root={tmp_path}"]))
    return all(r.info.status != "RUNNING" for r in runs)


# Start-up chatter of the libraries that must not reach the user (src/quiet.py).
NOISE = ("absl", "cuda", "cuInit", "XNNPACK", "fully_quantize", "HDF5", "legacy",
         "Assets written", "compile_metrics", "Statistics for quantized")


def test_readme_quick_try_is_tracked_and_prints_no_library_noise(tmp_path):
    done = cli(tmp_path, "experiment=quick", "prune=flat", "prune.rate=0.7", "quant=int8",
               quiet=True)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    noisy = [line for line in output.splitlines() if any(w in line for w in NOISE)]
    assert not noisy, noisy
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines[0].startswith("dense baseline: not cached, training resnet8 for 8 epochs ")
    assert lines[1] == "Epoch 1/8" and re.match(r"\d+/\d+ - .* - loss: ", lines[2])  # Keras's
    assert lines[-1].startswith("result: resnet8 flat 0.70 int8: TFLite accuracy ")
    (tracked,) = runs_of(compose_config([f"paths.root={tmp_path}"]))
    assert tracked.info.status == "FINISHED"
    assert abs(tracked.data.metrics["sparsity_global"] - 0.7) < 0.005
    # the first command's story: a trained dense model, which one-shot pruning costs accuracy
    dense = tracked.data.metrics["baseline_test_accuracy"]
    assert dense > 0.9 and dense > tracked.data.metrics["tflite_accuracy"] + 0.1
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


def make_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "corrupt.tar.gz").write_bytes(b"\x1f\x8b\x08 definitely not gzip")
    make_bad_archive(tmp_path)
    make_empty_class(tmp_path)


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


NO_SERVER = f"http://127.0.0.1:{closed_port()}"

# Refused by Hydra while composing, or by our checks (ConfigError, DataError) in main.
BAD_INPUT = {
    "rate-type": (["prune=flat", "prune.rate=abc"],
                  "error: prune.rate: Value 'abc' of type 'str' could not be converted to Float"),
    "unknown-option": (["prune=flta"], "error: prune=flta: no such option; prune has channel, "
                                       "flat, layer, none, tfmot (did you mean prune=flat?)"),
    "unknown-key": (["prune=flat", "prune.rat=0.7"],
                    "error: prune.rat: no such setting (did you mean prune.rate?)"),
    "unparsable": (["prune.rate=["], "error: prune.rate=[: no viable alternative at input '['"),
    "sweep-without-multirun": (["prune.rate=0.5,0.7"], "error: Ambiguous value for argument "
                               "'prune.rate=0.5,0.7'; 1. To use it as a list, use key=[value1,"
                               "value2]; 2. To use it as string, quote the value: key=\\'value1,"
                               "value2\\'; 3. To sweep over it, add --multirun to your command "
                               "line"),
    "unknown-top-level": (["+objectve=tflite_accuracy"],
                          "error: objectve: no such setting (did you mean objective?)"),
    "schema-option": (["quant=schema"], "error: quant=schema: the schema behind the quant"),
    "path-traversal": (["data.path={tmp}/escape.tar"], "has an unsafe member refused"),
    "rate-range": (["prune=flat", "prune.rate=1.5"], "prune.rate: must be in [0, 1)"),
    "zero-epochs": (["train.epochs=0"], "train.epochs: must be >= 1"),
    "path-for-synthetic": (["data=synthetic", "data.path={tmp}/imgs"],
                           "data.path: synthetic data reads no file"),
    "path-without-model-file": (["model.path={tmp}/model.h5"],
                                "model.path: model=resnet8 builds a new model; add model=file"),
    "missing-path": (["data.path={tmp}/missing.tar.gz"],
                     "data.path: {tmp}/missing.tar.gz does not exist"),
    "corrupt-archive": (["data.path={tmp}/corrupt.tar.gz"],
                        "data.path: {tmp}/corrupt.tar.gz is not a readable"),
    "empty-class": (["data=image_folder", "data.path={tmp}/imgs"],
                    "class folder train/cat has no images"),
    "plain-file-store": (["tracking.uri={tmp}/mlruns-folder"],  # MLflow 3.13+ refuses it
                         "tracking.uri: cannot open {tmp}/mlruns-folder (The filesystem"),
    "no-tracking-server": ([f"tracking.uri={NO_SERVER}"],
                           f"tracking.uri: cannot open {NO_SERVER} (Connection refused)"),
}
# Through the real command: Hydra's refusals (made one line by src.hydra_errors), and some of
# ours (each process costs seconds).
HYDRA_REFUSES = ["rate-type", "unknown-option", "unknown-key", "unparsable",
                 "sweep-without-multirun"]
ON_THE_COMMAND_LINE = [*HYDRA_REFUSES, "unknown-top-level", "schema-option", "path-traversal"]


@pytest.mark.parametrize("case", ON_THE_COMMAND_LINE)
def test_bad_input_fails_with_one_clear_line(tmp_path, case):
    overrides, expected = BAD_INPUT[case]
    make_bad_inputs(tmp_path)
    done = cli(tmp_path, *[o.format(tmp=tmp_path) for o in overrides])
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if expected.format(tmp=tmp_path) in line]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if case in HYDRA_REFUSES:  # before TensorFlow's import: that line is all it prints
        assert done.stderr.strip() == expected and done.returncode == 1
    assert "Epoch 1" not in done.stdout  # failed before any training
    assert no_run_left_running(tmp_path)


@pytest.mark.parametrize("case", [c for c in BAD_INPUT if c not in ON_THE_COMMAND_LINE])
def test_bad_input_ends_main_with_one_clear_line(make_cfg, tmp_path, capsys, case):
    """The same through main in-process: the SystemExit message is what the command prints."""
    from src.run import main

    overrides, expected = BAD_INPUT[case]
    make_bad_inputs(tmp_path)
    with pytest.raises(SystemExit) as ended:
        main.__wrapped__(make_cfg(*[o.format(tmp=tmp_path) for o in overrides], tiny=False))
    message = ended.value.code  # a string: Python prints it to stderr and exits with 1
    assert isinstance(message, str) and message.startswith("error: ")
    lines = [line for line in message.splitlines() if expected.format(tmp=tmp_path) in line]
    assert len(lines) == 1, message
    assert "Traceback" not in message
    assert "Epoch 1" not in capsys.readouterr().out  # failed before any training
    assert no_run_left_running(tmp_path)


def test_an_unreachable_tracking_server_is_reported_in_seconds():
    # MLflow retries a refused connection for about four minutes before it gives up.
    started = time.monotonic()
    with pytest.raises(tracking.ConfigError, match="Connection refused"):
        tracking.connect(settings_from(compose_config([f"tracking.uri={NO_SERVER}"])).tracking)
    assert time.monotonic() - started < 2 * tracking.FIRST_CONTACT_TIMEOUT
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # only the first contact


def test_only_the_first_contact_with_a_tracking_server_is_impatient(monkeypatch):
    # Later calls (after every search trial, at the end of a sweep) keep MLflow's retries.
    seen = []

    def answer(name):
        seen.append(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"))
        return mlflow.entities.Experiment("1", name, "", "active")

    monkeypatch.setattr(mlflow, "get_experiment_by_name", answer)
    monkeypatch.setattr(tracking, "_ANSWERED", set())
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    server = settings_from(compose_config(["tracking.uri=http://tracking.example:5000"]))
    assert [tracking.connect(server.tracking) for _ in range(2)] == ["1", "1"]
    assert seen == ["0", None]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # the user's own setting stays
    tracking._ANSWERED.clear()
    tracking.connect(server.tracking)
    assert seen[-1] == "3" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


TINY_CLI = [*TINY["data"], *TINY["model"], *TINY["train"]]


def sweep_runs(tmp_path: Path) -> dict[int, mlflow.entities.Run]:
    """Returns the sweep's job runs by job number (the sweep_job tag)."""
    runs = runs_of(compose_config([f"paths.root={tmp_path}"]))
    return {int(r.data.tags["sweep_job"]): r for r in runs if "sweep_job" in r.data.tags}


def test_a_bad_multirun_job_is_recorded_and_the_others_run(tmp_path):
    # Job 1 is refused before its run opens (rate + min_density > 1); 0 and 2 must still run.
    done = cli(tmp_path, *TINY_CLI, "prune=flat", "prune.rate=0.5",
               "prune.min_density=0.0,0.6,0.2", "+tracking.tags.note='two words {x}'",
               flags=("--multirun",))
    jobs = sweep_runs(tmp_path)
    assert sorted(jobs) == [0, 1, 2], done.stderr[-3000:]
    assert [jobs[n].info.status for n in (0, 1, 2)] == ["FINISHED", "FAILED", "FINISHED"]
    failed = jobs[1].data.tags
    assert failed["failure_reason"].startswith("ConfigError: prune.min_density")
    assert failed["sweep_id"] == jobs[0].data.tags["sweep_id"]
    assert "error: job 1: prune.min_density" in done.stderr
    assert [r.data.tags["sweep_job"] for r in tracking.failed_runs(
        settings_from(compose_config([f"paths.root={tmp_path}"])).tracking,
        failed["sweep_id"])] == ["1"]
    # The command tag replays the job exactly, quotes and braces included.
    command = shlex.split(jobs[2].data.tags["command"])
    assert command[:3] == ["python", "-m", "src.run"]
    assert "prune.min_density=0.2" in command and "+tracking.tags.note='two words {x}'" in command
    assert done.returncode != 0  # the sweep fails at its end, naming the failed job


def installed(module: str) -> bool:
    """Returns whether module can be imported (False, not an error, when its parent cannot)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # hydra_plugins: a namespace only the plugins create
        return False


@pytest.mark.slow
# CI installs the [slurm] extra and sets PRUNESWEEP_REQUIRE_SLURM=1: a missing plugin fails there.
@pytest.mark.skipif(not installed("hydra_plugins.hydra_submitit_launcher")
                    and not os.environ.get("PRUNESWEEP_REQUIRE_SLURM"),
                    reason="the [slurm] extra (hydra-submitit-launcher) is not installed")
def test_submitit_local_runs_each_job_in_its_own_process(tmp_path):
    # What a Slurm sweep does, on this machine: each job is a separate process, started at
    # once; the missing dense baseline is still trained once (the others wait on its lock).
    done = cli(tmp_path, "hydra/launcher=submitit_local", *TINY_CLI, "prune=flat",
               "prune.rate=0.3,0.5", flags=("--multirun",))
    jobs = sweep_runs(tmp_path)
    assert sorted(jobs) == [0, 1], done.stderr[-3000:]
    assert all(r.info.status == "FINISHED" for r in jobs.values())
    assert sorted(r.data.tags["baseline_reused"] for r in jobs.values()) == ["False", "True"]
    logs = list(tmp_path.glob("mlruns/outputs/multiruns/*/*/.submitit/*/*_log.out"))
    assert len({log.parent.name for log in logs}) == 2  # one submitit job folder each


@pytest.mark.parametrize("users", [None, "0"])
def test_hydra_full_error_is_raised_while_composing_and_the_users_given_back(monkeypatch, users):
    from src import hydra_errors

    if users is None:
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    else:
        monkeypatch.setenv("HYDRA_FULL_ERROR", users)
    seen = []

    def main():  # as a @hydra.main function: composing, then the job
        seen.append(os.environ.get("HYDRA_FULL_ERROR"))
        hydra_errors.job_started()
        seen.append(os.environ.get("HYDRA_FULL_ERROR"))

    hydra_errors.run(main)
    assert seen == ["1", users] and os.environ.get("HYDRA_FULL_ERROR") == users
