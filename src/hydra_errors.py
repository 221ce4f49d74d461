"""Hydra's refusals of a command line's overrides, as one line naming the setting.

Hydra reports a mistyped key, a value of the wrong type or an unknown group option over
several lines (the last one with its whole config search path). ``run`` calls a
``@hydra.main`` function with Hydra's errors raised rather than printed while it composes
the config, and turns them into ``error: prune.rat: no such setting (did you mean
prune.rate?)``, exit 1 as before; the task function calls ``job_started`` first, so what
happens in the job is reported as Hydra always did. A user who sets HYDRA_FULL_ERROR=1 gets
Hydra's full stack traces throughout.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable

from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from src.config import unknown_setting

FULL_ERROR = "HYDRA_FULL_ERROR"
RAISING = "1"  # the value Hydra checks for
_set_here = False
_user_value: str | None = None  # the user's HYDRA_FULL_ERROR (e.g. 0), given back to the job


def run(main: Callable[[], object]) -> None:
    """Runs a @hydra.main function; exits with one line when Hydra refuses an override."""
    global _set_here, _user_value
    if os.environ.get(FULL_ERROR) == RAISING:
        main()
        return
    _user_value = os.environ.get(FULL_ERROR)
    os.environ[FULL_ERROR], _set_here = RAISING, True  # Hydra raises instead of printing
    try:
        main()
    except HydraException as error:
        raise SystemExit(f"error: {one_line(error)}") from None
    finally:
        job_started()


def job_started() -> None:
    """Gives the job Hydra's own reporting back (and its child processes the environment they
    had): only composing the command line's config reports in one line."""
    global _set_here
    if _set_here:
        if _user_value is None:
            os.environ.pop(FULL_ERROR, None)
        else:
            os.environ[FULL_ERROR] = _user_value
        _set_here = False


def one_line(error: HydraException) -> str:
    """Returns what Hydra refused, on one line that starts with the setting or group option."""
    cause = error.__cause__
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        return _unknown_option(error.missing_cfg_file, error.options)
    if isinstance(error, OverrideParseException) and error.override:
        return f"{error.override}: {_first_line(error.message)}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        return _unknown_key(cause)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(str(cause))}"
    lines = []
    for line in str(error).splitlines():  # e.g. 'Ambiguous value ...' and its numbered fixes
        if line.strip().startswith(("Config search path", "Search path")):
            break
        lines += [line.strip()] if line.strip() else []
    return "; ".join(lines) or type(error).__name__


def _unknown_key(cause: OmegaConfBaseException) -> str:
    beside = cause.parent_node
    if dataclasses.is_dataclass(cause.object_type) or not isinstance(beside, DictConfig):
        return unknown_setting(cause.full_key, cause.object_type)
    # a plain mapping: at the top, the groups; deeper (search.space) it takes new keys with +
    known = [str(key) for key in beside if key != "hydra"]
    message = unknown_setting(cause.full_key, None, known)
    if "." in cause.full_key and "did you mean" not in message:
        message += f" (a new key needs a leading +: +{cause.full_key}=...)"
    return message


def _unknown_option(missing: str, options: list[str]) -> str:
    group, _, name = missing.rpartition("/")
    choices = [option for option in options if option != "schema"]  # not an option: src.run
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" (did you mean {group}={close[0]}?)" if close else \
        " (the Slurm launchers come with pip install -e '.[slurm]')" \
        if group == "hydra/launcher" else ""
    return f"{group}={name}: no such option; {group} has {', '.join(choices)}{hint}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
