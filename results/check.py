"""Re-evaluates every row of results/table.json on the test split and checks it.

    python -m results.check [--data ../shared/datasets/cifar10-jpg.tar.gz] [--tolerance 0.003]
                            [--only-tflite]

A row with a committed .tflite file must have the table's file size and reach the table's
TFLite accuracy within the tolerance (0.3 points), run with LiteRT. A one-shot row checked from
its committed dense baseline is pruned again with the row's settings and must reach the table's
Keras accuracy. Exits 1 on any mismatch or on a row that cannot be re-evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from ai_edge_litert.interpreter import Interpreter
from omegaconf import OmegaConf

from src import data
from src.config import PROJECT_ROOT, settings_from
from src.keras_env import keras
from src.prune import prune
from src.quantize import evaluate_tflite
from src.train import evaluate
from src.units import zipped_size

RESULTS = PROJECT_ROOT / "results"


def check(results: Path, data_path: Path | None, tolerance: float,
          only_tflite: bool = False) -> list[str]:
    """Returns one line per row; lines starting with FAIL are mismatches."""
    rows = json.loads((results / "table.json").read_text())
    if only_tflite:
        rows = [row for row in rows if row["check"] == "tflite"]
    datasets: dict[str, data.Dataset] = {}
    dense: dict[Path, tuple[keras.Model, list]] = {}  # each baseline read once, reset per row
    lines = []
    with tempfile.TemporaryDirectory() as scratch:
        # Decoded datasets are cached where runs cache them (decoding JPEGs takes a while).
        cache = PROJECT_ROOT / "mlruns" / "cache" if (PROJECT_ROOT / "mlruns").is_dir() \
            else scratch
        for row in rows:
            settings = settings_from(OmegaConf.create(row["config"]))
            data_cfg = settings.data
            if data_path is not None:
                data_cfg = replace(data_cfg, path=str(data_path))
            elif data_cfg.path and not Path(data_cfg.path).expanduser().is_absolute():
                data_cfg = replace(data_cfg, path=str(PROJECT_ROOT / data_cfg.path))
            key = repr(data_cfg)
            if key not in datasets:
                datasets[key] = data.load(data_cfg, cache)
            lines.append(_check_row(row, settings, datasets[key], results, tolerance, dense))
    return lines


def _check_row(row: dict, settings, dataset: data.Dataset, results: Path, tolerance: float,
               dense: dict[Path, tuple[keras.Model, list]]) -> str:
    label = f"{row['experiment']} / {row['name']}"
    if row["check"] == "tflite":
        payload = (results / row["file"]).read_bytes()
        if settings.model.name == "file":  # the data as the run fed it: the file's input
            _, height, width, channels = Interpreter(model_content=payload) \
                .get_input_details()[0]["shape"]
            dataset = _fitted(dataset, settings, (height, width, channels))
        accuracy = evaluate_tflite(payload, dataset.x_test, dataset.y_test)
        ok = abs(accuracy - row["tflite_accuracy"]) <= tolerance \
            and len(payload) == row["tflite_bytes"]
        return (f"{'ok  ' if ok else 'FAIL'} {label}: TFLite accuracy {accuracy:.4f} "
                f"(table {row['tflite_accuracy']:.4f}), {len(payload)} bytes "
                f"(table {row['tflite_bytes']:.0f}), zipped "
                f"{zipped_size(payload, 'model.tflite')} bytes")
    if row["check"] == "keras_oneshot":
        path = results / row["file"]
        if path not in dense:
            model = keras.models.load_model(path, compile=False)
            dense[path] = model, model.get_weights()
        model, weights = dense[path]
        model.set_weights(weights)  # undo the previous row's pruning
        if settings.model.name == "file":
            dataset = _fitted(dataset, settings, model.input_shape[1:])
        pruned = prune(model, settings.prune, dataset, settings.train).model
        accuracy = evaluate(pruned, dataset.x_test, dataset.y_test)
        ok = abs(accuracy - row["test_accuracy"]) <= tolerance
        return (f"{'ok  ' if ok else 'FAIL'} {label}: Keras accuracy {accuracy:.4f} "
                f"(table {row['test_accuracy']:.4f}), re-pruned from {row['file']}")
    return f"FAIL {label}: nothing committed to re-evaluate it with"


def _fitted(dataset: data.Dataset, settings, shape) -> data.Dataset:
    """Returns the data resized and scaled to a model file's input, as model=file runs fit it."""
    height, width, channels = (int(d) if d else None for d in shape)
    return data.fit_to_input(dataset, height, width, channels or 3, settings.model.input_scale)


def main() -> None:
    """Command line: prints one line per row, exits 1 on a mismatch."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset to evaluate on (default: each row's data.path)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--tolerance", type=float, default=0.003)
    parser.add_argument("--only-tflite", action="store_true",
                        help="only the committed .tflite models (seconds, as CI runs it)")
    args = parser.parse_args()
    if not (args.results / "table.json").exists():
        raise SystemExit(f"error: {args.results / 'table.json'} not found; "
                         "run python -m results.collect first")
    lines = check(args.results, args.data, args.tolerance, args.only_tflite)
    print("\n".join(lines))
    failed = sum(line.startswith("FAIL") for line in lines)
    print(f"{len(lines) - failed} of {len(lines)} rows re-evaluate within "
          f"{args.tolerance * 100:.1f} points")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
