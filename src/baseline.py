"""The dense baseline: trained once per (data, model, train recipe) and reused from a cache.

Entries live in ``<cache_dir>/baselines/<key>/`` and are keyed by what shapes the trained
weights (see ``baseline_key``).  They are written under a temporary name and renamed,
guarded by a file lock, and checked by sha256 before use.  While one trains, a resumable
checkpoint lives next to it in ``<key>.ckpt/`` and is removed once the entry is stored.
A fine-tuning after pruning is resumable the same way, from ``finetune/<key>.ckpt/``
(``finetune_key``), removed once the run has its model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from src.checkpoint import EpochCheckpoint
from src.config import (
    DataConfig,
    DistillConfig,
    ModelConfig,
    PruneConfig,
    TrainConfig,
    with_replaced_at_default,
    without_added_defaults,
)
from src.data import Dataset
from src.keras_env import keras, tf
from src.locks import file_lock
from src.models import build
from src.train import RECIPE_VERSION, evaluate, fit

CACHE_VERSION = 3
MODEL_FILE = "model.h5"


@dataclass
class Baseline:
    """A trained dense model and where it came from."""

    model: keras.Model
    key: str
    reused: bool
    history: dict
    test_accuracy: float
    train_seconds: float
    evaluate_seconds: float
    resumed_from_epoch: int = 0  # epochs restored from an interrupted training's checkpoint
    test_fingerprint: str = ""  # the test split test_accuracy was measured on


# Settings that change how training runs, not what it learns.
RUNTIME_ONLY = {"train": ("verbose", "checkpoint_every", "jit_compile"),
                "data": ("path", "limit_test", "n_test")}


def baseline_key(data: Dataset, data_cfg: DataConfig, model_cfg: ModelConfig,
                 train_cfg: TrainConfig) -> str:
    """Returns the content address of the baseline these settings would train.

    It covers the architecture, the train recipe, the train/validation data (by content
    fingerprint), the TensorFlow and Keras versions and RECIPE_VERSION, which is raised
    when training code changes behaviour; test-only settings and source text stay out.
    """
    content = {
        "version": CACHE_VERSION,
        "recipe_version": RECIPE_VERSION,
        "libraries": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "data_fingerprint": data.train_fingerprint,
        "data": _without(asdict(data_cfg), RUNTIME_ONLY["data"]),
        "model": asdict(model_cfg),
        "train": _recipe(train_cfg),
    }
    return content_key(content)


def content_key(content: dict) -> str:
    """Returns the 16-hex-digit content address of a JSON-serialisable description."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _without(settings: dict, keys: Sequence[str]) -> dict:
    return {k: v for k, v in settings.items() if k not in keys}


def _recipe(train_cfg: TrainConfig) -> dict:
    """The train settings that shape the weights, as cache keys have always hashed them."""
    return without_added_defaults(_without(asdict(train_cfg), RUNTIME_ONLY["train"]), "train.")


def checkpoint_dir(cache_dir: str | Path, key: str) -> Path:
    """Returns the folder holding the resumable checkpoint of the baseline being trained."""
    return Path(cache_dir) / "baselines" / f"{key}.ckpt"


def finetune_key(base_key: str, prune_cfg: PruneConfig, train_cfg: TrainConfig,
                 distill_cfg: DistillConfig) -> str:
    """Returns the content address of a fine-tuning: the dense model it starts from (by its
    baseline key) and the settings that shape the weights it trains."""
    prune = without_added_defaults(with_replaced_at_default(asdict(prune_cfg)), "prune.")
    content = {"version": CACHE_VERSION, "recipe_version": RECIPE_VERSION, "baseline": base_key,
               "prune": prune,
               "distill": asdict(distill_cfg), "train": _recipe(train_cfg)}
    return content_key(content)


def finetune_checkpoint_dir(cache_dir: str | Path, key: str) -> Path:
    """Returns the folder holding the resumable checkpoint of a fine-tuning (finetune_key)."""
    return Path(cache_dir) / "finetune" / f"{key}.ckpt"


def load_cached(key: str, cache_dir: str | Path) -> Baseline | None:
    """Returns the cached baseline stored under key, or None when there is none."""
    return _load(Path(cache_dir) / "baselines" / key, key)


def load_or_train(key: str, cache_dir: str | Path, data: Dataset, model_cfg: ModelConfig,
                  train_cfg: TrainConfig,
                  callbacks: Sequence[keras.callbacks.Callback] = ()) -> Baseline:
    """Returns the cached baseline for key, training and storing it first when missing."""
    entry = Path(cache_dir) / "baselines" / key
    found = _load(entry, key)
    if not found:
        with file_lock(entry.with_suffix(".lock")):
            found = _load(entry, key)  # another worker may have finished it while we waited
            if not found:
                return _train_and_store(entry, key, data, model_cfg, train_cfg, callbacks)
    if found.test_fingerprint != data.fingerprint:  # same weights, another test split
        start = time.perf_counter()
        found.test_accuracy = evaluate(found.model, data.x_test, data.y_test)
        found.evaluate_seconds = time.perf_counter() - start
    return found


def _train_and_store(entry: Path, key: str, data: Dataset, model_cfg: ModelConfig,
                     train_cfg: TrainConfig,
                     callbacks: Sequence[keras.callbacks.Callback]) -> Baseline:
    start = time.perf_counter()
    model = build(model_cfg, data.num_classes)
    checkpoint = EpochCheckpoint(checkpoint_dir(entry.parent.parent, key),
                                 train_cfg.checkpoint_every)
    history = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes,
                  train_cfg, epochs=train_cfg.epochs, lr=train_cfg.lr,
                  warmup_epochs=train_cfg.warmup_epochs, callbacks=callbacks,
                  checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, data.x_test, data.y_test)
    evaluate_seconds = time.perf_counter() - start - seconds
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        model.save(staging / MODEL_FILE, include_optimizer=False)
        meta = {"key": key, "test_accuracy": accuracy, "test_fingerprint": data.fingerprint,
                "train_seconds": seconds, "resumed_from_epoch": checkpoint.resumed_from_epoch,
                "evaluate_seconds": evaluate_seconds,
                "history": history, "sha256": _sha256(staging / MODEL_FILE)}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            shutil.rmtree(entry)  # a corrupt entry found by _load
        staging.rename(entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    checkpoint.remove()
    return Baseline(model, key, False, history, accuracy, seconds, evaluate_seconds,
                    checkpoint.resumed_from_epoch, data.fingerprint)


def _load(entry: Path, key: str) -> Baseline | None:
    """Returns the cached baseline, or None when it is missing or fails its checksum."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta["sha256"] != _sha256(entry / MODEL_FILE):
            return None
        model = keras.models.load_model(entry / MODEL_FILE, compile=False)
    except (OSError, ValueError, KeyError):
        return None
    return Baseline(model, key, True, meta["history"], meta["test_accuracy"],
                    meta["train_seconds"], meta["evaluate_seconds"],
                    test_fingerprint=meta.get("test_fingerprint", ""))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
