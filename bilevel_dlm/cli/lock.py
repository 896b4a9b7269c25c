"""A lock on a training run's output folder, so that two runs never write the same checkpoints.

The lock is a file beside the folder (``<output>.lock``, since the folder itself is replaced on every save)
created exclusively and holding the owner's process id. A second run finds it and is refused while that
process lives; the lock of a process that is gone (killed, crashed) is taken over, with a message.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import CLIError

__all__ = ["output_lock"]


@contextmanager
def output_lock(output: Path) -> Iterator[Path]:
    """Hold ``<output>.lock`` while inside; refuse (:class:`CLIError`) when a living process holds it."""
    lock = output.with_name(f"{output.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            owner = _owner(lock)
            if owner is None and _age(lock) < 5.0:  # created a moment ago, its pid not written yet
                time.sleep(0.5)
                continue
            if owner is not None and _alive(owner):
                raise CLIError(f"--output {output} is in use by process {owner} (lock file {lock}); wait for that run "
                               "to finish, or choose another --output") from None
            print(f"bilevel-dlm: taking over the lock {lock} of process {owner}, which is no longer running",
                  file=sys.stderr)
            lock.unlink(missing_ok=True)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    try:
        yield lock
    finally:
        if _owner(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def _owner(lock: Path) -> int | None:
    """The process id written in the lock file, or None when it is unreadable (being written, or damaged)."""
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _age(lock: Path) -> float:
    try:
        return time.time() - lock.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
