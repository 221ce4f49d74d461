"""The results table: collected from MLflow runs, and every row re-evaluated by the check."""

from __future__ import annotations

import json

import matplotlib

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

    text = collect.render(rows, "--experiment table")
    assert "resnet8-flat-0.50-none" in text and "not re-evaluable" in text
    assert "## Frontier" in text and "## One-shot pruning" in text
    assert collect.oneshot_plot(rows, out / "oneshot.png")
    assert_png(out / "oneshot.png")
