"""Magnitude pruning: one global threshold (flat) or one rate per layer (layer).

Written here because no well-kept library computes an exact global threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from src.checkpoint import EpochCheckpoint
from src.config import ConfigError, PruneConfig, TrainConfig
from src.data import Dataset
from src.distill import Distillation
from src.keras_env import keras, tf
from src.prune import allocate
from src.prune.common import PruneResult, prunable_kernels
from src.train import fit


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


def layer_masks(weights: Sequence[np.ndarray], rate: float | Sequence[float]
                ) -> list[np.ndarray]:
    """Returns 0/1 masks zeroing round(rate * n) of the smallest weights in each layer
    (rate may give one rate per layer)."""
    rates = [rate] * len(weights) if isinstance(rate, (int, float)) else list(rate)
    masks = []
    for w, rate in zip(weights, rates, strict=True):
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


def prune_magnitude(model: keras.Model, cfg: PruneConfig, data: Dataset, train_cfg: TrainConfig,
                    callbacks: Sequence[keras.callbacks.Callback] = (),
                    distill: Distillation | None = None,
                    checkpoint: EpochCheckpoint | None = None) -> PruneResult:
    """Returns the model with its smallest kernels zeroed (flat or layer), fine-tuned if asked."""
    named = prunable_kernels(model, cfg.layer_types)
    kernels = [var for _, var in named]
    if not kernels:
        raise ConfigError(f"prune.layer_types: the model has no layer of type {cfg.layer_types}")
    weights = [k.numpy() for k in kernels]
    if cfg.method == "flat":
        masks = flat_masks(weights, cfg.rate, cfg.min_density)
    elif cfg.rates_from:  # per-layer rates from a sensitivity run, for cfg.rate overall
        table = allocate.read_table(cfg.rates_from, "magnitude")
        rates = allocate.allocate(table, [name for name, _ in named],
                                  [w.size for w in weights], cfg.rate)
        masks = layer_masks(weights, rates)
    else:
        masks = layer_masks(weights, cfg.rate)
    for kernel, weight, mask in zip(kernels, weights, masks):
        kernel.assign(weight * mask)
    history = {}
    if cfg.finetune_epochs:
        history = fit(model, data.x_train, data.y_train, data.x_val, data.y_val, data.num_classes,
                      train_cfg, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, warmup_epochs=0,
                      callbacks=[HoldMasks(kernels, masks), *callbacks], distill=distill,
                      checkpoint=checkpoint)
    return PruneResult(model, history, {})


