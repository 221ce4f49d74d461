"""The results table: collected from MLflow runs, and every row re-evaluated by the check."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib
import mlflow
import pytest

from results import check, collect
from src.experiment import run
from tests.conftest import MLFLOW_SERVER_ENV, assert_png

matplotlib.use("Agg")


def test_collect_then_check_reevaluates_every_row(make_cfg, tmp_path):
    oneshot = make_cfg("prune=flat", "prune.rate=0.5", "tracking.experiment=table")
    finetuned = make_cfg("prune=layer", "prune.rate=0.3", "prune.finetune_epochs=1",
                         "quant=int8", "tracking.experiment=table")
    run(oneshot)
    run(finetuned)
    uri = oneshot.tracking.uri

    # Small files are committed and run with LiteRT.
    out = tmp_path / "results"
    rows = collect.collect(["table"], uri, out, max_model_bytes=10**9)
    assert {r["name"] for r in rows} == {"resnet8-flat-0.50-none", "resnet8-layer-0.30-ft1-int8"}
    assert all(r["check"] == "tflite" and (out / r["file"]).exists() for r in rows)
    assert all(r["command"] or r["config"] for r in rows)
    (out / "table.json").write_text(json.dumps(rows))
    lines = check.check(out, None, tolerance=0.003)
    assert len(lines) == 2 and all(line.startswith("ok") for line in lines), lines

    # A misspelt experiment is refused before any committed file is touched.
    with pytest.raises(collect.CollectError, match="--experiment tabel: no finished runs"):
        collect.collect(["table", "tabel"], uri, out, max_model_bytes=10**9)
    assert all((out / r["file"]).exists() for r in rows)

    # --keep on a new machine: a row whose run this store does not hold stays, with its file;
    # of two rows with the same settings the newer run's stays; a row whose run this store
    # holds unfinished (failed or deleted since) goes.
    def copied(row: dict, **changes) -> dict:
        return {**json.loads(json.dumps(row)), **changes}

    elsewhere = copied(rows[0], run_id="elsewhere", name="resnet8-flat-0.60-none",
                       file="models/elsewhere.tflite")
    elsewhere["config"]["prune"]["rate"] = 0.6
    shutil.copyfile(out / rows[0]["file"], out / elsewhere["file"])
    older = copied(rows[1], run_id="older", start_time=rows[1]["start_time"] - 1)
    newer = copied(rows[0], run_id="newer", start_time=rows[0]["start_time"] + 1)
    client = mlflow.MlflowClient(uri)
    unfinished = client.create_run(client.get_experiment_by_name("table").experiment_id)
    gone = copied(elsewhere, run_id=unfinished.info.run_id, name="resnet8-flat-0.70-none")
    gone["config"]["prune"]["rate"] = 0.7
    again = collect.collect(["table"], uri, out, max_model_bytes=10**9,
                            kept_rows=[elsewhere, older, newer, gone])
    by_run = {r["run_id"]: r for r in again}
    assert sorted(by_run) == sorted(["newer", rows[1]["run_id"], "elsewhere"])
    assert by_run["newer"]["merged_runs"] == [rows[0]["run_id"]]
    assert by_run[rows[1]["run_id"]]["merged_runs"] == ["older"]
    assert all((out / r["file"]).exists() for r in again)
    # Two different rows under one name would overwrite each other: refused, nothing touched.
    clash = {**elsewhere, "name": rows[0]["name"]}
    with pytest.raises(collect.CollectError, match="different settings but one name"):
        collect.collect(["table"], uri, out, max_model_bytes=10**9, kept_rows=[clash])
    assert (out / elsewhere["file"]).exists()

    # A wrong number in the table is caught.
    rows[0]["tflite_accuracy"] += 0.05
    (out / "table.json").write_text(json.dumps(rows))
    assert check.check(out, None, tolerance=0.003)[0].startswith("FAIL")

    # Too large to commit: a one-shot row is re-pruned from its dense baseline; a fine-tuned
    # one cannot be re-evaluated, and the check says so instead of passing it.
    out = tmp_path / "large"
    rows = collect.collect(["table"], uri, out, max_model_bytes=0)
    by_name = {r["name"]: r for r in rows}
    assert by_name["resnet8-flat-0.50-none"]["check"] == "keras_oneshot"
    assert by_name["resnet8-layer-0.30-ft1-int8"]["check"] is None
    (out / "table.json").write_text(json.dumps(rows))
    lines = dict(zip([r["name"] for r in rows], check.check(out, None, tolerance=0.003)))
    assert lines["resnet8-flat-0.50-none"].startswith("ok"), lines
    assert lines["resnet8-layer-0.30-ft1-int8"].startswith("FAIL")
    assert check.check(out, None, tolerance=0.003, only_tflite=True) == []

    text = collect.render(rows, "--experiment table")
    assert "resnet8-flat-0.50-none" in text and "not re-evaluable" in text
    assert "## Frontier" in text and "## One-shot pruning" in text
    assert collect.oneshot_plot(rows, out / "oneshot.png")
    assert_png(out / "oneshot.png")


def test_reference_section_compares_every_reference_number():
    def row(method: str, quant: str, **metrics) -> dict:
        return {"name": f"mobilenetv2-{method}-{quant}", "config": {
            "model": {"name": "mobilenetv2"},
            "prune": {"method": method, "final_sparsity": 0.9 if method == "tfmot" else None},
            "quant": {"mode": quant}}, **metrics}

    mib = 1024 * 1024  # the reference's unit
    rows = [row("none", "none", test_accuracy=0.80, model_bytes=9.10 * mib),
            row("tfmot", "int8", test_accuracy=0.64, tflite_accuracy=0.70,
                model_zip_bytes=2.00 * mib, tflite_zip_bytes=0.60 * mib),
            row("tfmot", "int8", test_accuracy=0.60, tflite_accuracy=0.60,  # a worse recipe
                model_zip_bytes=1.00 * mib, tflite_zip_bytes=0.50 * mib)]
    section = collect.reference_section(rows).split("Every tfmot int8 row")[0]
    cells = [line.strip("| ").split(" | ") for line in section.splitlines()
             if line.startswith("| ") and not line.startswith("| what")]
    verdicts = {row[0]: row[3] for row in cells}
    assert verdicts == {
        "dense test accuracy": "yes",                                  # 80% > 67%
        "tfmot 50% -> 90% sparsity, Keras accuracy": "no",             # 64% < 65%
        "same, after int8 TFLite quantization": "yes",                 # 70% > 63%
        "model size (dense .h5)": "yes",                               # 9.10 < 9.15 MiB
        "pruned model, zipped (.h5, 90% tfmot)": "yes",                # 2.00 < 2.16 MiB
        "quantized (int8 TFLite, 90% tfmot, zipped)": "no",            # 0.60 > 0.56 MiB
    }


def test_runs_differing_in_one_setting_are_two_rows_and_identical_ones_merge(make_cfg, tmp_path):
    def finetuned(lr: str):
        return make_cfg("prune=flat", "prune.rate=0.5", "prune.finetune_epochs=1",
                        f"prune.finetune_lr={lr}", "tracking.experiment=lr")

    run(finetuned("0.01"))
    run(finetuned("0.001"))
    newest = finetuned("0.001")
    run(newest)  # the same settings again: one row, the newest run's
    out = tmp_path / "results"
    rows = collect.collect(["lr"], newest.tracking.uri, out, max_model_bytes=10**9)
    names = sorted(r["name"] for r in rows)
    assert names == ["resnet8-flat-0.50-ft1-none-prune.finetune_lr=0.001",
                     "resnet8-flat-0.50-ft1-none-prune.finetune_lr=0.01"]
    assert len({(out / r["file"]).name for r in rows}) == 2
    merged = next(r for r in rows if r["config"]["prune"]["finetune_lr"] == 0.001)
    runs = mlflow.search_runs(experiment_names=["lr"], output_format="list",
                              order_by=["attributes.start_time DESC"])
    lr_of = {r.info.run_id: r.data.params["prune.finetune_lr"] for r in runs}
    assert merged["run_id"] == runs[0].info.run_id  # the newest
    assert len(merged["merged_runs"]) == 1 and lr_of[merged["merged_runs"][0]] == "0.001"


def test_a_run_without_its_config_is_an_error_naming_it_and_nothing_changes(make_cfg,
                                                                            tmp_path):
    cfg = make_cfg("prune=flat", "prune.rate=0.5", "tracking.experiment=broken")
    run(cfg)
    out = tmp_path / "results"
    collect.collect(["broken"], cfg.tracking.uri, out, max_model_bytes=10**9)
    before = sorted(p.name for p in (out / "models").iterdir())
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("broken").experiment_id,
                          run_name="lost-config") as lost:
        mlflow.log_metric("tflite_bytes", 1000)
    with pytest.raises(collect.CollectError, match=f"run {lost.info.run_id} \\(lost-config\\)"
                       ".*no config.yaml"):
        collect.collect(["broken"], cfg.tracking.uri, out, max_model_bytes=10**9)
    assert sorted(p.name for p in (out / "models").iterdir()) == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _mlflow_server(root: Path, template: Path) -> Iterator[Callable[[float], str]]:
    """Starts an MLflow server on loopback that proxies artifacts to root/artifacts; yields a
    function that waits (at most its timeout) until the server answers and returns its URL.

    Its store starts as a copy of the empty template, so it skips MLflow's schema migrations."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, root / "server.db")
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **MLFLOW_SERVER_ENV})
    url = f"http://127.0.0.1:{port}"

    def ready(timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                return url
            except OSError:
                assert server.poll() is None, "the MLflow server exited at start-up"
                assert time.monotonic() < deadline, f"no MLflow server at {url} after {timeout} s"
                time.sleep(0.5)

    try:
        yield ready
    finally:
        mlflow.set_tracking_uri("sqlite://")  # let go of the server before it stops
        server.terminate()
        server.wait(timeout=30)


# What differs between two stores holding the same experiments: where and when they ran.
WHERE_AND_WHEN = ("run_id", "command", "train_seconds", "merged_runs", "start_time", "end_time",
                  "tflite_latency_ms")


def test_collect_reads_a_server_with_proxied_artifacts_like_the_local_store(make_cfg,
                                                                           tmp_path,
                                                                           mlflow_template):
    overrides = [("prune=flat", "prune.rate=0.5"), ("prune=layer", "prune.rate=0.5", "quant=int8")]
    tables = {}
    # The server starts while the local runs run.
    with _mlflow_server(tmp_path / "server", mlflow_template) as ready:
        for store in ("local", "server"):
            tracking = [] if store == "local" else [f"tracking.uri={ready(180)}",
                                                    "tracking.artifact_location=null"]
            for extra in overrides:  # one-shot rows from one cached baseline: same numbers
                cfg = make_cfg(*extra, "tracking.experiment=table", *tracking)
                run(cfg)
            out = tmp_path / store
            rows = collect.collect(["table"], cfg.tracking.uri, out, max_model_bytes=10**9)
            tables[store] = [{k: v for k, v in row.items() if k not in WHERE_AND_WHEN}
                             | {"config": {k: v for k, v in row["config"].items()
                                           if k != "tracking"},
                                "bytes": (out / row["file"]).read_bytes()} for row in rows]
        server_run = mlflow.MlflowClient(ready(0)).get_run(rows[0]["run_id"])
    assert server_run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, not a path
    assert len(tables["server"]) == 2
    assert tables["server"] == tables["local"]


def test_committed_model_files_and_teachers_that_rows_start_from_are_kept(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name in ("resnet8-dense-7c1f1c4d60827d67.h5", "resnet8x1.5-dense-54abc3a6ca142f2b.h5",
                 "other-dense-0123456789abcdef.h5"):
        (models / name).write_bytes(b"h5")
    config = {"model": {"name": "file", "path": str(models / "resnet8-dense-7c1f1c4d60827d67.h5")},
              "distill": {"teacher": "54abc3a6ca142f2b"}}  # a teacher named by its cache key
    assert sorted(p.name for p in collect.committed_sources(config, tmp_path)) == [
        "resnet8-dense-7c1f1c4d60827d67.h5", "resnet8x1.5-dense-54abc3a6ca142f2b.h5"]
    built_in = {"model": {"name": "resnet8"}, "distill": {"teacher": None}}
    assert collect.committed_sources(built_in, tmp_path) == []


def test_a_2_4_row_is_named_and_plotted_at_half_sparsity():
    from src.summary import _rate

    tfmot = {"method": "tfmot", "final_sparsity": 0.9, "structured_2_4": True}
    config = {"model": {"name": "mobilenetv2"}, "prune": tfmot, "quant": {"mode": "int8"}}
    assert collect.row_name(config) == "mobilenetv2-tfmot-0.50-int8"
    params = {"prune.method": "tfmot", "prune.final_sparsity": "0.9"}
    assert _rate({**params, "prune.structured_2_4": "True"}) == 0.5
    assert _rate({**params, "prune.structured_2_4": "False"}) == 0.9


def test_one_shot_rows_of_two_model_files_keep_their_own_cells():
    def row(model: dict, accuracy: float, **prune) -> dict:
        return {"name": "x", "test_accuracy": accuracy, "config": {
            "model": model, "quant": {"mode": "none"},
            "prune": {"method": "flat", "rate": 0.5, "finetune_epochs": 0, **prune}}}

    stored = {"name": "file", "path": "results/models/mobilenetv2-dense-ff0d8ba43085ed5e.h5"}
    rows = [row({"name": "mobilenetv2"}, 0.70), row(stored, 0.71),
            row({"name": "file", "path": "mine.keras"}, 0.50),
            row({"name": "mobilenetv2"}, 0.10, min_density=0.2)]  # not the reference figure
    found = collect.oneshot_rows(rows)
    assert {key: r["test_accuracy"] for key, r in found.items()} == {
        ("mobilenetv2", "flat", 0.5): 0.70, ("mobilenetv2@ff0d8b", "flat", 0.5): 0.71,
        ("mine", "flat", 0.5): 0.50}
    section = collect.model_file_section(rows)  # the stored baseline beside its trained sweep
    assert "| flat | 0.5 | 0.7100 | 0.7000 | +1.00 |" in section and "0.5000" not in section


def test_check_feeds_a_model_file_row_the_data_as_its_run_did(make_cfg, tmp_path):
    from src.config import settings_from
    from src.data import load

    settings = settings_from(make_cfg("model=file", f"model.path={tmp_path / 'm.keras'}",
                                      "model.input_scale=unit"))
    dataset = load(settings.data, tmp_path)
    fitted = check._fitted(dataset, settings, (16, 16, None))
    assert fitted.x_test.shape[1:] == (16, 16, 3)
    assert fitted.x_test.dtype == "float32" and 0 <= fitted.x_test.min() <= fitted.x_test.max() <= 1


def test_the_channel_table_times_every_row_with_xnnpack_and_the_builtin_kernels(tmp_path,
                                                                             monkeypatch):
    from src import speed

    def row(name: str, method: str, size: int, accuracy: float) -> dict:
        (tmp_path / f"{name}.tflite").write_bytes(name.encode())
        return {"experiment": "channel", "check": "tflite", "name": name, "run_id": name,
                "file": f"{name}.tflite", "baseline_test_accuracy": 0.86,
                "tflite_accuracy": accuracy, "tflite_bytes": size, "tflite_zip_bytes": size // 2,
                "macs": 1, "params": 1,
                "config": {"model": {"name": "resnet8"}, "quant": {"mode": "int8"},
                           "prune": {"method": method}, "distill": {"alpha": 0.0}}}

    # XNNPACK: the cut row only 1.25x faster; the built-in kernels: 2x.
    medians = {"xnnpack": {"dense": 1.0, "cut": 0.8}, "builtin": {"dense": 2.0, "cut": 1.0}}
    timed = []

    def compare_latency(files, threads, warmup, runs, repeats, kernels):
        timed.append((kernels, sorted(files)))
        assert files == {"channel/cut": b"cut", "channel/dense": b"dense"}  # the rows' files
        return {key: speed.LatencyStats(medians[kernels][key.split("/")[1]], 0, runs)
                for key in files}

    monkeypatch.setattr(speed, "compare_latency", compare_latency)
    rows = [row("dense", "none", 96_000, 0.86), row("cut", "channel", 50_000, 0.85)]
    lines = collect.channel_section(rows, tmp_path).splitlines()
    assert timed == [(k, ["channel/cut", "channel/dense"]) for k in ("xnnpack", "builtin")]
    header = next(line for line in lines if line.startswith("| row |"))
    assert header.endswith("| XNNPACK ms | speed-up | built-in ms | speed-up |")
    assert lines[lines.index(header) + 1] == "|---" * (header.count("|") - 1) + "|"
    by_name = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert by_name["dense"].endswith("| 1.0000 | 1.00x | 2.0000 | 1.00x |")
    assert by_name["cut"].endswith("| 0.8000 | 1.25x | 1.0000 | 2.00x |")
    assert [line for line in lines if line.startswith("- ")] == [
        "- XNNPACK kernels: no row fits the size and speed-up.",
        "- built-in kernels: best fitting row cut: 85.00% (+1.00 points against the target: "
        "met)."]
