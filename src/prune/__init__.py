"""Weight pruning, one module per method: magnitude (flat, layer), tfmot and channel."""

from __future__ import annotations

from collections.abc import Sequence

from src.checkpoint import EpochCheckpoint
from src.config import PruneConfig, TrainConfig
from src.data import Dataset
from src.distill import Distillation
from src.keras_env import keras
from src.prune.channel import prune_channel
from src.prune.common import KERNEL_ATTRIBUTE, PruneResult, prunable_kernels
from src.prune.magnitude import flat_masks, layer_masks, prune_magnitude
from src.prune.tfmot import prune_tfmot, tfmot_schedule_steps

__all__ = ["KERNEL_ATTRIBUTE", "PruneResult", "flat_masks", "layer_masks", "prunable_kernels",
           "prune", "tfmot_schedule_steps"]

METHODS = {"flat": prune_magnitude, "layer": prune_magnitude, "tfmot": prune_tfmot,
           "channel": prune_channel}


def prune(model: keras.Model, cfg: PruneConfig, data: Dataset, train_cfg: TrainConfig,
          callbacks: Sequence[keras.callbacks.Callback] = (),
          distill: Distillation | None = None,
          checkpoint: EpochCheckpoint | None = None) -> PruneResult:
    """Returns the model pruned as configured (fine-tuned if asked), wrappers stripped.

    With distill, fine-tuning learns from the teacher's softened outputs too; with a
    checkpoint, an interrupted fine-tuning resumes from its last saved epoch.
    """
    if cfg.method == "none":
        return PruneResult(model)
    return METHODS[cfg.method](model, cfg, data, train_cfg, callbacks, distill, checkpoint)
