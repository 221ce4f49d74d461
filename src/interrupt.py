"""Stop requests: SIGTERM (timeout, Slurm, Kubernetes) is handled exactly like Ctrl-C."""

from __future__ import annotations

import signal
import threading
from types import FrameType


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def raise_on_sigterm() -> None:
    """Makes SIGTERM raise Terminated, so every Ctrl-C clean-up also runs for it."""
    if threading.current_thread() is not threading.main_thread():
        return  # Python delivers signals to the main thread only (and refuses handlers elsewhere)

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Terminated(f"stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, handler)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """Returns the shell's exit code for the stop: 128 + the signal number (130 or 143)."""
    return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
