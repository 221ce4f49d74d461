"""The Optuna search: trials as nested MLflow runs, trial early stopping, Pareto, resume."""

from __future__ import annotations

import re
import shlex

import mlflow
import optuna
import pytest

from src.config import ConfigError
from src.search.objectives import OBJECTIVES, epoch_estimate
from src.search.settings import refuse_widths_dims, search_settings_from
from src.search.study import judged_settings, make_study
from src.search.worker import run_search
from src.summary import report
from tests.conftest import TINY, assert_png, compose_config, runs_of

TrialState = optuna.trial.TrialState


def search_cfg(tmp_path, *overrides, isolated=False):
    """Returns (config, composer) for a tiny search stored under tmp_path; its trials run in
    this process unless isolated (each in its own process pays TensorFlow's import)."""
    base = [f"paths.root={tmp_path}", *TINY["data"], *TINY["model"], *TINY["train"],
            "train.epochs=2", "search.n_trials=4",
            f"search.trial_process={str(isolated).lower()}", *overrides]

    def composer(extra):
        return compose_config(base + extra)

    return composer([]), composer


def trial_runs(cfg):
    return [r for r in runs_of(cfg) if "trial_number" in r.data.tags]


def test_early_stopping_study_records_trials_and_nested_runs(tmp_path):
    # One int8 trial first, then float32 trials: the same accuracy at four times the bytes per
    # weight, so their estimated accuracy per MB is far below the median and the rule must stop
    # them after their first fine-tuning epoch. (A huge learning rate would be flaky: NaN.)
    cfg, composer = search_cfg(
        tmp_path, "search=accuracy_per_mb", "search.accuracy_floor=null",
        "search.early_stop.startup_trials=1",
        "~search.space", "+search.space={method: {path: prune, choices: [flat]}, "
        "rate: {path: prune.rate, low: 0.3, high: 0.5}, "
        "finetune_epochs: {path: prune.finetune_epochs, low: 3, high: 3, type: int}, "
        "quant: {path: quant, choices: [int8, none]}}")
    study = make_study(search_settings_from(cfg))
    for quant in ("int8", "none", "none", "int8"):
        study.enqueue_trial({"method": "flat", "rate": 0.4, "finetune_epochs": 3,
                             "quant": quant})
    study = run_search(cfg, composer)
    states = [t.state for t in study.trials]
    assert len(states) == 4
    assert states[:3] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED]
    assert states[3] in (TrialState.COMPLETE, TrialState.PRUNED)  # int8 again: near the median
    runs = {int(r.data.tags["trial_number"]): r for r in trial_runs(cfg)}
    assert sorted(runs) == [0, 1, 2, 3]
    parent = [r for r in runs_of(cfg) if r.data.tags.get("role") == "search_worker"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    for trial in study.trials:
        tracked = runs[trial.number]
        assert tracked.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        expected = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}[trial.state]
        assert tracked.info.status == expected
        if trial.state == TrialState.PRUNED:
            reason = tracked.data.tags["stopped_early"]
            assert reason.startswith("stopped after epoch")
            assert "against the completed trials' median" in reason  # not the final value's scale
            assert tracked.data.tags["mlflow.note.content"] == f"{tracked.info.run_name}: {reason}"
        else:
            assert trial.value == pytest.approx(tracked.data.metrics["accuracy_per_mb"])
    text, files = report("study", "accuracy_per_mb", [f"paths.root={tmp_path}"])
    complete = states.count(TrialState.COMPLETE)
    assert f"4 trials: {complete} complete, {4 - complete} early-stopped, 0 failed" in text
    assert f"| {study.best_trial.number} | " in text
    assert "optimization_history.png" in {f.name for f in files}
    for plot in files:
        assert_png(plot)


def test_pareto_study_and_resume_by_name(tmp_path, capsys):
    # A quote in the study name must survive MLflow's tag filters (orphan clean-up, records).
    settings = [
        "search=pareto", 'search.study_name="it\'s"', "measure.latency_runs=5",
        "measure.latency_repeats=2", "~search.space",
        "+search.space={rate: {path: prune.rate, low: 0.2, high: 0.9}, "
        "method: {path: prune, choices: [flat, layer]}, quant: {path: quant, choices: [int8]}}"]
    cfg, composer = search_cfg(tmp_path, *settings, "search.n_trials=2")
    first = run_search(cfg, composer)
    assert len(first.trials) == 2 and len(first.best_trials) >= 1
    for trial in first.best_trials:
        assert 0 <= trial.values[0] <= 1 and trial.values[1] > 0
    again = run_search(*search_cfg(tmp_path, *settings, "search.n_trials=1"))  # resumes
    assert len(again.trials) == 3 and again.study_name == first.study_name == "it's"
    assert all(t.state == TrialState.COMPLETE for t in again.trials)
    output = capsys.readouterr().out
    for line_start in ["trial 1/2 (#0) ", "trial 2/2 (#1) ", "trial 1/1 (#2) "]:
        (line,) = [x for x in output.splitlines() if x.startswith(line_start)]
        assert "COMPLETE tflite_accuracy=0." in line and " KB " in line and "method=" in line
    summary = [x for x in output.splitlines() if x.startswith("summary: ")][-1]  # 2nd worker
    assert shlex.split(summary)[1:6] == ["python", "-m", "src.summary", "study", "it's"]
    front = again.best_trials
    assert f"Pareto front of study \"it's\" ({len(front)} trials):" in output
    for trial in front:
        assert trial.user_attrs["run_id"] in output
    runs = runs_of(cfg)
    parents = [r for r in runs if r.data.tags.get("role") == "search_worker"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    newest = max(parents, key=lambda r: r.info.start_time)
    assert newest.data.metrics["pareto_front_size"] == len(front)
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(newest.info.run_id,
                                                                       "summary")}
    assert {"summary/pareto_front.png", "summary/optimization_history.png",
            "summary/summary.md"} <= artifacts
    note = newest.data.tags["mlflow.note.content"]  # its description in the MLflow UI
    assert note.startswith(f"study it's: {len(again.trials)} trials (")
    assert f"; Pareto front of {len(front)}: #" in note
    by_number = {t.number: t for t in again.trials}
    for tracked in trial_runs(cfg):
        number = tracked.data.tags["trial_number"]
        assert by_number[int(number)].user_attrs["run_id"] == tracked.info.run_id
        assert tracked.info.run_name.startswith(f"it's#{number} ")
        assert tracked.data.params["objective"] == "tflite_accuracy,tflite_zip_bytes"
        assert tracked.data.tags["search.objectives"] == "tflite_accuracy,tflite_zip_bytes"
    text, files = report("study", "it's", [f"paths.root={tmp_path}", "search=pareto"])
    assert "3 trials: 3 complete, 0 early-stopped, 0 failed" in text
    assert "Pareto front" in text
    assert {f.name for f in files} >= {"pareto_front.png", "optimization_history.png"}
    for plot in files:
        assert_png(plot)


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path):
    cfg, composer = search_cfg(
        tmp_path, "search=accuracy_per_mb", "search.n_trials=2", "search.early_stop.rule=none",
        "~search.space", "+search.space={rate: {path: prune.rate, low: 0.2, high: 0.4}, "
        "method: {path: prune, choices: [flat]}, "
        "min_density: {path: prune.min_density, low: 0.9, high: 0.9}}")
    study = run_search(cfg, composer)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2
    assert "prune.rate + prune.min_density" in study.trials[0].user_attrs["failure_reason"]
    failed = [r for r in trial_runs(cfg) if r.info.status == "FAILED"]
    assert sorted(int(r.data.tags["trial_number"]) for r in failed) == [0, 1]


@pytest.mark.parametrize(
    "override,key",
    [
        ("search.space.rate.low=0.99", "search.space.rate.low"),
        ("+search.space.bogus={path: prune.nonexistent, low: 0, high: 1}",
         "search.space.bogus.path"),
        ("search.space.quant.choices=[]", "search.space.quant.choices"),
        ("search.space.quant.choices=[int4]", "search.space.quant.choices"),
        ("search.storage=redis://localhost/0", "search.storage"),
        ("search.objectives=[speed]", "search.objectives"),
        ("search.n_trials=0", "search.n_trials"),
        ("search.early_stop.rule=mean", "search.early_stop.rule"),
        ("search.early_stop.percentile=100", "search.early_stop.percentile"),
    ],
)
def test_bad_search_settings_name_the_key(tmp_path, override, key):
    cfg, _ = search_cfg(tmp_path, "search=accuracy_per_mb", override)
    with pytest.raises(ConfigError, match=rf"^{key}"):
        search_settings_from(cfg)


def test_reusing_a_study_name_with_other_objectives_is_refused(tmp_path):
    cfg, _ = search_cfg(tmp_path, "search=accuracy_per_mb")
    make_study(search_settings_from(cfg))
    other, _ = search_cfg(tmp_path, "search=pareto", "search.study_name=accuracy_per_mb")
    with pytest.raises(ConfigError, match="^search.study_name: study 'accuracy_per_mb' was"):
        make_study(search_settings_from(other))


def test_resuming_a_study_with_other_experiment_settings_is_refused(tmp_path):
    # The README's quick search, then the same search on other data, under the default name:
    # the new trials would be ranked and stopped early against the old study's.
    cfg, _ = search_cfg(tmp_path, "search=accuracy_per_mb")
    make_study(search_settings_from(cfg), judged_settings(cfg))
    more, _ = search_cfg(tmp_path, "search=accuracy_per_mb", "search.n_trials=9",
                         "train.verbose=0")
    make_study(search_settings_from(more), judged_settings(more))  # the same experiment
    other, _ = search_cfg(tmp_path, "search=accuracy_per_mb", "data.n_train=999")
    with pytest.raises(ConfigError, match=r"^search.study_name: study 'accuracy_per_mb' ran "
                                          r"with data.n_train=\d+, not 999; use another"):
        make_study(search_settings_from(other), judged_settings(other))


def test_epoch_estimates_follow_the_objective():
    from src.keras_env import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, use_bias=False)])
    model.layers[0].kernel.assign([[1, 0], [0, 2], [0, 0], [3, 0]])  # 3 of 8 weights non-zero
    assert epoch_estimate("accuracy_per_mb", 0.6, model, 1) == pytest.approx(0.6 / 3e-6)
    assert epoch_estimate("tflite_zip_bytes", 0.6, model, 4) == 12
    assert epoch_estimate("sparsity_global", 0.6, model, 1) == pytest.approx(5 / 8)
    assert epoch_estimate("tflite_accuracy", 0.6, model, 1) == 0.6


def test_a_tfmot_trial_is_estimated_at_its_final_sparsity():
    # Early in fine-tuning a tfmot trial is still dense; counted as it is, its size estimate is
    # 5x its final one at 80% sparsity and the median rule would stop it for that alone.
    import numpy as np

    from src.keras_env import keras, tfmot
    from src.search.objectives import final_sparsity_of

    schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=100)
    model = tfmot.sparsity.keras.prune_low_magnitude(keras.Sequential(
        [keras.Input((10,)), keras.layers.Dense(10, use_bias=False)]), pruning_schedule=schedule)
    kernel = model.layers[0].pruning_vars[0][0]
    kernel.assign(np.ones((10, 10)))  # epoch 1: not pruned yet
    final = final_sparsity_of("tfmot", 0.8, structured_2_4=False)
    at_epoch_1 = epoch_estimate("accuracy_per_mb", 0.5, model, 1, final)
    assert epoch_estimate("accuracy_per_mb", 0.5, model, 1) == pytest.approx(at_epoch_1 / 5)
    kernel.assign(np.where(np.arange(100).reshape(10, 10) < 80, 0.0, 1.0))  # the end: 80% zeros
    at_end = epoch_estimate("accuracy_per_mb", 0.5, model, 1, final)
    assert at_epoch_1 == pytest.approx(at_end) == pytest.approx(0.5 / 20e-6)
    assert epoch_estimate("tflite_zip_bytes", 0.5, model, 1, final) == pytest.approx(20)
    assert final_sparsity_of("flat", 0.8, False) is None  # masks are final from epoch 1
    assert final_sparsity_of("tfmot", 0.8, True) == 0.5  # 2:4


def test_objective_values_come_from_the_run_and_search_size():
    metrics = {"tflite_accuracy": 0.8, "tflite_bytes": 400_000, "tflite_zip_bytes": 200_000,
               "accuracy_per_mb": 4.0}
    assert OBJECTIVES["accuracy_per_mb"].value(metrics, "zipped") == 4.0
    assert OBJECTIVES["accuracy_per_mb"].value(metrics, "raw") == pytest.approx(2.0)
    assert OBJECTIVES["tflite_bytes"].direction == "minimize"
    with pytest.raises(KeyError, match="tflite_latency_ms"):
        OBJECTIVES["tflite_latency_ms"].value(metrics, "zipped")


def test_early_stopping_refuses_an_objective_it_cannot_estimate(tmp_path):
    cfg, _ = search_cfg(tmp_path, "search=accuracy_per_mb", "search.objectives=[macs]")
    with pytest.raises(ConfigError, match="^search.early_stop.rule: macs cannot be estimated"):
        search_settings_from(cfg)


def test_a_search_over_what_fixed_widths_replace_is_refused_listing_what_to_drop(tmp_path):
    widths = ("prune=channel", "prune.widths=[2,2,2,2,2,2]")
    cfg, composer = search_cfg(tmp_path, "search=accuracy_per_mb", *widths)
    with pytest.raises(ConfigError, match=(
            r"^search.space: prune.widths fixes the channel cut, so method, rate, channel_rate, "
            r"scope cannot vary, and criterion, final_sparsity, schedule, end are conditioned on "
            r"them \(or give those again without `when`\); drop: ~search.space.method "
            r"~search.space.rate .* ~search.space.end$")):
        run_search(cfg, composer)
    assert runs_of(cfg) == []
    cfg, _ = search_cfg(tmp_path, "search=accuracy_per_mb", *widths, "~search.space",
                        "+search.space={lr: {path: prune.finetune_lr, low: 0.001, high: 0.1}}")
    refuse_widths_dims(search_settings_from(cfg).space)  # the fine-tuning may vary


def test_a_search_that_averages_weights_refuses_tfmot_trials_before_any_trial(tmp_path):
    cfg, composer = search_cfg(tmp_path, "search=accuracy_per_mb", "train.swa_start=0.5")
    with pytest.raises(ConfigError, match=re.escape(
            "search.space.method: train.swa_start cannot average a tfmot trial's weights; leave "
            "tfmot out: 'search.space.method.choices=[flat,layer,channel]'")):
        run_search(cfg, composer)
    assert runs_of(cfg) == []


def test_a_quantization_aware_search_refuses_trials_of_other_modes_before_any_trial(tmp_path):
    cfg, composer = search_cfg(tmp_path, "search=accuracy_per_mb", "quant=int8",
                               "quant.qat_epochs=2")
    with pytest.raises(ConfigError, match=re.escape(
            "search.space.quant: quant.qat_epochs trains for an int8 export; dynamic,float16 "
            "trials would fail: 'search.space.quant.choices=[int8]' or drop the dimension "
            "(~search.space.quant)")):
        run_search(cfg, composer)
    assert runs_of(cfg) == []


def test_a_three_objective_study_on_what_the_device_sees(tmp_path):
    # Trials in their own processes (the default): values, metrics and nesting come back.
    cfg, composer = search_cfg(
        tmp_path, "search=device", "~search.space",
        "+search.space={method: {path: prune, choices: [channel, flat]}, "
        "rate: {path: prune.rate, low: 0.2, high: 0.6}, quant: {path: quant, choices: [int8]}}",
        "prune.min_channels=1", "measure.latency_runs=5", "measure.latency_repeats=2",
        "search.n_trials=2", isolated=True)  # each trial's process pays TensorFlow's import
    study = run_search(cfg, composer)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]
    front = study.best_trials
    assert front and all(len(t.values) == 3 for t in front)
    by_number = {t.number: t for t in study.trials}
    for tracked in trial_runs(cfg):
        trial = by_number[int(tracked.data.tags["trial_number"])]
        metrics = tracked.data.metrics
        assert trial.values == [metrics["tflite_accuracy"], metrics["tflite_bytes"],
                                metrics["tflite_latency_ms"]]
    parent = max((r for r in runs_of(cfg) if r.data.tags.get("role") == "search_worker"),
                 key=lambda r: r.info.start_time)
    for tracked in trial_runs(cfg):
        assert tracked.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert tracked.info.run_name.startswith(f"device#{tracked.data.tags['trial_number']} ")
    assert {t.user_attrs["run_id"] for t in study.trials} == {r.info.run_id
                                                              for r in trial_runs(cfg)}
    artifacts = {f.path for f in mlflow.MlflowClient().list_artifacts(parent.info.run_id,
                                                                       "summary")}
    assert {"summary/accuracy_vs_raw_size.png", "summary/accuracy_vs_latency.png"} <= artifacts
