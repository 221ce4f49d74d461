"""Re-evaluates every committed model of results/table.json on the test split and checks it.

    python -m results.check [--data ../shared/datasets/cifar10-jpg.tar.gz] [--tolerance 0.003]

Each committed .tflite file must have the size in the table and reach the table's TFLite
accuracy within the tolerance (0.3 points) on CIFAR-10 (JPEG q75 copy). Exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from io import BytesIO
from pathlib import Path

from src import data
from src.config import PROJECT_ROOT, DataConfig
from src.quantize import evaluate_tflite

RESULTS = PROJECT_ROOT / "results"


def zipped_size(payload: bytes, name: str) -> int:
    """Returns the deflate-zipped size, measured the way the runs measure it."""
    buffer = BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, payload)
    return len(buffer.getvalue())


def check(data_path: Path, tolerance: float) -> list[str]:
    """Returns one line per committed model; lines starting with FAIL are mismatches."""
    rows = json.loads((RESULTS / "table.json").read_text())
    with tempfile.TemporaryDirectory() as cache:
        dataset = data.load(DataConfig(name="cifar10", path=str(data_path)), cache)
    lines = []
    for row in rows:
        if not row["model"]:
            continue
        payload = (RESULTS / row["model"]).read_bytes()
        accuracy = evaluate_tflite(payload, dataset.x_test, dataset.y_test)
        ok = abs(accuracy - row["tflite_accuracy"]) <= tolerance \
            and len(payload) == row["tflite_bytes"]
        lines.append(f"{'ok  ' if ok else 'FAIL'} {row['name']}: accuracy {accuracy:.4f} "
                     f"(table {row['tflite_accuracy']:.4f}), {len(payload)} bytes "
                     f"(table {row['tflite_bytes']:.0f}), zipped "
                     f"{zipped_size(payload, 'model.tflite')} bytes")
    return lines


def main() -> None:
    """Command line: prints one line per model, exits 1 on a mismatch."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path,
                        default=PROJECT_ROOT.parent / "shared/datasets/cifar10-jpg.tar.gz")
    parser.add_argument("--tolerance", type=float, default=0.003)
    args = parser.parse_args()
    lines = check(args.data, args.tolerance)
    print("\n".join(lines))
    if any(line.startswith("FAIL") for line in lines):
        sys.exit(1)


if __name__ == "__main__":
    main()
