"""The results table: collected from MLflow runs, and every row re-evaluated by the check."""

from __future__ import annotations

import json

import matplotlib
import pytest

from results import check, collect
from src.run import run
from tests.conftest import assert_png

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
    with pytest.raises(SystemExit, match="--experiment tabel: no finished runs"):
        collect.collect(["table", "tabel"], uri, out, max_model_bytes=10**9)
    assert all((out / r["file"]).exists() for r in rows)

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
