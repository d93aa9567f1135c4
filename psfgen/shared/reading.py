"""Reading a file a user names: a regular file of bounded size, never a device, a pipe or a directory.

``/dev/zero`` as a lens would be read without end and a FIFO would block forever; a text file
(a lens, a config) is small, so anything larger is a mistake to name, not to read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from psfgen.shared.errors import InputError

MAX_TEXT_BYTES = 16 * 2**20  # a lens or config file is kilobytes; 16 MiB leaves room for long prescriptions


def read_user_file(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of ``path`` (what: "lens file", "config file", ... for the message), or an InputError."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
        raise InputError(f"{what} {path} is {kind}, not a file; give a file")
    too_big = InputError(f"{what} {path} is larger than {limit // 2**20} MiB; give the right file")
    if st.st_size > limit:
        raise too_big
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > limit:  # a file that grows while read (or lies about its size)
        raise too_big
    return data
