"""Names, headlines, the quiet stderr filter and the study plots, without training anything."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import optuna
import pytest

from src import plots, report
from src.config import PROJECT_ROOT, ConfigError, settings_from
from src.summary import study_report
from tests.conftest import assert_png


@pytest.mark.parametrize("overrides, name", [
    (["prune=flat", "prune.rate=0.7", "quant=int8"], "resnet8 flat 0.70 int8"),
    (["prune=layer", "prune.rate=0.3", "prune.finetune_epochs=2", "quant=dynamic"],
     "resnet8 layer 0.30 ft2 dynamic"),
    (["prune=tfmot", "prune.final_sparsity=0.86", "quant=dynamic"], "resnet8 tfmot 0.86 dynamic"),
    (["prune=none", "quant=int8"], "resnet8 dense int8"),
    (["prune=none", "model.alpha=0.5"], "resnet8x0.5 dense float32"),
    (["prune=flat", "prune.rate=0.9", "quant.sparse_encoding=true"],
     "resnet8 flat 0.90 float32+sparse"),
    (["prune=none", "quant=int8", "quant.strip_names=true"], "resnet8 dense int8+stripped"),
])
def test_run_names_say_model_method_rate_and_quantization(make_cfg, overrides, name):
    assert report.run_name(settings_from(make_cfg(*overrides))) == name


def test_a_stored_baseline_file_is_named_by_its_model_and_short_key(make_cfg, tmp_path):
    names = {}
    for stem in ("resnet8-dense-7c1f1c4d60827d67", "my-model"):
        settings = settings_from(make_cfg("prune=flat", "prune.rate=0.44", "quant=int8"))
        settings.model.path = str(tmp_path / f"{stem}.h5")
        names[stem] = report.run_name(settings)
    assert names == {"resnet8-dense-7c1f1c4d60827d67": "resnet8@7c1f1c flat 0.44 int8",
                     "my-model": "my-model flat 0.44 int8"}


def test_channel_pruning_is_named_by_its_rate(make_cfg):
    settings = settings_from(make_cfg("prune=flat", "prune.rate=0.5", "quant=int8"))
    settings.prune.method = "channel"
    assert report.run_name(settings) == "resnet8 channel 0.50 int8"


def test_headline_gives_accuracies_sparsity_sizes_in_kb_latency_and_run_id(make_cfg):
    settings = settings_from(make_cfg("prune=flat", "prune.rate=0.7", "quant=int8"))
    metrics = {"tflite_accuracy": 0.8312, "baseline_test_accuracy": 0.8525,
               "sparsity_global": 0.7, "tflite_bytes": 99_500, "tflite_zip_bytes": 57_600,
               "accuracy_per_mb": 14.43}
    assert report.headline(settings, metrics, "abc123") == (
        "resnet8 flat 0.70 int8: TFLite accuracy 83.12% (dense 85.25%), sparsity 70.0%, "
        ".tflite 99.5 KB, zipped 57.6 KB, 14.43 accuracy/MB, run abc123")
    assert report.size_metrics(metrics) == {"tflite_kb": 99.5, "tflite_zip_kb": 57.6}
    metrics.update(macs=12_500_000, tflite_latency_ms=0.2357)  # every exported run has them
    assert report.headline(settings, metrics).endswith(
        "zipped 57.6 KB, 12.50M MACs, 0.236 ms (xnnpack, 1 thread), 14.43 accuracy/MB")
    settings.measure.latency_kernels, settings.measure.latency_threads = "builtin", 2
    assert "0.236 ms (builtin, 2 threads)" in report.headline(settings, metrics)
    # A channel cut: its widths and parameters, sparsity only with magnitude pruning after it.
    metrics.update(sparsity_global=0.0, params=15_040, baseline_params=78_666)
    assert "(dense 85.25%), widths 8-8-16-16-64-48, 15.0k of 78.7k params, .tflite" in \
        report.headline(settings, metrics, widths="8-8-16-16-64-48")
    metrics.update(sparsity_global=0.3, baseline_params=2_236_682)
    assert "15.0k of 2.24M params, sparsity 30.0%, .tflite" in \
        report.headline(settings, metrics, widths="8-8-16-16-64-48")
    # Taught by other models than its own dense one: they are named, with their accuracy.
    settings.distill.alpha = 0.9
    settings.distill.teacher = ["results/models/resnet8x1.5-dense-54abc3a6ca142f2b.h5",
                                "my-teacher.keras"]
    metrics["teacher_test_accuracy"] = 0.8739
    assert "(dense 85.25%, teacher resnet8x1.5@54abc3 + my-teacher 87.39%), widths" in \
        report.headline(settings, metrics, widths="8-8-16-16-64-48")
    settings.distill.teacher = None  # its own dense model: already named by 'dense'
    assert "(dense 85.25%), widths" in report.headline(settings, metrics, widths="8-8-16-16-64-48")
    settings.distill.teacher = "t.h5"
    del metrics["teacher_test_accuracy"]  # not fine-tuned: no teacher taught
    assert "(dense 85.25%), widths" in report.headline(settings, metrics, widths="8-8-16-16-64-48")


def run_quietly(code: str, verbose: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PRUNESWEEP_VERBOSE"}
    if verbose:
        env["PRUNESWEEP_VERBOSE"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


NATIVE = ("WARNING: All log messages before absl::InitializeLog() is called are written to "
          "STDERR\nI0000 00:00:1795762966.030811    6916 cudart_stub.cc:31] Could not find cuda "
          "drivers on your machine, GPU will not be used.\nE0000 00:00:1795762988.627989    6916 "
          "cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\nINFO: Created "
          "TensorFlow Lite XNNPACK delegate for CPU.\nfully_quantize: 0, inference_type: 6\n"
          "a real problem\n")


@pytest.mark.parametrize("verbose", [False, True])
def test_native_noise_is_filtered_unless_verbose(verbose):
    code = ("import os, sys, src; os.write(2, sys.argv[1].encode() if len(sys.argv) > 1 else "
            f"{NATIVE!r}.encode()); sys.exit('error: last words')")
    done = run_quietly(code, verbose)
    assert done.returncode == 1
    if verbose:
        assert done.stderr == NATIVE + "error: last words\n"
    else:  # errors, and anything not known to be noise, still come through, in order
        assert done.stderr == "a real problem\nerror: last words\n"


def fake_study(n: int, objectives=("tflite_accuracy", "tflite_zip_bytes")) -> optuna.Study:
    """Returns an in-memory study of n complete trials with the metrics trials record."""
    study = optuna.create_study(directions=["maximize", "minimize"][: len(objectives)])
    study.set_user_attr("objectives", list(objectives))
    for number in range(n):
        rate = 0.3 + 0.6 * number / max(n - 1, 1)
        method = "flat" if number % 2 else "layer"
        attrs = {"tflite_accuracy": 0.9 - rate / 3, "tflite_zip_bytes": 600_000 * (1 - rate),
                 "test_accuracy": 0.9 - rate / 3, "accuracy_per_mb": 1.0,
                 "sparsity_global": rate, "overrides": [f"prune={method}", f"++prune.rate={rate}"]}
        trial = optuna.trial.create_trial(
            params={"rate": rate, "method": method},
            distributions={"rate": optuna.distributions.FloatDistribution(0.3, 0.9),
                           "method": optuna.distributions.CategoricalDistribution(
                               ["flat", "layer"])},
            values=[attrs[o] for o in objectives], user_attrs=attrs)
        study.add_trial(trial)
    return study


def test_importances_wait_for_ten_complete_trials(tmp_path):
    text, files = study_report(fake_study(4), tmp_path / "few", "synthetic, int8")
    assert ("Parameter importances: not shown (need 10 complete trials, have 4" in text)
    assert sorted(f.name for f in files) == ["optimization_history.png", "pareto_front.png"]
    text, files = study_report(fake_study(10), tmp_path / "ten", "synthetic, int8")
    assert "Parameter importances for tflite_accuracy:" in text
    assert "Parameter importances for tflite_zip_bytes:" in text
    assert "param_importances.png" in {f.name for f in files}
    for plot in files:
        assert_png(plot)


def test_pareto_front_keeps_only_points_nothing_beats():
    points = [plots.Point("#0", 10, 0.5), plots.Point("#1", 20, 0.7), plots.Point("#2", 15, 0.4),
              plots.Point("#3", 640, 0.71), plots.Point("#4", 30, 0.6)]
    assert [p.label for p in plots.pareto_front(points)] == ["#0", "#1", "#3"]


def test_the_trial_table_divides_by_the_size_the_study_ranks_by(tmp_path):
    from src.search.settings import search_settings_from
    from src.search.study import make_study
    from src.summary import trial_table
    from tests.test_search import search_cfg

    attrs = {"tflite_accuracy": 0.8, "test_accuracy": 0.81, "tflite_bytes": 100_000,
             "tflite_zip_bytes": 50_000, "accuracy_per_mb": 16.0, "sparsity_global": 0.5,
             "params": 6_200}
    rate = {"rate": optuna.distributions.FloatDistribution(0, 1)}
    trial = optuna.trial.create_trial(value=8.0, params={"rate": 0.5}, distributions=rate,
                                      user_attrs=attrs)
    header, _, row = trial_table([trial], "raw")
    assert "| tflite KB | tflite zip KB | acc/MB (raw) |" in header
    assert "| 100.0 | 50.0 | 8.00 | 6.2k | 0.500 | rate=0.5 |" in row  # 0.8 / 0.1 MB, not 16
    assert "| 16.00 |" in trial_table([trial])[2]
    cfg, _ = search_cfg(tmp_path, "search=accuracy_per_mb", "search.size=raw")
    make_study(search_settings_from(cfg))
    zipped, _ = search_cfg(tmp_path, "search=accuracy_per_mb")
    with pytest.raises(ConfigError, match=r"^search.size: study 'accuracy_per_mb' divides "
                                        r"accuracy by the raw size; use another study name"):
        make_study(search_settings_from(zipped))


def test_a_sweep_over_quantization_modes_gets_a_series_per_mode(make_cfg, tmp_path):
    import mlflow

    from src import tracking
    from src.summary import sweep_report

    settings = settings_from(make_cfg())
    experiment_id = tracking.connect(settings.tracking)
    client = mlflow.MlflowClient()
    jobs = [("flat", rate, mode) for mode in ("none", "int8") for rate in (0.3, 0.7)]
    for job, (method, rate, mode) in enumerate(jobs):
        run = client.create_run(experiment_id, tags={"sweep_id": "s", "sweep_job": str(job)})
        for key, value in {"prune.method": method, "prune.rate": rate, "quant.mode": mode,
                           "model.name": "resnet8", "data.name": "synthetic"}.items():
            client.log_param(run.info.run_id, key, value)
        for key, value in {"tflite_accuracy": 0.8 - rate / 2, "test_accuracy": 0.8,
                           "baseline_test_accuracy": 0.81, "tflite_zip_bytes": 9e4}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    runs = client.search_runs([experiment_id])
    text, _ = sweep_report(runs, tmp_path)
    header, *rows = text.splitlines()
    assert "quantization int8/float32, dense accuracy 81.00%" in header
    labels = [row.split("|")[2].strip() for row in rows[2:]]
    assert labels == ["flat float32", "flat float32", "flat int8", "flat int8"]


def test_a_job_refused_before_its_run_is_tabled_by_its_command(make_cfg, tmp_path):
    import mlflow

    from src import tracking
    from src.summary import sweep_report

    settings = settings_from(make_cfg())
    experiment_id = tracking.connect(settings.tracking)
    client = mlflow.MlflowClient()
    good = client.create_run(experiment_id, tags={"sweep_id": "s", "sweep_job": "1"})
    for key, value in {"prune.method": "flat", "prune.rate": 0.5, "quant.mode": "none",
                       "model.name": "resnet8", "data.name": "synthetic"}.items():
        client.log_param(good.info.run_id, key, value)
    for key, value in {"tflite_accuracy": 0.7, "test_accuracy": 0.71,
                       "baseline_test_accuracy": 0.8, "tflite_zip_bytes": 9e4}.items():
        client.log_metric(good.info.run_id, key, value)
    client.set_terminated(good.info.run_id)
    tracking.record_failure(settings.tracking, {  # as src.run records it: tags, no params
        "sweep_id": "s", "sweep_job": "0",
        "command": "python -m src.run experiment=quick prune=flat prune.rate=1.5"},
        "ConfigError: prune.rate: must be in [0, 1), got 1.5")
    text, _ = sweep_report(client.search_runs([experiment_id]), tmp_path)
    header, _, _, finished, failed = text.splitlines()  # by method, then rate
    assert "model resnet8, data synthetic, quantization float32, dense accuracy 80.00%" in header
    assert failed.startswith("| 0 | flat | 1.50 | nan% | nan% |") and "FAILED" in failed
    assert finished.startswith("| 1 | flat | 0.50 | 71.00% | 70.00% |")


def test_a_sweep_over_channel_widths_shows_each_jobs_widths_for_its_rate(make_cfg, tmp_path):
    import mlflow

    from src import tracking
    from src.summary import run_report, sweep_report

    settings = settings_from(make_cfg())
    experiment_id = tracking.connect(settings.tracking)
    client = mlflow.MlflowClient()
    for job, widths in enumerate(["[8, 8, 16]", "[4, 8, 8]", "None"]):
        run = client.create_run(experiment_id, tags={"sweep_id": "s", "sweep_job": str(job)})
        for key, value in {"prune.method": "channel", "prune.rate": 0.5, "prune.widths": widths,
                           "quant.mode": "int8", "model.name": "resnet8",
                           "data.name": "synthetic"}.items():
            client.log_param(run.info.run_id, key, value)
        for key, value in {"tflite_accuracy": 0.7, "test_accuracy": 0.7,
                           "baseline_test_accuracy": 0.8, "tflite_zip_bytes": 9e4}.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
    runs = client.search_runs([experiment_id])
    text, _ = sweep_report(runs, tmp_path)
    shown = {row.split("|")[1].strip(): row.split("|")[3].strip()
             for row in text.splitlines()[3:]}
    assert shown == {"0": "w8-8-16", "1": "w4-8-8", "2": "0.50"}  # not the unused rate
    first = next(r for r in runs if r.data.tags["sweep_job"] == "0")
    assert "prune channel w8-8-16, quantization int8" in run_report(first, tmp_path)[0]


def test_the_latest_run_is_the_one_that_finished_last(make_cfg):
    # A continued run keeps the start time of its first attempt: finishing last makes it latest.
    from src import summary, tracking

    cfg = settings_from(make_cfg()).tracking
    experiment_id, client = tracking.connect(cfg), mlflow.MlflowClient()
    continued, other = (client.create_run(experiment_id, start_time=start).info.run_id
                        for start in (1000, 2000))
    for run_id, end in ((other, 3000), (continued, 4000)):
        client.log_metric(run_id, "tflite_bytes", 1000)
        client.set_terminated(run_id, "FINISHED", end_time=end)
    assert summary.find_run("latest", cfg.experiment).info.run_id == continued
