"""Temporary files written beside their target and renamed onto it, and their leftovers.

A writer builds ``.<name>.<pid>.tmp`` next to ``<name>`` and renames it into place only
when it is whole, so a reader never sees a torn file. A writer killed with ``kill -9``
leaves its temporary file behind; the next writer of the same target removes those
whose process no longer exists (the pid in the name says whose it was).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
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


@contextlib.contextmanager
def replacing_dir(target: Path, option: str = "--out", ours=lambda name: False, mark: str = ""):
    """A temporary directory beside the directory ``target``, put in its place when the block ends without error.

    An existing ``target`` is replaced whole, never mixed with new files: it is moved aside, the new one renamed
    in, then the old one removed. Killed between the two renames, the old one waits under ``.<name>.<pid>.old``
    and the next writer puts it back. On failure the temporary directory goes and ``target`` stays as it was.
    Only an empty directory, or an earlier output (it holds ``mark`` and only files whose names ``ours`` accepts),
    is replaced: a directory of other files (a run directory, the working directory) is refused, never deleted.
    """
    given = target
    target = Path(os.path.abspath(target))  # '.', '..' and '' have no name to put a temporary one beside
    if target.exists() and not target.is_dir():
        raise InputError(f"{option} {given} is a file; give a directory")
    if target.is_dir():
        names = [p.name for p in target.iterdir()]
        foreign = [n for n in names if not (ours(n) and (target / n).is_file() and not (target / n).is_symlink())]
        if names and (foreign or mark not in names):
            shown = ", ".join(sorted(foreign)[:3]) + (", ..." if len(foreign) > 3 else "") if foreign else f"no {mark}"
            raise InputError(
                f"{option} {given} holds files this command did not write ({shown}) and would be replaced whole; "
                f"give a new or empty directory, or an earlier output of this command"
            )
    make_parent(target, option)
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*"):
        pid = stale.name[len(target.name) + 2 :].split(".")[0]
        if not pid.isdigit() or _alive(int(pid)) or not stale.is_dir():
            continue
        if stale.name.endswith(".old") and not target.exists():
            os.rename(stale, target)  # a writer died between its renames: the previous outputs come back
        else:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_path(target)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise InputError(f"{option} {target}: cannot write in {target.parent} ({exc.strerror})") from None
    try:
        yield tmp
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        if target.exists():
            os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
