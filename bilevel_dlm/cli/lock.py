"""A lock on a training run's output folder, so that two runs never write the same checkpoints.

The lock is ``<output>.lock`` beside the folder (the folder itself is replaced on every save), held with an
exclusive ``flock``: the kernel releases it when its process ends, however it ends, so a lock can never be
stale and a reused process id cannot fake an owner. The file records the owner's process id for messages.
A second run is refused while the lock is held; a lock file left by a process that is gone is taken over,
with a message naming that process.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import CLIError

__all__ = ["output_lock"]


@contextmanager
def output_lock(output: Path) -> Iterator[Path]:
    """Hold ``<output>.lock`` while inside; refuse (:class:`CLIError`) when another process holds it."""
    lock = output.with_name(f"{output.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _owner(descriptor)
        os.close(descriptor)
        raise CLIError(f"--output {output} is in use by process {owner or '(unknown)'} (lock file {lock}); wait for "
                       "that run to finish, or choose another --output") from None
    previous = _owner(descriptor)
    if previous is not None and previous != os.getpid():
        print(f"bilevel-dlm: taking over the lock {lock} of process {previous}, which is no longer running",
              file=sys.stderr)
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # still held: a run that opened this file before fails to lock it
        os.close(descriptor)


def _owner(descriptor: int) -> int | None:
    """The process id written in the lock file, or None when it holds none."""
    try:
        return int(os.pread(descriptor, 32, 0).split()[0])
    except (ValueError, IndexError):
        return None
