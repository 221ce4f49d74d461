"""From a search space to one trial's Hydra overrides."""

from __future__ import annotations

from typing import Any

import optuna

from src.search.settings import DimensionConfig


def sample_overrides(trial: optuna.Trial, space: dict[str, DimensionConfig]) -> list[str]:
    """Returns Hydra overrides for this trial's sampled point; conditional dims may be skipped."""
    chosen: dict[str, Any] = {}
    overrides = []
    for name, dim in space.items():
        if any(chosen.get(other) not in allowed for other, allowed in dim.when.items()):
            continue
        if dim.choices is not None:
            value = trial.suggest_categorical(name, list(dim.choices))
        elif dim.type == "int":
            value = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log,
                                      step=int(dim.step or 1))
        else:
            value = trial.suggest_float(name, dim.low, dim.high, log=dim.log, step=dim.step)
        chosen[name] = value
        text = "null" if value is None else value  # Hydra reads None as the string "None"
        is_group = "." not in dim.path
        overrides.append(f"{dim.path}={text}" if is_group else f"++{dim.path}={text}")
    return overrides
