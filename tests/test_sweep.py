"""Grid sweeps share one baseline, nest under one parent run and are summarised."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from src.config import PROJECT_ROOT, settings_from
from src.summary import report
from tests.conftest import (
    assert_png,
    compose_config,
    kill_after_epoch_2_and_rerun,
    runs_of,
    seed_mlflow_store,
)

# The sweep, shrunk: experiment=quick with fewer images and a narrower model.
SWEEP = ["experiment=quick", "prune=flat,layer", "prune.rate=0.3,0.7", "quant=int8"]
SHRINK = ["data.n_train=160", "data.n_test=64", "data.num_classes=4", "model.filters=[4,8,8]",
          "train.epochs=1", "train.batch_size=32"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mlflow_template) -> tuple[Path, str]:
    """Runs a 2x2 multirun (flat/layer x two rates) once; returns its root and stdout."""
    root = tmp_path_factory.mktemp("sweep")
    seed_mlflow_store(root, mlflow_template)
    done = subprocess.run(
        [sys.executable, "-m", "src.run", "--multirun", f"paths.root={root}", *SWEEP, *SHRINK],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return root, done.stdout + done.stderr


@pytest.fixture(scope="module")
def sweep_root(sweep) -> Path:
    return sweep[0]


def jobs_and_parent(root: Path) -> tuple[list, list]:
    runs = runs_of(compose_config([f"paths.root={root}"]))
    return ([r for r in runs if "sweep_job" in r.data.tags],
            [r for r in runs if r.data.tags.get("role") == "sweep"])


def test_multirun_shares_one_baseline(sweep_root):
    runs, _ = jobs_and_parent(sweep_root)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["baseline_key"] for r in runs}) == 1
    assert [r.data.tags["baseline_reused"] for r in runs].count("False") == 1
    assert len({r.data.tags["sweep_id"] for r in runs}) == 1
    assert sorted(r.data.tags["sweep_job"] for r in runs) == ["0", "1", "2", "3"]
    assert all(r.data.tags["command"].startswith("python -m src.run ") for r in runs)
    assert any("prune=layer prune.rate=0.7" in r.data.tags["command"] for r in runs)
    combos = {(r.data.params["prune.method"], r.data.params["prune.rate"]) for r in runs}
    assert combos == {(m, r) for m in ("flat", "layer") for r in ("0.3", "0.7")}
    for run in runs:  # what the MLflow UI and server show of each job (tests/test_ui.py)
        assert {"tflite_accuracy", "sparsity_global", "tflite_zip_bytes",
                "accuracy_per_mb"} <= set(run.data.metrics)


def test_jobs_are_named_and_nested_under_one_sweep_run_with_its_plots(sweep_root):
    jobs, parents = jobs_and_parent(sweep_root)
    assert sorted(r.info.run_name for r in jobs) == [
        "resnet8 flat 0.30 int8", "resnet8 flat 0.70 int8",
        "resnet8 layer 0.30 int8", "resnet8 layer 0.70 int8"]
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep_id"] == jobs[0].data.tags["sweep_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert parent.data.tags["jobs_finished"] == "4" and parent.data.tags["jobs_failed"] == "0"
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/accuracy_vs_rate.png", "summary/accuracy_vs_size.png",
            "summary/summary.md"} <= artifacts
    plot = Path(client.download_artifacts(parent.info.run_id, "summary/accuracy_vs_size.png",
                                          str(sweep_root)))
    assert_png(plot)
    for job in jobs:  # each run's description is its headline
        note = job.data.tags["mlflow.note.content"]
        assert note.startswith(job.info.run_name + ": TFLite accuracy ")
        assert f"zipped {job.data.metrics['tflite_zip_kb']:.1f} KB" in note


def test_each_job_prints_what_it_does_and_ends_with_its_result_line(sweep):
    root, output = sweep
    jobs, _ = jobs_and_parent(root)
    ids = {r.data.tags["sweep_job"]: r.info.run_id for r in jobs}
    # Hydra announces each job as "#<n> : <overrides>"; the sweep's closing line comes last.
    chunks = re.split(r"\[[^\]]*\]\[HYDRA\]\s+#(\d+) : ", output)[1:]
    assert [chunks[i] for i in range(0, len(chunks), 2)] == ["0", "1", "2", "3"]
    for number, chunk in zip(chunks[0::2], chunks[1::2]):
        lines = [line for line in chunk.splitlines()[1:] if line.strip()]
        if number == "3":  # then the sweep's table, and its closing line
            assert lines[-1].startswith("sweep ") and "4 jobs finished" in lines[-1]
            table = next(i for i, line in enumerate(lines) if line.startswith("sweep "))
            assert "4 jobs (4 finished)" in lines[table]
            assert len([line for line in lines[table:] if "| FINISHED |" in line]) == 4
            lines = lines[:table]
        assert lines[0].startswith("dense baseline: ")
        assert ("not cached, training resnet8" in lines[0]) == (number == "0")
        assert lines[-1].startswith("result: resnet8 ")
        assert lines[-1].endswith(f"run {ids[number]}")
        assert "TFLite accuracy" in lines[-1] and "(dense " in lines[-1]


def test_sweep_callback_names_the_failed_jobs_and_fails_the_sweep(tmp_path, make_cfg):
    from hydra import compose, initialize_config_dir

    from src.config import register_resolvers
    from src.sweep_callback import SweepRun

    register_resolvers()  # the groups' schemas, as the command line registers them
    sweep_dir = tmp_path / "multiruns" / "2026-01-01" / "00-00-00"
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"paths.root={tmp_path}",
                                           f"hydra.sweep.dir={sweep_dir}"],
                      return_hydra_config=True)
    cfg.hydra.overrides.task = ["prune=flat", "prune.rate=0.5", "prune.min_density=0.6,0.0"]
    callback = SweepRun()
    callback.on_multirun_start(cfg)
    parent = (sweep_dir / "mlflow_parent_run_id").read_text()
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    for job, status in (("0", "FINISHED"), ("1", "FAILED")):
        run = client.create_run(experiment_id, run_name=f"job {job}", tags={
            "sweep_id": "2026-01-01_00-00-00", "sweep_job": job, "mlflow.parentRunId": parent,
            "command": f"python -m src.run prune=flat prune.rate=0.5 "
                       f"prune.min_density={'0.6' if job == '0' else '0.0'}",
            **({"failure_reason": "ConfigError: prune.min_density: too high"}
               if status == "FAILED" else {})})
        client.set_terminated(run.info.run_id, status)
    with pytest.raises(SystemExit) as exit_:
        callback.on_multirun_end(cfg)
    assert str(exit_.value) == ("sweep 2026-01-01_00-00-00: 1 of 2 jobs failed: "
                                "#1 prune.min_density=0.0 (ConfigError: prune.min_density: "
                                "too high)")
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.tags["jobs_failed"] == "1"


def test_sweep_and_run_summaries_attach_to_what_they_describe(sweep_root):
    text, files = report("sweep", "latest", [f"paths.root={sweep_root}"])
    header, *rows = text.splitlines()
    assert header.startswith("sweep ") and "model resnet8" in header
    assert "quantization int8" in header and "dense accuracy " in header
    methods_rates = [tuple(c.strip() for c in row.split("|")[2:4])
                     for row in rows if row.startswith("| ") and "FINISHED" in row]
    assert methods_rates == [("flat", "0.30"), ("flat", "0.70"), ("layer", "0.30"),
                             ("layer", "0.70")]
    assert sorted(f.name for f in files) == ["accuracy_vs_rate.png", "accuracy_vs_size.png"]
    for plot in files:
        assert_png(plot)
    text, files = report("run", "latest", [f"paths.root={sweep_root}"])
    first, config, headline, accuracy, sizes = text.splitlines()[:5]
    assert first.startswith("run resnet8 ") and "(id " in first
    assert config.startswith("config: data synthetic, model resnet8, prune ")
    assert headline.startswith("headline: resnet8 ")
    assert accuracy.startswith("accuracy: TFLite ") and "dense baseline " in accuracy
    assert ".tflite zipped " in sizes and sizes.endswith(" KB")
    assert_png(files[0])
    jobs, (parent,) = jobs_and_parent(sweep_root)
    runs = runs_of(compose_config([f"paths.root={sweep_root}"]))
    assert len(runs) == 5  # no summary run added: the plots went to the runs they describe
    client = mlflow.MlflowClient()
    assert "summary/accuracy_vs_rate.png" in {
        a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    newest = max(jobs, key=lambda r: r.info.start_time)
    assert "summary/sizes.png" in {
        a.path for a in client.list_artifacts(newest.info.run_id, "summary")}


def test_a_multirun_over_widths_lists_runs_one_job_per_list(tmp_path, mlflow_template):
    """Hydra's `a,b` sweep syntax with lists as the choices: one job per widths list."""
    seed_mlflow_store(tmp_path, mlflow_template)
    widths = "prune.widths=[2,2,4,4,4,4],[2,2,2,2,2,2]"
    done = subprocess.run(
        [sys.executable, "-m", "src.run", "--multirun", f"paths.root={tmp_path}",
         "experiment=quick", "prune=channel", widths, "prune.finetune_epochs=0", "quant=int8",
         *SHRINK], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs, _ = jobs_and_parent(tmp_path)
    assert sorted((r.info.run_name, r.data.tags["channel_widths"]) for r in jobs) == [
        ("resnet8 channel 2-2-2-2-2-2 int8", "2-2-2-2-2-2"),
        ("resnet8 channel 2-2-4-4-4-4 int8", "2-2-4-4-4-4")]
    assert len({r.data.tags["baseline_key"] for r in jobs}) == 1
    text, files = report("sweep", "latest", [f"paths.root={tmp_path}"])
    assert {"w2-2-2-2-2-2", "w2-2-4-4-4-4"} <= {c.strip() for row in text.splitlines()
                                                for c in row.split("|")}
    assert [f.name for f in files] == ["accuracy_vs_size.png"]  # no rate: no empty rate chart


def test_a_killed_sweep_rerun_skips_its_finished_jobs_and_continues_the_killed_one(
        tmp_path, mlflow_template):
    seed_mlflow_store(tmp_path, mlflow_template)
    # Job 0 does not fine-tune and finishes; job 1 is SIGKILLed after its epoch-2 checkpoint.
    overrides = ["--multirun", f"paths.root={tmp_path}", "experiment=quick", "prune=flat",
                 "prune.rate=0.5", "prune.finetune_epochs=0,4", "quant=int8", "train.verbose=2",
                 *SHRINK]
    finetune = Path(settings_from(compose_config(overrides[1:3])).paths.cache_dir) / "finetune"
    output = kill_after_epoch_2_and_rerun(overrides, finetune)
    assert re.search(r"sweep \S+: continuing it \(MLflow run \w+\), left RUNNING by a process "
                     r"that is gone; 1 finished job not run again", output), output[-3000:]
    assert "job 0: finished before the sweep was interrupted: not run again" in output
    assert "resuming training after epoch 2 of 4" in output
    assert [line.split()[1] for line in output.splitlines() if line.startswith("Epoch ")] \
        == ["3/4", "4/4"]  # the baseline and job 0 were not trained again
    jobs, (parent,) = jobs_and_parent(tmp_path)
    assert sorted((r.data.tags["sweep_job"], r.info.status, r.data.tags.get("resumes"))
                  for r in jobs) == [("0", "FINISHED", None), ("1", "FINISHED", "1")]
    assert parent.info.status == "FINISHED" and parent.data.tags["resumes"] == "1"
    assert parent.data.tags["jobs_finished"] == "2"
    assert {r.data.tags["sweep_id"] for r in jobs} == {parent.data.tags["sweep_id"]}
    curve = mlflow.MlflowClient().get_metric_history(
        next(r for r in jobs if r.data.tags["sweep_job"] == "1").info.run_id, "finetune_loss")
    assert sorted(m.step for m in curve) == [0, 1, 2, 3]  # each epoch once


def test_only_an_interrupted_sweep_of_the_same_command_is_continued(tmp_path, capsys,
                                                                   mlflow_template):
    seed_mlflow_store(tmp_path, mlflow_template)
    from hydra import compose, initialize_config_dir
    from mlflow.entities import RunStatus

    from src import tracking
    from src.config import register_resolvers
    from src.locks import file_lock
    from src.sweep_callback import SweepRun, sweep_id

    register_resolvers()  # the groups' schemas, as the command line registers them

    def start(folder: str, *task: str) -> tuple[SweepRun, Path]:
        sweep_dir = tmp_path / "multiruns" / "2026-01-01" / folder
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.root={tmp_path}",
                                               f"hydra.sweep.dir={sweep_dir}"],
                          return_hydra_config=True)
        cfg.hydra.overrides.task = list(task or ["prune=flat", "prune.rate=0.3,0.6"])
        callback = SweepRun()
        callback.on_multirun_start(cfg)
        return callback, sweep_dir

    first, _ = start("00-00-00")
    parent = first.run_id
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(parent).info.experiment_id
    job_tags = {"sweep_id": "2026-01-01_00-00-00", "sweep_job": "1", "config_hash": "h1",
                "mlflow.parentRunId": parent, "host": tracking.HOST}
    job = client.create_run(experiment_id, tags=job_tags).info.run_id  # left RUNNING
    first._close(RunStatus.KILLED)  # what Ctrl-C leaves
    assert "sweep 2026-01-01_00-00-00 interrupted: the same command continues it" \
        in capsys.readouterr().out
    cache = Path(settings_from(compose_config([f"paths.root={tmp_path}"])).paths.cache_dir)
    with file_lock(cache / "runs" / "h1.live", shared=True):  # its process still runs here
        with pytest.raises(SystemExit, match=r"^error: sweep 2026-01-01_00-00-00: job 1 "
                                             rf"\(run {job}\) is still running here; "):
            start("01-00-00")
    again, folder = start("01-00-00")  # its process gone: the job will be continued
    assert pickle.loads(pickle.dumps(again)).run_id == parent  # submitit ships callbacks
    assert (again.run_id, again.identity) == (parent, "2026-01-01_00-00-00")
    assert sweep_id(folder) == "2026-01-01_00-00-00"  # what its jobs tag themselves with
    assert client.get_run(parent).info.status == "RUNNING"
    client.set_terminated(job)  # finished: skipped by this sweep only, not by a new one
    done = {**job_tags, **{key: "x" for key in tracking.SAME_RESULT}}
    for key, value in done.items():
        client.set_tag(job, key, value)
    tracking_cfg = settings_from(compose_config([f"paths.root={tmp_path}"])).tracking
    assert tracking.finished_job(tracking_cfg, done).info.run_id == job
    assert tracking.finished_job(tracking_cfg, {**done, "mlflow.parentRunId": "other"}) is None
    other, _ = start("02-00-00", "prune=layer", "prune.rate=0.3,0.6")  # another command
    assert other.run_id != parent and other.identity == "2026-01-01_02-00-00"
    again._close(RunStatus.FINISHED)
    after, _ = start("03-00-00")  # a finished sweep is not continued: a new one
    assert after.run_id != parent and after.identity == "2026-01-01_03-00-00"
    for callback in (other, after):
        callback._close(RunStatus.FINISHED)
