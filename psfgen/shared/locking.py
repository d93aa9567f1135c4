"""One writer at a time: an OS lock held for the lifetime of a run.

Checking a file's parameters and then writing it is a check-then-act race: two runs
started together both pass the check and interleave their blocks. A run therefore holds
an exclusive ``flock`` on ``<target>.lock`` from before the check until it ends. The
kernel releases the lock when the process dies, ``kill -9`` included, so a lock file left
behind never blocks the next run; it only records who held it last.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from psfgen.shared.errors import InputError


@contextlib.contextmanager
def exclusive(target: Path, what: str):
    """Hold the lock of ``target`` (a file or a directory, whose parent must exist) or raise
    InputError naming the holder. The lock file is ``<target>.lock`` beside it.

    what: the run's name for the message, e.g. "psf generate".
    """
    target = Path(target)
    # The path as the file system resolves it: two spellings of one file (a symlink, ../x) share one lock.
    try:
        real = target.resolve()
    except (OSError, RuntimeError) as exc:  # Python 3.12 raises RuntimeError on a symlink loop, 3.13 OSError
        raise InputError(f"{target} cannot be resolved: {exc}; give a path that is not a symlink loop") from None
    lock = real.with_name(real.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InputError(f"cannot create the lock file {lock}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise InputError(
                f"{target} is being written by {holder}; wait for it to finish or choose another path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()})".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
