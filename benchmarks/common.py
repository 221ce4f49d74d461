"""Shared helpers for the benchmarks: where the data is, how to run the CLI and time it."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import mlflow

from src import speed
from src.config import PROJECT_ROOT

CIFAR_JPG = PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


def data_overrides(limit_train: int | None) -> list[str]:
    """Returns overrides for CIFAR-10 (JPEG q75 copy) when present, else synthetic data."""
    if CIFAR_JPG.exists():
        limit = [f"data.limit_train={limit_train}"] if limit_train else []
        return [f"data.path={CIFAR_JPG}", *limit]
    return ["data=synthetic", "data.n_train=4000", "data.n_test=1000"]


def data_label() -> str:
    """Returns how to name the data next to every number."""
    found = CIFAR_JPG.exists()
    return "CIFAR-10 (JPEG q75 copy)" if found else "synthetic data (no CIFAR-10 found)"


def timed_cli(module: str, *overrides: str, log: Path | None = None) -> float:
    """Runs `python -m module overrides...` and returns its wall time in seconds.

    Its output goes to log when given, else nowhere."""
    with open(log or os.devnull, "w") as out:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", module, *overrides], cwd=PROJECT_ROOT, check=True,
                       stdout=out, stderr=subprocess.STDOUT,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return time.perf_counter() - started


def runs(root: Path, experiment: str = "prunesweep") -> list[mlflow.entities.Run]:
    """Returns the runs of an experiment in the MLflow store under root/mlruns."""
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def machine() -> str:
    """Returns the machine line printed with every result."""
    return (f"{date.today()} on {speed.processor()}, {platform.machine()} with "
            f"{os.cpu_count()} cores, Python {platform.python_version()}")


def add_kernels_argument(parser: argparse.ArgumentParser) -> None:
    """Adds --kernels: LiteRT's default XNNPACK delegate, or its built-in kernels."""
    parser.add_argument("--kernels", choices=speed.KERNELS, default=speed.KERNELS[0],
                        help="LiteRT's default XNNPACK delegate, or its built-in kernels")


def latency_table(files: dict[str, bytes], stats: dict[str, speed.LatencyStats],
                  columns: dict[str, dict[str, str]] | None = None,
                  ratio: str = "vs first") -> list[str]:
    """Returns a markdown table with one row per timed .tflite file: any extra columns (by
    heading, then by file name), raw bytes, MACs, median and p90 ms, and its speed against the
    first file."""
    columns = columns or {}
    first = stats[next(iter(files))].median_ms
    lines = ["| model | " + "".join(f"{heading} | " for heading in columns)
             + f"raw bytes | MACs | median ms | p90 ms | {ratio} |",
             "|---" * (6 + len(columns)) + "|"]
    for name, found in stats.items():
        extra = "".join(f"{values[name]} | " for values in columns.values())
        lines.append(f"| {name} | {extra}{len(files[name])} | {speed.tflite_macs(files[name])} | "
                     f"{found.median_ms:.4f} | {found.p90_ms:.4f} | "
                     f"{first / found.median_ms:.2f}x |")
    return lines
