"""``psf merge``: shard files of one sharded ``psf generate`` run -> one grid file.

Shard K of N traced the blocks i with i % N == K into a file of the full layout. The
merge checks that the shards are one run (same run id: parameters, lens, seed) split the
same way, that each of 0..N-1 is there exactly once and finished, then copies every
block from its owner. Block seeds depend on (seed, block) only, so the result equals,
PSF for PSF, the file of the same run traced in one process.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from . import litfield, store
from .shared import tempfiles
from .shared.errors import InputError
from .shared.provenance import now

log = logging.getLogger(__name__)

# Datasets fixed when the run starts, identical in every shard.
FIXED = (
    "depths",
    "wvln",
    "grid/coords",
    "grid/neighbors",
    "noise/index",
    "heldout/coords",
    "heldout/depth",
    "heldout/at_grid_depth",
    "blocks/table",
    "axis/fraction",
)
# Datasets written block by block: each block is copied from the shard that traced it.
# Every dataset a block writes, of every kind: what a merge copies or maps block by block.
PER_BLOCK = tuple(name for kind in store.KINDS for name in store.block_datasets(kind))


def _check_shards(paths: list[str]) -> list[store.GridInfo]:
    if not paths:
        raise InputError("no shard files given; pass the files written by 'psf generate --shard K/N'")
    infos = []
    for p in paths:
        try:
            info = store.open_info(p)
        except InputError as exc:
            raise InputError(f"shard {p}: {exc}") from None
        if info.shard is None:
            raise InputError(f"{p} is not a shard file (written without --shard); merge only shard files")
        if info.schema != store.SCHEMA_VERSION:
            raise InputError(
                f"shard {p} has schema version {info.schema} (an older psf generate); merge shards of "
                f"schema {store.SCHEMA_VERSION}: trace them again with this 'psf generate'"
            )
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
        if not info.complete:
            raise InputError(
                f"shard {info.shard[0]}/{n} ({info.path}) is unfinished ({info.blocks_done}/{info.blocks_total} "
                f"blocks); "
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
    with h5py.File(infos[0].path, "r") as f:
        attrs = dict(f.attrs)
        fixed = {name: f[name][:] for name in FIXED}
        shapes = {name: (f[name].shape, f[name].dtype) for name in PER_BLOCK}
    starts = [i.attrs["started_at"] for i in infos]
    ends = [i.attrs.get("finished_at", "") for i in infos]
    for key in ("shard_index", "shard_count", "finished_at", "wall_time_s", "trace_seconds"):
        attrs.pop(key, None)
    attrs.update(
        started_at=min(starts),
        finished_at=max(ends),
        merged_from=json.dumps([i.path for i in infos]),
        merged_at=now(),
        devices=json.dumps(sorted({i.attrs["device"] for i in infos})),
    )
    blocks = [store.Block.from_row(r) for r in fixed["blocks/table"]]

    # Built beside the output under a private name, renamed onto it only when complete.
    tempfiles.remove_stale(out)
    tmp = tempfiles.temp_path(out)
    try:
        if virtual:
            _write_virtual(tmp, attrs, fixed, shapes, blocks, infos, out.parent)
        else:
            D, P = shapes["grid/psf"][0][:2]
            sizes = dict(
                D=D, P=P, S=shapes["noise/psf"][0][1], M=shapes["heldout/psf_a"][0][0], k=shapes["grid/psf"][0][-1]
            )
            arrays = {k: v for k, v in fixed.items() if k != "blocks/table"}
            store.create(tmp, attrs=attrs, arrays=arrays, sizes=sizes, blocks=blocks)
            trace_seconds = 0.0
            handles = [h5py.File(i.path, "r") for i in infos]
            try:
                for i, block in enumerate(blocks):
                    src = handles[i % n]  # block i was traced by shard i % n
                    psf, border, illumination, valid = store.read_block(src, block)
                    seconds = float(src["blocks/seconds"][i])
                    store.write_block(tmp, i, block, psf, border, seconds, illumination, valid)
                    trace_seconds += seconds
            finally:
                for h in handles:
                    h.close()
            store.set_attrs(tmp, trace_seconds=trace_seconds)
        os.replace(tmp, out)
    except OSError as exc:
        tempfiles.discard(tmp)
        raise InputError(f"cannot write {out}: {exc.strerror or exc}; choose a writable --out") from None
    except BaseException:
        tempfiles.discard(tmp)
        raise
    log.info("merged %d shards into %s%s", n, out, " (virtual datasets)" if virtual else "")
    with h5py.File(out, "r") as f:
        lit, depths = store.read_lit(f)["valid"].all(axis=-1), f["depths"][:]
    litfield.report_dark(lit, depths, out)  # the lit field of the whole grid, as an unsharded run reports it
    return out


def _write_virtual(tmp, attrs, fixed, shapes, blocks, infos, out_dir: Path) -> None:
    """A file whose PSF datasets map each block onto the shard that traced it (no copy).

    Sources are referenced by paths relative to the merged file, so the shards must stay
    beside it. done and seconds are copied: they are small.
    """
    n = len(infos)
    with h5py.File(tmp, "w") as f:
        store.write_header(f, {**attrs, "virtual": True}, fixed)
        rel = [os.path.relpath(i.path, out_dir) for i in infos]
        for name, (shape, dtype) in shapes.items():
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            kind = name.split("/")[0]
            for i, block in enumerate(blocks):
                src = h5py.VirtualSource(rel[i % n], name, shape=shape)
                if kind in ("grid", "noise") and block.kind == kind:
                    sl = (block.depth, slice(block.start, block.stop))
                elif kind == "heldout" and block.kind == f"heldout_{name[-1]}":  # psf_a, valid_b, ...: the half
                    sl = slice(block.start, block.stop)
                else:
                    continue
                layout[sl] = src[sl]
            f.create_virtual_dataset(name, layout, fillvalue=0)
        done = np.zeros(len(blocks), np.uint8)
        seconds = np.zeros(len(blocks))
        for k, info in enumerate(infos):
            with h5py.File(info.path, "r") as s:
                done[k::n] = s["blocks/done"][k::n]
                seconds[k::n] = s["blocks/seconds"][k::n]
        f["blocks/done"] = done
        f["blocks/seconds"] = seconds
        f.attrs["trace_seconds"] = float(seconds.sum())
