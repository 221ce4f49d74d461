"""A fine-tuning after pruning, killed mid-way, resumes from its last epoch checkpoint."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from src.config import compose_config, settings_from
from tests.conftest import kill_after_epoch_2_and_rerun, runs_of


def test_killed_finetuning_resumes_at_epoch_3(tmp_path):
    # Channel pruning then magnitude masks: the rebuilt model and the held masks both have to
    # come back the same for the restored weights to fit them.
    overrides = [f"paths.root={tmp_path}", "data=synthetic", "data.n_train=600",
                 "data.n_test=64", "data.num_classes=4", "model=resnet8",
                 "model.filters=[8,8,16]", "train.epochs=1", "train.batch_size=32",
                 "train.verbose=2", "prune=channel", "prune.rate=0.25", "prune.min_channels=2",
                 "prune.magnitude_rate=0.3", "prune.finetune_epochs=4"]
    finetune = Path(settings_from(compose_config(overrides)).paths.cache_dir) / "finetune"
    output = kill_after_epoch_2_and_rerun(overrides, finetune)
    assert "resuming training after epoch 2 of 4" in output
    epochs = [line.split()[1] for line in output.splitlines()
              if line.startswith("Epoch ")]
    assert epochs == ["3/4", "4/4"]  # the baseline was stored; only fine-tuning epochs left
    assert not list(finetune.glob("*.ckpt"))  # removed once the run has its model
    # The killed run, left RUNNING, is the run that goes on: one run, one curve.
    assert "continuing MLflow run" in output and "left RUNNING by a process that is gone" in output
    runs = runs_of(compose_config(overrides))
    assert [(r.info.status, r.data.tags["resumes"]) for r in runs] == [("FINISHED", "1")]
    finished = runs
    assert [r.data.tags["finetune_resumed_from_epoch"] for r in finished] == ["2"]
    curve = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "finetune_loss")
    assert sorted(m.step for m in curve) == [0, 1, 2, 3]  # each epoch once
    sparsity = finished[0].data.metrics["sparsity_global"]
    assert np.isclose(sparsity, 0.3, atol=0.02)  # the masks held through the resume


def test_a_failed_export_keeps_the_finetuning_for_the_rerun(make_cfg, monkeypatch):
    from src import experiment

    cfg = make_cfg("prune=flat", "prune.rate=0.5", "prune.finetune_epochs=2")
    finetune = Path(settings_from(cfg).paths.cache_dir) / "finetune"
    measure = experiment.export_and_measure

    def crash(*args, **kwargs):
        raise RuntimeError("the converter crashed")

    monkeypatch.setattr(experiment, "export_and_measure", crash)
    with pytest.raises(RuntimeError, match="converter crashed"):
        experiment.run(cfg)
    assert [p.name for p in finetune.glob("*.ckpt/epoch-*")] == ["epoch-0002"]
    monkeypatch.setattr(experiment, "export_and_measure", measure)
    experiment.run(cfg)
    assert not list(finetune.glob("*.ckpt"))  # removed once the run has logged its model
    by_status = {r.info.status: r for r in runs_of(cfg)}
    assert sorted(by_status) == ["FAILED", "FINISHED"]
    assert by_status["FINISHED"].data.tags["finetune_resumed_from_epoch"] == "2"


def test_a_fine_tuning_running_elsewhere_keeps_its_checkpoint_to_itself(make_cfg, capsys):
    # Parallel sweep jobs that differ only in quant share the key: one folder, one writer.
    from src.experiment import finetune_checkpoint

    settings = settings_from(make_cfg("prune=flat", "prune.rate=0.5", "prune.finetune_epochs=2"))
    with finetune_checkpoint(settings, "k") as first:
        assert first is not None
        with finetune_checkpoint(settings, "k") as second:
            assert second is None
    assert "another process is fine-tuning these settings now" in capsys.readouterr().out
    with finetune_checkpoint(settings, "k") as again:  # released with the first
        assert again is not None and again.folder == first.folder


def test_the_same_settings_continue_only_their_interrupted_run(make_cfg, capsys):
    from src import tracking
    from src.experiment import tracked
    from src.locks import file_lock

    settings = settings_from(make_cfg())
    tags = {"config_hash": "c0ffee", "host": tracking.HOST, "baseline_key": "b",
            "data_fingerprint": "d", "git_commit": "g"}
    status = lambda run_id: mlflow.get_run(run_id).info.status  # noqa: E731

    def start(**changed) -> str:
        with tracked(settings, {**tags, **changed}, "a run", nested=False) as active:
            return active.info.run_id

    def interrupt(**changed) -> str:
        with pytest.raises(KeyboardInterrupt):
            with tracked(settings, {**tags, **changed}, "a run", nested=False) as active:
                ran.append(active.info.run_id)
                raise KeyboardInterrupt
        return ran[-1]

    def killed(**changed) -> str:
        run_id = interrupt(**changed)
        mlflow.MlflowClient().set_terminated(run_id, "RUNNING")  # as a SIGKILL leaves it
        return run_id

    ran: list[str] = []
    first = interrupt()
    assert mlflow.get_run(first).data.tags["interrupted"] == "true"
    assert start() == first  # continued, and its stop no longer tagged
    run = mlflow.get_run(first)
    assert (run.info.status, run.data.tags.get("interrupted"), run.data.tags["resumes"]) \
        == ("FINISHED", None, "1")
    assert "continuing MLflow run " + first in capsys.readouterr().out
    assert start() != first  # a finished run is not continued: the same command runs again

    with pytest.raises(RuntimeError):  # a FAILED run stays the record of its failure
        with tracked(settings, tags, "a run", nested=False):
            raise RuntimeError("the converter crashed")
    assert mlflow.get_run(start()).data.tags.get("resumes") is None

    running = killed()
    live = Path(settings.paths.cache_dir) / "runs" / "c0ffee.live"
    with file_lock(live, shared=True):  # a process with these settings still runs
        second = start()
        assert second != running
        assert start() != second  # nor is the newest run taken for dead while it runs
    left = killed()
    assert start() == left  # nobody runs these settings: its process is gone
    other_host = killed(host="elsewhere")  # a run elsewhere: its process cannot be checked
    assert start() != other_host and status(other_host) == "RUNNING"
    other_commit = killed(git_commit="h")  # another code, data or baseline: a run of its own
    assert start() != other_commit
    assert status(other_commit) == "KILLED"  # closed, saying why
    assert "has the same settings" in mlflow.get_run(other_commit).data.tags["closed_because"]
    job = interrupt(sweep_id="s1")  # a sweep's job: a new run (and a new sweep)
    assert start() != job
    off = settings_from(make_cfg("tracking.continue_interrupted=false"))
    kept = interrupt()
    with tracked(off, tags, "a run", nested=False) as active:
        assert active.info.run_id != kept


def test_file_lock_waits_or_reports_who_holds_it(tmp_path):
    from src.locks import file_lock

    lock = tmp_path / "folder" / "x.lock"  # the folder is created
    with file_lock(lock) as held:
        assert held
        with file_lock(lock, wait=False) as second:
            assert not second
    with file_lock(lock, wait=False) as again:  # released with the block
        assert again
