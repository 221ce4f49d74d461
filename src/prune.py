"""Weight pruning: one global magnitude threshold (flat), one rate per layer (layer), or tfmot.

``flat`` and ``layer`` are written here because no well-kept library computes an exact
global threshold; ``tfmot`` uses prune_low_magnitude and its schedules unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from src.config import ConfigError, PruneConfig, TrainConfig
from src.data import Dataset
from src.keras_env import keras, tf, tfmot
from src.train import fit

KERNEL_ATTRIBUTE = {"Conv2D": "kernel", "Dense": "kernel", "DepthwiseConv2D": "depthwise_kernel"}


@dataclass
class PruneResult:
    """The pruned model, its fine-tuning history and the schedule in steps (tfmot)."""

    model: keras.Model
    history: dict
    schedule_steps: dict


def prunable_kernels(
    model: keras.Model, layer_types: Sequence[str]
) -> list[tuple[str, tf.Variable]]:
    """Returns (layer name, kernel variable) of every layer whose class is in layer_types."""
    found = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind in layer_types and kind in KERNEL_ATTRIBUTE:
            found.append((layer.name, getattr(layer, KERNEL_ATTRIBUTE[kind])))
    return found


def flat_masks(
    weights: Sequence[np.ndarray], rate: float, min_density: float = 0.0
) -> list[np.ndarray]:
    """Returns 0/1 masks zeroing exactly round(rate * total) of the smallest-magnitude weights.

    With min_density, the largest ceil(min_density * n) weights of each layer are kept first,
    so no layer collapses; the global threshold then applies to the rest.
    """
    scores = []
    for w in weights:
        score = np.abs(w).astype(np.float64).ravel()
        keep = math.ceil(min_density * score.size)
        if keep:
            score[np.argsort(score, kind="stable")[-keep:]] = np.inf
        scores.append(score)
    flat = np.concatenate(scores)
    n_zero = int(round(rate * flat.size))
    if n_zero > np.count_nonzero(np.isfinite(flat)):
        raise ConfigError(f"prune.min_density: {min_density} leaves too few weights to reach "
                          f"prune.rate {rate}")
    keep_mask = np.ones(flat.size, dtype=bool)
    if n_zero:
        keep_mask[np.argpartition(flat, n_zero - 1)[:n_zero]] = False
    return _split_like(keep_mask, weights)


def layer_masks(weights: Sequence[np.ndarray], rate: float) -> list[np.ndarray]:
    """Returns 0/1 masks zeroing round(rate * n) of the smallest weights in each layer."""
    masks = []
    for w in weights:
        score = np.abs(w).ravel()
        keep = np.ones(score.size, dtype=bool)
        n_zero = int(round(rate * score.size))
        if n_zero:
            keep[np.argpartition(score, n_zero - 1)[:n_zero]] = False
        masks.append(keep.reshape(w.shape).astype(w.dtype))
    return masks


def _split_like(flat: np.ndarray, weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    sizes = np.cumsum([w.size for w in weights])[:-1]
    parts = np.split(flat, sizes)
    return [part.reshape(w.shape).astype(w.dtype) for part, w in zip(parts, weights)]


class HoldMasks(keras.callbacks.Callback):
    """Re-applies fixed masks after every training step, so pruned weights stay exactly zero."""

    def __init__(self, kernels: Sequence[tf.Variable], masks: Sequence[np.ndarray]):
        super().__init__()
        self.kernels = list(kernels)
        self.masks = [tf.constant(m) for m in masks]

    @tf.function
    def _apply(self) -> None:
        for kernel, mask in zip(self.kernels, self.masks):
            kernel.assign(kernel * mask)

    def on_train_batch_end(self, batch, logs=None) -> None:
        self._apply()


def prune(model: keras.Model, cfg: PruneConfig, data: Dataset, train_cfg: TrainConfig,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> PruneResult:
    """Returns the model pruned as configured (fine-tuned if asked), wrappers stripped."""
    if cfg.method == "none":
        return PruneResult(model, {}, {})
    if cfg.method == "tfmot":
        return _prune_tfmot(model, cfg, data, train_cfg, callbacks)
    kernels = [var for _, var in prunable_kernels(model, cfg.layer_types)]
    if not kernels:
        raise ConfigError(f"prune.layer_types: the model has no layer of type {cfg.layer_types}")
    weights = [k.numpy() for k in kernels]
    masks = (flat_masks(weights, cfg.rate, cfg.min_density) if cfg.method == "flat"
             else layer_masks(weights, cfg.rate))
    for kernel, weight, mask in zip(kernels, weights, masks):
        kernel.assign(weight * mask)
    history = {}
    if cfg.finetune_epochs:
        history = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes,
                      train_cfg, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, warmup_epochs=0,
                      callbacks=[HoldMasks(kernels, masks), *callbacks])
    return PruneResult(model, history, {})


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


def _prune_tfmot(model: keras.Model, cfg: PruneConfig, data: Dataset, train_cfg: TrainConfig,
                 callbacks: Sequence[keras.callbacks.Callback]) -> PruneResult:
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
                  callbacks=[sparsity.UpdatePruningStep(), *callbacks])
    return PruneResult(sparsity.strip_pruning(wrapped), history, steps)
