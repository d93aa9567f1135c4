"""What kind of file a user named, from its content, and one line when it is not the kind an option takes.

A checkpoint given as ``--data``, a grid file as ``--checkpoint``, a lens file as ``--data``: each reader would
say only that it cannot read the file. The content tells what the file is (the HDF5 signature, the zip or
pickle of a PyTorch file, the text of a lens), so the message can say where it goes instead. Names and
suffixes are not trusted: ``best.pt`` renamed ``best.h5`` is still a checkpoint.

Only the first bytes are read (and a PyTorch zip's index), never a whole large file. Whether an HDF5 file is a
grid file is the grid file module's to say (psfgen.gridfile opens HDF5 files, nothing else here): the caller
passes that test in.
"""

from __future__ import annotations

import os
import re
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from psfgen.shared.errors import InputError

HEAD_BYTES = 64 * 1024  # a lens's surfaces and a config's keys show in its first kilobytes
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at 0, 512, 1024, 2048, ... (after a user block)
CHECKPOINT_FORMAT = b"psf-cvae.checkpoint"  # psfcvae.checkpoint.FORMAT, as pickled in the checkpoint's index


@dataclass(frozen=True)
class Kind:
    name: str  # grid, checkpoint, lens, image, config, or another: hdf5, torch, samples, npy, ...
    text: str  # as a message says it: "a checkpoint from 'psf train'"


HDF5 = Kind("hdf5", "an HDF5 file")
GRID = Kind("grid", "a grid file from 'psf generate'")


# What each option expects, as the message says it.
WANTED = {
    "grid": "a grid file from 'psf generate'",
    "checkpoint": "a checkpoint from 'psf train'",
    "lens": "a lens file",
    "image": "a PNG image",
}
# Where a file of each kind goes, for a command that takes none of that kind.
ELSEWHERE = {
    "grid": "give it to psf train or psf eval as --data",
    "checkpoint": "give it to psf eval, sample or render as --checkpoint",
    "lens": "give it to psf generate as --lens",
    "image": "give it to psf render as --image",
    "config": "give it to psf generate or psf train as --config",
}
# The kinds each expected kind's own reader explains better than a guess can (a grid file of another
# schema, a foreign HDF5 file, a torch file that is no checkpoint): left to it.
READER_KNOWS = {
    "grid": {"grid", "hdf5"},
    "checkpoint": {"checkpoint", "torch"},
    "lens": {"lens", None},
    "image": {"image", None},
}


def sniff(path: str | Path) -> Kind | None:
    """The kind of file ``path`` holds, from its content; None for a path that is no readable regular file,
    or content of no kind known here."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
            if _hdf5_at(f, st.st_size):
                return HDF5
    except OSError:
        return None
    if not head:
        return Kind("empty", "an empty file")
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return Kind("torch", "a pickle (an old PyTorch file)")
    for magic, kind in (
        (b"\x89PNG\r\n\x1a\n", Kind("image", "a PNG image")),
        (b"\xff\xd8\xff", Kind("jpeg", "a JPEG image")),
        (b"II*\x00", Kind("tiff", "a TIFF image")),
        (b"MM\x00*", Kind("tiff", "a TIFF image")),
        (b"\x93NUMPY", Kind("npy", "a NumPy array (.npy)")),
    ):
        if head.startswith(magic):
            return kind
    return _text_kind(head, Path(path).suffix.lower())


def _hdf5_at(f, size: int) -> bool:
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= size:
        f.seek(offset)
        if f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
            return True
        offset = 512 if offset == 0 else 2 * offset
    return False


def _zip_kind(path) -> Kind | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            index = next((n for n in names if n.endswith("/data.pkl")), None)
            if index is not None:  # torch.save's format: the pickled object, its tensors beside it
                ours = CHECKPOINT_FORMAT in z.read(index)[:HEAD_BYTES]
                return Kind("checkpoint", "a checkpoint from 'psf train'") if ours else Kind("torch", "a PyTorch file")
            if "psf.npy" in names:
                return Kind("samples", "a file of PSFs from 'psf sample'")
            if any(n.endswith(".npy") for n in names):
                return Kind("npz", "NumPy arrays (.npz)")
    except (OSError, zipfile.BadZipFile):
        return None
    return Kind("zip", "a zip archive")


def _text_kind(head: bytes, suffix: str) -> Kind | None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):  # Zemax writes UTF-16
        text = head.decode("utf-16", errors="replace")
    elif b"\x00" in head:
        return None
    else:
        text = head.decode("utf-8", errors="replace")
    body = text.lstrip("\ufeff \t\r\n")
    if body.startswith("{") and '"surfaces"' in body:
        return Kind("lens", "a lens file (DeepLens JSON)")
    if re.search(r"^\s*SURF\s+\d+", text, re.M):
        return Kind("lens", "a lens file (Zemax)")
    if len(set(re.findall(r"^\s*(LEN|RDY|SO|SI|EPD|DIM|WL)\b", text, re.M))) >= 3:
        return Kind("lens", "a lens file (CODE V)")
    if suffix in (".yaml", ".yml"):
        return Kind("config", "a YAML config")
    return None


def refuse_other_kind(path: str | Path, wanted: str, subject: str, takes: dict[str, str],
                      is_grid: Callable[[Path], bool], names: dict[str, str] | None = None) -> None:  # fmt: skip
    """Raise InputError when ``path`` is plainly not the ``wanted`` kind (grid, checkpoint, lens, image):
    ``{subject} expects <wanted>; <path> is <what it is>: <where it goes>``. A path that does not exist or
    that the kind's own reader explains better passes: the reader says why.

    takes: kind -> the option of the same command that takes it ("checkpoint": "--checkpoint");
    is_grid: whether an HDF5 file is a grid file (psfgen.gridfile's answer);
    names: placeholders in ``subject`` (see InputError), e.g. ``{data}`` for an option or config key."""
    if not os.path.isfile(path):
        return
    kind = sniff(path)
    if kind == HDF5 and wanted != "grid" and is_grid(Path(path)):
        kind = GRID
    if (kind.name if kind else None) in READER_KNOWS[wanted]:
        return
    if kind is None:  # unknown content; a reader of HDF5 or torch files would say "not readable"
        what = "not an HDF5 file" if wanted == "grid" else "not a PyTorch file"
        where = ""
    else:
        what = kind.text
        where = f": pass it as {takes[kind.name]}" if kind.name in takes else ""
        where = where or (f": {ELSEWHERE[kind.name]}" if kind.name in ELSEWHERE else "")
    raise InputError(f"{subject} expects {WANTED[wanted]}; {path} is {what}{where}", names)
