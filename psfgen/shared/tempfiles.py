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

from psfgen.shared.errors import InputError


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


@contextlib.contextmanager
def replacing(target: Path):
    """A temporary path beside ``target``, renamed onto it when the block ends without error (removed when it
    fails or is interrupted): a reader never sees a half-written ``target``, and an old one stays until then."""
    target = Path(target)
    remove_stale(target)
    tmp = temp_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        discard(tmp)
        raise


def make_parent(path: Path, option: str) -> None:
    """Create the directory ``path`` goes in, or one InputError naming the option and what stands in the way."""
    path = Path(path)
    for folder in (path.parent, *path.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise InputError(f"{option} {path}: {folder} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot create the directory {path.parent} ({exc.strerror})") from None
