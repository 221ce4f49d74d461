"""What a run says about itself: its name, its one-line headline, and what it prints."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

from src.config import Settings, widths_text
from src.units import KB

EXPERIMENT_NOTE = (
    "prunesweep: one run per compression experiment (dense baseline -> prune -> TFLite). "
    "Sweeps and searches are parent runs with their jobs or trials nested under them. "
    "Compare: tflite_accuracy against tflite_zip_kb (see the README, "
    "'Compare runs in the MLflow UI')."
)


# A dense baseline stored under results/models: '<model>-dense-<16 hex digits of its key>.h5'.
STORED_BASELINE = re.compile(r"(?P<model>.+)-dense-(?P<key>[0-9a-f]{16})")


def stored_baseline_name(model: str, key: str) -> str:
    """Returns the file name a dense baseline is stored under (read back by STORED_BASELINE)."""
    return f"{model}-dense-{key}.h5"


def model_label(settings: Settings) -> str:
    """Returns the model's short name, with its width multiplier when not 1, e.g. 'resnet8x0.5'.

    A model file is named by its file; a stored baseline by its model and the key's first six
    digits ('resnet8@7c1f1c'), short enough for the MLflow UI's name column to show the method.
    """
    model = settings.model
    return short_model_name(model.name, getattr(model, "path", None), model.alpha)


def short_model_name(name: str, path: str | None = None, alpha: float = 1.0) -> str:
    """Returns model_label's name from a config's model name, file path and width."""
    name = Path(path).stem if path else name
    if stored := STORED_BASELINE.fullmatch(name):
        name = f"{stored['model']}@{stored['key'][:6]}"
    return name if alpha == 1 else f"{name}x{alpha:g}"


def method_label(settings: Settings) -> str:
    """Returns the pruning method and its rate, e.g. 'flat 0.70', 'tfmot 0.90', 'dense', or
    the channel widths kept ('channel 8-8-16-16-64-48'), then the fine-tuning epochs and
    whether they distilled and averaged weights ('ft20 kd swa')."""
    prune = settings.prune
    if prune.method == "none":
        return "dense"
    if prune.method == "tfmot":
        return "tfmot 2:4" if prune.structured_2_4 else f"tfmot {prune.final_sparsity:.2f}"
    label = f"{prune.method} {prune.rate:.2f}"
    if getattr(prune, "widths", None):  # channels kept per group, given rather than a rate
        label = f"{prune.method} {widths_text(prune.widths)}"
    if getattr(prune, "rates_from", None):  # per-layer rates from a sensitivity run
        label += " sensitivity"
    if not prune.finetune_epochs:
        return label
    distilled = getattr(settings, "distill", None) and settings.distill.alpha > 0
    averaged = getattr(settings.train, "swa_start", None) is not None
    return f"{label} ft{prune.finetune_epochs}" + (" kd" if distilled else "") + \
        (" swa" if averaged else "")


def quant_label(settings: Settings) -> str:
    """Returns the export's number format ('float32' without quantization), '+sparse' if
    encoded, '+stripped' without names, then the quantization-aware epochs ('int8 qat10', 'int8
    qat10 kd' when distilled and not fine-tuned: method_label says kd then)"""
    mode = "float32" if settings.quant.mode == "none" else settings.quant.mode
    mode += "+sparse" if getattr(settings.quant, "sparse_encoding", False) else ""
    mode += "+stripped" if getattr(settings.quant, "strip_names", False) else ""
    epochs = getattr(settings.quant, "qat_epochs", 0)
    if not epochs:
        return mode
    # A teacher teaches quantization-aware training too: said here when no fine-tuning did.
    distilled = getattr(settings, "distill", None) and settings.distill.alpha > 0 and not (
        settings.prune.method != "none" and settings.prune.finetune_epochs)
    return f"{mode} qat{epochs}" + (" kd" if distilled else "")


def run_name(settings: Settings) -> str:
    """Returns the descriptive MLflow run name, e.g. 'resnet8 flat 0.70 int8'."""
    return f"{model_label(settings)} {method_label(settings)} {quant_label(settings)}"


def headline(settings: Settings, metrics: Mapping[str, float], run_id: str = "",
             widths: str | None = None) -> str:
    """Returns the run's one-line result: what it is, accuracy against dense, what pruning
    removed (a channel cut's widths and parameters, magnitude sparsity), sizes, MACs and
    latency (when measured)."""
    get = lambda key: metrics.get(key, math.nan)  # noqa: E731
    removed = f"sparsity {get('sparsity_global'):.1%}"
    if widths:  # sparsity only when magnitude pruning followed the cut
        removed = (f"widths {widths}, {count(get('params'))} of "
                   f"{count(get('baseline_params'))} params"
                   + (f", {removed}" if get("sparsity_global") >= 0.0005 else ""))
    line = (f"{run_name(settings)}: TFLite accuracy {get('tflite_accuracy'):.2%} "
            f"(dense {get('baseline_test_accuracy'):.2%}{teacher_clause(settings, metrics)}), "
            f"{removed}, "
            f".tflite {get('tflite_bytes') / KB:.1f} KB, "
            f"zipped {get('tflite_zip_bytes') / KB:.1f} KB, ")
    if "tflite_latency_ms" in metrics:
        threads = settings.measure.latency_threads
        line += (f"{get('macs') / 1e6:.2f}M MACs, {get('tflite_latency_ms'):.3f} ms "
                 f"({settings.measure.latency_kernels}, {threads} thread{'s' * (threads != 1)}), ")
    line += f"{get('accuracy_per_mb'):.2f} accuracy/MB"
    return f"{line}, run {run_id}" if run_id else line


def teacher_clause(settings: Settings, metrics: Mapping[str, float]) -> str:
    """Returns ', teacher resnet8x1.5@54abc3 + my-teacher 87.39%' for a run distilled from
    a teacher other than its own dense model, with the teacher's (the ensemble's) accuracy."""
    distill = getattr(settings, "distill", None)
    accuracy = metrics.get("teacher_test_accuracy")  # logged only when a teacher taught
    if not distill or not distill.teachers or accuracy is None:
        return ""
    names = " + ".join(short_model_name(Path(name).stem) for name in distill.teachers)
    return f", teacher {names} {accuracy:.2%}"


def count(n: float) -> str:
    """Returns a parameter count as 15.0k or 2.24M ('-' when unknown: nan)."""
    if not math.isfinite(n):
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def size_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Returns the export sizes in KB (tflite_kb, tflite_zip_kb), readable in the MLflow UI."""
    return {"tflite_kb": metrics["tflite_bytes"] / KB,
            "tflite_zip_kb": metrics["tflite_zip_bytes"] / KB}


def baseline_line(settings: Settings, key: str, reused: bool) -> str:
    """Returns the line saying whether the dense baseline is reused or trained now."""
    if reused:
        return f"dense baseline: reused from the cache (key {key})"
    return (f"dense baseline: not cached, training {model_label(settings)} for "
            f"{settings.train.epochs} epoch{'s' * (settings.train.epochs != 1)} (key {key})")
