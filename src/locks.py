"""One lock file per shared resource, so processes on one machine take turns.

Used where parallel jobs meet: a baseline trained once for every job that needs it, a
fine-tuning checkpoint written by one job at a time, a new sqlite store created once.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path, wait: bool = True, shared: bool = False) -> Iterator[bool]:
    """Holds an exclusive lock on path (created, with its folder) while the block runs, or
    with shared=True one that other shared holders may hold too.

    Yields True once held; with wait=False, yields False at once, holding nothing, when
    another process holds it. The lock ends with the block, or with the process if it dies.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                        | (0 if wait else fcntl.LOCK_NB))
            held = True
        except BlockingIOError:
            held = False
        try:
            yield held
        finally:
            if held:  # explicitly: a forked child sharing the handle would keep it otherwise
                fcntl.flock(handle, fcntl.LOCK_UN)
