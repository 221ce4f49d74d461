"""Hydra's refusals of a command line's overrides, as one line naming the setting.

Hydra reports a mistyped key, a value of the wrong type or an unknown group option over
several lines (the last one with its whole config search path). ``run`` calls a
``@hydra.main`` function with Hydra's errors raised rather than printed, and turns them into
``error: prune.rat: no such setting (did you mean prune.rate?)``, exit 1 as before. A user who
sets HYDRA_FULL_ERROR gets Hydra's own report with its stack trace.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from src.config import unknown_setting

FULL_ERROR = "HYDRA_FULL_ERROR"


def run(main: Callable[[], object]) -> None:
    """Runs a @hydra.main function; exits with one line when Hydra refuses an override."""
    if os.environ.get(FULL_ERROR):
        main()
        return
    os.environ[FULL_ERROR] = "1"  # Hydra raises instead of printing several lines and exiting
    try:
        main()
    except HydraException as error:
        raise SystemExit(f"error: {one_line(error)}") from None
    finally:
        os.environ.pop(FULL_ERROR, None)


def one_line(error: HydraException) -> str:
    """Returns what Hydra refused, on one line that starts with the setting or group option."""
    cause = error.__cause__
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        return _unknown_option(error.missing_cfg_file, error.options)
    if isinstance(error, OverrideParseException) and error.override:
        return f"{error.override}: {_first_line(error.message)}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        beside = cause.parent_node  # a plain mapping (search.*) has no schema to list
        known = [str(key) for key in beside] if isinstance(beside, DictConfig) else None
        return unknown_setting(cause.full_key, cause.object_type, known)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(str(cause))}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:2]) or type(error).__name__


def _unknown_option(missing: str, options: list[str]) -> str:
    group, _, name = missing.rpartition("/")
    choices = [option for option in options if option != "schema"]  # not an option: src.run
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {group}={close[0]}?)" if close else ""
    return f"{group}={name}: no such option; {group} has {', '.join(choices)}{hint}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
