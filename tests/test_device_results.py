"""The results page's three-objective front is recomputed from the study's rows."""

from __future__ import annotations

from results.collect import DEVICE_EXPERIMENT, device_section, pareto_rows


def _row(name: str, accuracy: float, raw: int, latency: float) -> dict:
    return {"name": name, "experiment": DEVICE_EXPERIMENT, "tflite_accuracy": accuracy,
            "tflite_bytes": raw, "tflite_zip_bytes": raw // 2, "tflite_latency_ms": latency,
            "macs": 1000}


def test_front_keeps_exactly_the_rows_nothing_beats_on_all_three():
    rows = [_row("best", 0.80, 90_000, 0.10), _row("small", 0.70, 40_000, 0.07),
            _row("beaten", 0.69, 41_000, 0.08), _row("fast", 0.60, 60_000, 0.05),
            _row("tie-of-best", 0.80, 90_000, 0.10)]
    keys = {"tflite_accuracy": 1, "tflite_bytes": -1, "tflite_latency_ms": -1}
    assert [r["name"] for r in pareto_rows(rows, keys)] == ["best", "small", "fast",
                                                            "tie-of-best"]
    text = device_section(rows + [{**_row("other", 0.99, 1, 0.01), "experiment": "channel"}])
    assert "| small | 70.00% | 40000 |" in text and "beaten" not in text and "other" not in text
    assert device_section([_row("x", 0.5, 1, 1.0) | {"experiment": "channel"}]) == ""
