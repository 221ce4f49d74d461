"""Epoch checkpoints that let an interrupted training go on where it stopped.

A checkpoint folder holds one ``epoch-NNNN/`` entry per kept epoch: the model's and the
optimizer's variables (tf.train.Checkpoint, so the optimizer's iteration counter, and with
it the learning-rate schedule's position, comes back too), plus ``state.json`` with the
completed epochs, the history so far and each file's sha256.  An entry is written under a
temporary name and renamed, so a crash leaves either the previous entry or the new one; an
entry whose files do not match their checksums is discarded with a warning, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from src.keras_env import keras, tf

STATE_FILE = "state.json"
PREFIX = "ckpt"


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves model, optimizer, epoch counter and history every `every` epochs into folder, and
    any state added with `track` (a weight average)."""

    def __init__(self, folder: str | Path, every: int = 1):
        super().__init__()
        self.folder, self.every = Path(folder), max(1, every)
        self.history: dict[str, list[float]] = {}
        self.resumed_from_epoch = 0
        self.tracked: dict[str, tf.train.Checkpoint] = {}

    def track(self, **state: tf.train.Checkpoint) -> None:
        """Adds training state beyond model and optimizer (a weight average) to every entry."""
        self.tracked.update(state)

    def restore(self, model: keras.Model) -> int:
        """Returns the epochs completed by the newest valid entry, restored into model (or 0).

        The model must be compiled; its optimizer's variables are built first so that
        the restore fills them instead of deferring.
        """
        model.optimizer.build(model.trainable_variables)
        for entry in _entries(self.folder):
            state = _valid_state(entry)
            if state is None:
                continue
            try:
                checkpoint = _trackable(model, self.tracked)
                checkpoint.read(str(entry / PREFIX)).assert_existing_objects_matched()
            except (tf.errors.OpError, AssertionError, ValueError) as error:
                _discard(entry, f"cannot be restored ({str(error).splitlines()[0]})")
                continue
            self.history, self.resumed_from_epoch = state["history"], state["epoch"]
            return self.resumed_from_epoch
        return 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for name, value in (logs or {}).items():
            self.history.setdefault(name, []).append(float(value))
        done = epoch + 1
        if done % self.every == 0 or done == self.params.get("epochs"):
            self.save(done)

    def save(self, epoch: int) -> Path:
        """Returns the entry written for the completed epoch, older entries removed after it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=self.folder))
        _trackable(self.model, self.tracked).write(str(staging / PREFIX))
        sums = {p.name: _sha256(p) for p in sorted(staging.iterdir())}
        state = {"epoch": epoch, "history": self.history, "sha256": sums}
        (staging / STATE_FILE).write_text(json.dumps(state))
        entry = self.folder / f"epoch-{epoch:04d}"
        if entry.exists():
            shutil.rmtree(entry)
        staging.rename(entry)
        for older in _entries(self.folder):
            if older != entry:
                shutil.rmtree(older, ignore_errors=True)
        return entry

    def remove(self) -> None:
        """Deletes the checkpoint folder (once the trained model is stored elsewhere)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _trackable(model: keras.Model, tracked: dict[str, tf.train.Checkpoint]) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(model=model, optimizer=model.optimizer, **tracked)


def _entries(folder: Path) -> list[Path]:
    """Returns the complete entries, newest first; partial writes are discarded."""
    if not folder.is_dir():
        return []
    for partial in folder.glob(".partial-*"):
        _discard(partial, "is a partial write (the process stopped while saving)")
    return sorted(folder.glob("epoch-*"), reverse=True)


def _valid_state(entry: Path) -> dict | None:
    """Returns the entry's state when every file matches its checksum, else discards it."""
    try:
        state = json.loads((entry / STATE_FILE).read_text())
        for name, digest in state["sha256"].items():
            if _sha256(entry / name) != digest:
                _discard(entry / name, "does not match its checksum")
                return None
        int(state["epoch"]), dict(state["history"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        _discard(entry / STATE_FILE, f"is unreadable ({type(error).__name__})")
        return None
    return state


def _discard(path: Path, reason: str) -> None:
    print(f"warning: discarding checkpoint {path}: {reason}", file=sys.stderr)
    entry = path if path.name.startswith((".partial-", "epoch-")) else path.parent
    shutil.rmtree(entry, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
