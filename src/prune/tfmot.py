"""tfmot's prune_low_magnitude with its schedules, unchanged, while fine-tuning."""

from __future__ import annotations

import math
from collections.abc import Sequence

from src.checkpoint import EpochCheckpoint
from src.config import ConfigError, PruneConfig, TrainConfig
from src.data import Dataset
from src.distill import Distillation
from src.keras_env import keras, tfmot
from src.prune.common import PruneResult
from src.train import fit


class _ByLayerType(tfmot.sparsity.keras.PruningPolicy):
    """tfmot pruning policy that wraps only the configured layer classes."""

    def __init__(self, layer_types: Sequence[str]):
        self.layer_types = set(layer_types)

    def allow_pruning(self, layer) -> bool:
        return type(layer).__name__ in self.layer_types

    def ensure_model_supports_pruning(self, model) -> None:
        return None


def tfmot_schedule_steps(cfg: PruneConfig, total_steps: int) -> dict:
    """Returns begin/end/frequency in steps, aligned so the final mask update happens."""
    if total_steps < 2:
        raise ConfigError(f"prune.finetune_epochs: tfmot needs at least 2 fine-tuning steps, "
                          f"got {total_steps}; add epochs or data")
    begin = min(int(cfg.begin * total_steps), max(total_steps - 1, 0))
    end = min(max(int(cfg.end * total_steps), begin + 1), max(total_steps - 1, begin))
    frequency = max(1, min(cfg.frequency, end - begin)) if end > begin else 1
    end = begin + (end - begin) // frequency * frequency
    return {"begin_step": begin, "end_step": end, "frequency": frequency,
            "total_steps": total_steps}


def prune_tfmot(model: keras.Model, cfg: PruneConfig, data: Dataset, train_cfg: TrainConfig,
                 callbacks: Sequence[keras.callbacks.Callback],
                 distill: Distillation | None = None,
                 checkpoint: EpochCheckpoint | None = None) -> PruneResult:
    sparsity = tfmot.sparsity.keras
    total = cfg.finetune_epochs * math.ceil(len(data.x_train) / train_cfg.batch_size)
    steps = tfmot_schedule_steps(cfg, total)
    if cfg.schedule == "constant":
        schedule = sparsity.ConstantSparsity(cfg.final_sparsity, steps["begin_step"],
                                             steps["end_step"], steps["frequency"])
    else:
        schedule = sparsity.PolynomialDecay(cfg.initial_sparsity, cfg.final_sparsity,
                                            steps["begin_step"], steps["end_step"],
                                            frequency=steps["frequency"])
    wrapped = sparsity.prune_low_magnitude(
        model, pruning_schedule=schedule, pruning_policy=_ByLayerType(cfg.layer_types),
        sparsity_m_by_n=(2, 4) if cfg.structured_2_4 else None,
    )
    history = fit(wrapped, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes,
                  train_cfg, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, warmup_epochs=0,
                  callbacks=[sparsity.UpdatePruningStep(), *callbacks], distill=distill,
                  checkpoint=checkpoint)
    return PruneResult(sparsity.strip_pruning(wrapped), history, steps)
