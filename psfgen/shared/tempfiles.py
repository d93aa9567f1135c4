"""Temporary files written beside their target and renamed onto it, and their leftovers.

A writer builds ``.<name>.<pid>.tmp`` next to ``<name>`` and renames it into place only
when it is whole, so a reader never sees a torn file. A writer killed with ``kill -9``
leaves its temporary file behind; the next writer of the same target removes those
whose process no longer exists (the pid in the name says whose it was).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def temp_path(target: Path) -> Path:
    """This process's temporary file for ``target``."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Delete the temporary files of ``target`` left by processes that are gone; returns them."""
    target = Path(target)
    removed = []
    for p in target.parent.glob(f".{target.name}.*.tmp"):
        pid = p.name[len(target.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def discard(path: Path) -> None:
    """Remove a temporary file after a failure, never raising over the failure itself."""
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)
