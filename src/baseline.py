"""The dense baseline: trained once per (data, model, train recipe) and reused from a cache.

Entries live in ``<cache_dir>/baselines/<key>/`` and are keyed by the content of
everything that shapes the trained weights.  They are written under a temporary name
and renamed, guarded by a file lock, and checked by sha256 before use.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from src import data as data_module
from src import models as models_module
from src import train as train_module
from src.config import DataConfig, ModelConfig, TrainConfig
from src.data import Dataset
from src.keras_env import keras, tf
from src.models import build
from src.train import evaluate, fit

CACHE_VERSION = 2
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


def baseline_key(data: Dataset, data_cfg: DataConfig, model_cfg: ModelConfig,
                 train_cfg: TrainConfig) -> str:
    """Returns the content address of the baseline these settings would train."""
    train = asdict(train_cfg)
    train.pop("verbose")
    data_part = {k: v for k, v in asdict(data_cfg).items() if k != "path"}
    content = {"version": CACHE_VERSION, "data_fingerprint": data.fingerprint, "data": data_part,
               "model": asdict(model_cfg), "train": train, "code": _code_fingerprint()}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def _code_fingerprint() -> str:
    """Returns a digest of the code and libraries that shape trained weights."""
    digest = hashlib.sha256(f"{tf.__version__}|{keras.__version__}".encode())
    for module in (data_module, models_module, train_module):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def load_or_train(key: str, cache_dir: str | Path, data: Dataset, model_cfg: ModelConfig,
                  train_cfg: TrainConfig,
                  callbacks: Sequence[keras.callbacks.Callback] = ()) -> Baseline:
    """Returns the cached baseline for key, training and storing it first when missing."""
    entry = Path(cache_dir) / "baselines" / key
    found = _load(entry, key)
    if found:
        return found
    with _locked(entry.with_suffix(".lock")):
        found = _load(entry, key)  # another worker may have finished it while we waited
        if found:
            return found
        return _train_and_store(entry, key, data, model_cfg, train_cfg, callbacks)


def _train_and_store(entry: Path, key: str, data: Dataset, model_cfg: ModelConfig,
                     train_cfg: TrainConfig,
                     callbacks: Sequence[keras.callbacks.Callback]) -> Baseline:
    start = time.perf_counter()
    model = build(model_cfg, data.num_classes)
    history = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes,
                  train_cfg, epochs=train_cfg.epochs, lr=train_cfg.lr,
                  warmup_epochs=train_cfg.warmup_epochs, callbacks=callbacks)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, data.x_test, data.y_test)
    evaluate_seconds = time.perf_counter() - start - seconds
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=entry.parent))
    try:
        model.save(staging / MODEL_FILE, include_optimizer=False)
        meta = {"key": key, "test_accuracy": accuracy, "train_seconds": seconds,
                "evaluate_seconds": evaluate_seconds,
                "history": history, "sha256": _sha256(staging / MODEL_FILE)}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():
            shutil.rmtree(entry)  # a corrupt entry found by _load
        staging.rename(entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Baseline(model, key, False, history, accuracy, seconds, evaluate_seconds)


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
                    meta["train_seconds"], meta["evaluate_seconds"])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive lock so concurrent workers train a missing baseline once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


