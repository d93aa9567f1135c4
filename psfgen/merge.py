"""``psf merge``: shard files of one sharded ``psf generate`` run -> one grid file.

Shard K of N traced the blocks i with i % N == K into a file of the full layout. The
merge checks that the shards are one run (same run id: parameters, lens, seed) split the
same way, that each of 0..N-1 is there exactly once and finished, then copies every
block from its owner. Block seeds depend on (seed, block) only, so the result equals,
PSF for PSF, the file of the same run traced in one process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from psfgen import gridfile
from psfgen.analysis import litfield
from psfgen.gridfile import GridFile
from psfgen.shared import tempfiles
from psfgen.shared.errors import InputError, os_reason
from psfgen.shared.provenance import now

log = logging.getLogger(__name__)


def _check_shards(paths: list[str]) -> list[GridFile]:
    if not paths:
        raise InputError("no shard files given; pass the files written by 'psf generate --shard K/N'")
    infos = []
    for p in paths:
        try:
            info = GridFile.open(p)
        except InputError as exc:
            raise InputError(f"shard {p}: {exc}") from None
        if info.shard is None:
            raise InputError(f"{p} is not a shard file (written without --shard); merge only shard files")
        infos.append(info)
    first = infos[0]
    for info in infos[1:]:
        if info.run_id != first.run_id:
            raise InputError(
                f"{info.path} belongs to another run than {first.path} (different parameters, lens or seed); "
                f"leave it out"
            )
        if info.shard[1] != first.shard[1]:
            raise InputError(
                f"{info.path} is a shard of {info.shard[1]}, {first.path} of {first.shard[1]}; merge shards of "
                f"one split"
            )
    n = first.shard[1]
    owner: dict[int, str] = {}
    for info in infos:
        k = info.shard[0]
        if k in owner:
            raise InputError(f"duplicate shard {k}/{n}: {owner[k]} and {info.path}; pass each shard once")
        owner[k] = info.path
    missing = sorted(set(range(n)) - set(owner))
    if missing:
        raise InputError(f"missing shard(s) {', '.join(f'{k}/{n}' for k in missing)}; pass all {n} shard files")
    for info in infos:
        # Every block written but no closing marks: stopped before psf generate stamped its finish.
        if not info.complete or info.finished_at is None:
            raise InputError(
                f"shard {info.shard[0]}/{n} ({info.path}) is unfinished ({info.blocks_done}/{info.blocks_total} "
                f"blocks{'' if not info.complete else ', its finish not stamped'}); "
                f"resume it with the same 'psf generate --shard {info.shard[0]}/{n}' command"
            )
    return sorted(infos, key=lambda i: i.shard[0])


def merge(paths: list[str], out: str | Path, overwrite: bool = False, virtual: bool = False) -> Path:
    """Merge shard files into ``out`` (a copy, or HDF5 virtual datasets with ``virtual``)."""
    infos = _check_shards([str(p) for p in paths])
    out = Path(out)
    if any(out.resolve() == Path(i.path).resolve() for i in infos):
        raise InputError(f"--out {out} is one of the shards; choose another output path")
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file path for the merged grid")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; choose another --out or pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output directory {out.parent}: {exc.strerror}") from None
    n = infos[0].shard[1]
    attrs = gridfile.merged_header(infos, merged_at=now())

    # Built beside the output under a private name, renamed onto it only when complete.
    tempfiles.remove_stale(out)
    tmp = tempfiles.temp_path(out)
    try:
        if virtual:
            gridfile.write_virtual(tmp, attrs, infos, out.parent)
        else:
            gridfile.write_copy(tmp, attrs, infos)
        os.replace(tmp, out)
    except OSError as exc:
        tempfiles.discard(tmp)
        raise InputError(f"cannot write {out}: {os_reason(exc)}; choose a writable --out") from None
    except BaseException:
        tempfiles.discard(tmp)
        raise
    log.info("merged %d shards into %s%s", n, out, " (virtual datasets)" if virtual else "")
    merged = GridFile.open(out)
    labels = [merged.plane_label(p) for p in range(merged.n_planes)]
    litfield.report_dark(merged.lights, labels, out)  # the lit field of the whole grid, as an unsharded run's
    return out
