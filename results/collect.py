"""Collects finished runs of an MLflow experiment into the results table.

    python -m results.collect --experiment reference [--max-model-bytes 3000000]

Writes results/table.json (one row per run: metrics, the exact command, the resolved config)
and copies each run's .tflite file into results/models/ when it is small enough to commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import mlflow
import yaml

from src.config import PROJECT_ROOT

RESULTS = PROJECT_ROOT / "results"
METRICS = ["baseline_test_accuracy", "test_accuracy", "tflite_accuracy", "sparsity_global",
           "tflite_sparsity", "model_bytes", "model_zip_bytes", "tflite_bytes",
           "tflite_zip_bytes", "accuracy_per_mb"]


def row_name(config: dict) -> str:
    """Returns a short file-safe name for a run: model, pruning, rate, quantization."""
    prune = config["prune"]
    rate = prune.get("final_sparsity") if prune["method"] == "tfmot" else prune.get("rate")
    parts = [config["model"]["name"], prune["method"]]
    if rate is not None:
        parts.append(f"{float(rate):.2f}")
    parts.append(config["quant"]["mode"])
    return "-".join(parts)


def collect(experiment: str, uri: str, max_model_bytes: int) -> list[dict]:
    """Returns the rows of the experiment's finished runs, newest run per name."""
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    rows: dict[str, dict] = {}
    for run in runs:
        artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
        if "tflite_bytes" not in run.data.metrics or not (artifacts / "config.yaml").exists():
            continue
        config = yaml.safe_load((artifacts / "config.yaml").read_text())
        name = row_name(config)
        if name in rows:
            continue
        row = {"name": name, "run_id": run.info.run_id,
               "command": run.data.tags.get("command", ""),
               **{k: run.data.metrics[k] for k in METRICS}, "config": config, "model": None}
        if row["tflite_bytes"] <= max_model_bytes:
            target = RESULTS / "models" / f"{name}.tflite"
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(artifacts / "model.tflite", target)
            row["model"] = str(target.relative_to(RESULTS))
        rows[name] = row
    return sorted(rows.values(), key=lambda r: r["name"])


HEADER = """# Results

Written by `python -m results.collect --experiment {experiment}` from the MLflow runs; every
number below was measured by the run named in its row, on CIFAR-10 (JPEG q75 copy,
../shared/datasets/cifar10-jpg.tar.gz): 45,000 training images (5,000 more held out for
validation) and the 10,000 test images. Accuracies are top-1 on the whole test split.
`python -m results.check` re-evaluates every committed model (`models/`) and checks it against
this table (within 0.3 points); models over 3 MB are not committed.

"""
COLUMNS = ["row", "Keras acc", "TFLite acc", "sparsity", "model MB", "zipped MB", "TFLite MB",
           "TFLite zipped MB", "committed"]


def render(rows: list[dict], experiment: str) -> str:
    """Returns results/README.md: the table, then the exact command of every row."""
    lines = [HEADER.format(experiment=experiment), "| " + " | ".join(COLUMNS) + " |\n",
             "|" + "---|" * len(COLUMNS) + "\n"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['test_accuracy']:.4f} | {r['tflite_accuracy']:.4f} | "
            f"{r['sparsity_global']:.3f} | {r['model_bytes'] / 1e6:.2f} | "
            f"{r['model_zip_bytes'] / 1e6:.2f} | {r['tflite_bytes'] / 1e6:.3f} | "
            f"{r['tflite_zip_bytes'] / 1e6:.3f} | {'yes' if r['model'] else 'no'} |\n")
    lines.append("\nDense baseline(s): " + ", ".join(sorted(
        {f"{r['config']['model']['name']} {r['baseline_test_accuracy']:.4f}" for r in rows}))
        + " Keras test accuracy.\n\n## Commands\n\n")
    lines += [f"- {r['name']}: `{r['command'] or 'see table.json (config)'}`\n" for r in rows]
    return "".join(lines)


def main() -> None:
    """Command line: writes table.json, README.md and models/."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="reference")
    parser.add_argument("--uri", default=f"sqlite:///{PROJECT_ROOT}/mlruns/mlflow.db")
    parser.add_argument("--max-model-bytes", type=int, default=3_000_000)
    args = parser.parse_args()
    rows = collect(args.experiment, args.uri, args.max_model_bytes)
    (RESULTS / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "README.md").write_text(render(rows, args.experiment))
    for row in rows:
        print(f"{row['name']:40s} keras {row['test_accuracy']:.4f} tflite "
              f"{row['tflite_accuracy']:.4f} zip {row['tflite_zip_bytes'] / 1e6:.3f} MB "
              f"model {'committed' if row['model'] else 'too large to commit'}")


if __name__ == "__main__":
    main()
