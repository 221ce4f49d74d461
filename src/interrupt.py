"""Stop requests: SIGTERM (timeout, Slurm, Kubernetes) is handled exactly like Ctrl-C."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from types import FrameType

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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
    return 128 + stop_signal(interrupt)


def raise_once_on_stop() -> None:
    """Makes the first SIGINT or SIGTERM raise (KeyboardInterrupt or Terminated) and ignores
    any later one, so a stop sent twice (by the terminal and by a forwarding parent) cannot
    break the clean-up the first one started."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if signum == signal.SIGTERM:
            raise Terminated(f"stopped by {signal.Signals(signum).name}")
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def die_with_parent(parent_pid: int) -> None:
    """Asks Linux to SIGKILL this process when its parent dies (the parent may be SIGKILLed,
    leaving no chance to stop its children); exits at once if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have died before prctl: this process then belongs to another one.
    if os.getppid() != parent_pid:
        os._exit(128 + signal.SIGKILL)


def stop_signal(interrupt: KeyboardInterrupt) -> signal.Signals:
    """Returns the signal that caused the stop (SIGTERM or SIGINT), to pass it on."""
    return signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
