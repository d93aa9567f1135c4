"""The HDF5 grid file: the one module that creates, writes, opens and reads it.

Layout (schema 9; docs/dataset.md):

    /depths             [D] float64, object depths [m], strictly ascending
    /focus              [F] float64, focus distances [m] the lens was refocused to, strictly ascending, inf allowed
                        (last); [nan] for a run without focus_m (F = 1: the sensor where the lens file puts it)
    /wvln               [3] float64, wavelengths [µm], order R, G, B
    /grid/coords        [P, 2] float64, (x, y) in [-1, 1], P = N*N, flat index = row*N + col
    /grid/neighbors     [E, 2] int32, undirected pairs, E = 2N(N-1) + 2(N-1)^2
    PLANES: every per-depth axis below has F*D planes, plane p = f*D + d (f into /focus, d into /depths); with
    F = 1 a plane is a depth.
    /grid/psf           [F*D, P, 3, k, k] float32, each channel sums to 1 (0 where dark)
    /grid/kept          [F*D, P, 3] float32, valid rays inside the traced kernel_size window / valid rays (0: none)
    /grid/illumination  [F*D, P, 3] float32, valid rays / launched, over the same on axis (1 on axis, 0 dark)
    /grid/valid         [F*D, P, 3] uint8, 1 where enough rays arrived for a PSF (else the PSF channel is 0)
    /grid/chief         [F*D, P, 2] float64, where each point's chief ray lands on the sensor [mm] (x right, y up,
                        0 on the axis), distortion included (where a stop blocks it: the PSF window's centre)
    /axis/fraction      [F*D, 3] float64, valid-ray fraction of the on-axis point at each plane
    /noise/index        [S] int64, grid points traced a second time, strictly ascending
    /noise/psf          [F*D, S, 3, k, k], /noise/kept, illumination, valid [F*D, S, 3], /noise/chief [F*D, S, 2]
    /heldout/coords     [M, 2], /heldout/depth [M] [m], /heldout/at_grid_depth [M] bool
    /heldout/focus      [M] [m] (inf allowed; nan only when /focus is [nan]), /heldout/at_grid_focus [M] bool;
                        points are grouped by focus (a held-out block traces one focus)
    /heldout/part       [M] uint8, 0 validation (psf train chooses best.pt on them), 1 test (psf eval scores them)
    /heldout/psf_a, psf_b    [M, 3, k, k], two independent traces at heldout_spp/2 each
    /heldout/kept_a|b, illumination_a|b, valid_a|b  [M, 3], /heldout/chief_a|b [M, 2]
    /lens/file          [n] uint8, the lens file's bytes as given (.json, .zmx or .seq); the attribute lens_json
                        holds DeepLens's normalised JSON of it, which is what everything parses
    /blocks/table       [B, 4] int64 (kind, plane index or -1, start, stop)
    /blocks/done        [B] uint8, 1 once the block's PSFs are written
    /blocks/seconds     [B] float64, tracing time of each block [s]
    /closing            [3] float64, finished_at [Unix s], wall_time_s [s], trace_seconds [s]; 0 until finished

Every other module asks this one: :func:`create`, :func:`write_block` and :func:`finish` write
a file as ``psf generate`` traces it, :func:`write_virtual` and :func:`with_heldout_of` write
merged and re-referenced copies, and :class:`GridFile` reads one. Opening checks the structure,
every attribute's type and range and every index once; reading PSFs checks their values.

One schema: a file of another schema version is refused in one line (regenerate it); no
code reads older layouts.

Crash safety: every dataset is allocated in full when the file is created (contiguous
layout, early allocation), so writing a block only overwrites raw bytes and then flips
its done byte, without touching HDF5 metadata. A process killed at any moment leaves a
readable file whose done marks are true only for blocks fully written. The closing marks
(finish time, wall and tracing time) are such raw bytes too, not attributes: stamping them
never grows the file, so a disk that fills during the run cannot damage it at the end.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from psfgen.plan.grid import TEST, VALIDATION
from psfgen.shared import tempfiles
from psfgen.shared.errors import DamagedFile, InputError, os_reason

FORMAT = "psf-cvae.grid"
SCHEMA_VERSION = 9
LENS_FORMATS = {"json": "DeepLens JSON", "zmx": "Zemax .zmx", "seq": "CODE V .seq"}  # lens_format: its name
# A lit PSF channel should keep at least this fraction of its valid rays inside the traced window: DeepLens
# drops the rays beyond it before binning, so a channel keeping less is truncated (generate warns, info and
# the eval report count them).
KEPT_LIMIT = 0.99
KINDS = ("grid", "noise", "heldout_a", "heldout_b")
PARTS = {"validation": VALIDATION, "test": TEST, "all": None}  # GridFile.heldout(part): heldout/part's values
# A stored PSF channel sums to 1 (or 0 where dark): float32 area sums stay well within this.
SUM_TOLERANCE = 1e-3
# Relative illumination is 1 on the axis; a lens may be brighter off axis, never by this much.
MAX_ILLUMINATION = 100.0


def focus_text(focus_m: float) -> str:
    """'0.5 m', or 'infinity'."""
    return "infinity" if focus_m == np.inf else f"{focus_m:g} m"


@dataclass(frozen=True)
class Block:
    kind: str  # one of KINDS
    plane: int  # plane index (f*D + d) for grid/noise blocks, -1 for held-out blocks
    start: int  # first point (index into the kind's point list)
    stop: int  # one past the last point

    def row(self) -> list[int]:
        return [KINDS.index(self.kind), self.plane, self.start, self.stop]

    @staticmethod
    def from_row(row) -> Block:
        return Block(KINDS[int(row[0])], int(row[1]), int(row[2]), int(row[3]))


@dataclass(frozen=True)
class LightKept:
    """How much of their valid rays the lit grid PSFs keep inside the traced window (:meth:`GridFile.light_kept`).

    Lit here means what the lens lights: every channel gets at least valid_min_rays valid rays, wherever they land.
    A window that keeps too few of them stores the point as dark (``dark``), the worst truncation of all."""

    window_px: int  # the traced window's side, kernel_size [px]
    total: int  # lit grid PSFs counted (written blocks)
    below: int  # of them, those with a channel keeping less than KEPT_LIMIT: truncated
    dark: int  # of those, the ones stored as dark: too few of their rays in the window for a PSF
    mean: float  # mean kept share over their channels (NaN when total is 0)
    worst: float  # the least kept share of a lit channel (1 when total is 0), and where it is:
    point: int  # flat grid index (-1 when total is 0)
    xy: tuple[float, float]  # its normalised (x, y)
    depth_m: float  # its depth [m]
    channel: int  # 0, 1, 2: R, G, B
    focus_m: float | None = None  # its focus [m] in a file of several focus settings (else None)

    def where(self) -> str:
        """'channel B of point (-1, -1) at 1 m' (and ', focus 0.5 m' in a file of several focus settings)"""
        focus = "" if self.focus_m is None else f", focus {focus_text(self.focus_m)}"
        return (
            f"channel {'RGB'[self.channel]} of point ({self.xy[0]:.3g}, {self.xy[1]:.3g}) at {self.depth_m:g} m{focus}"
        )


def block_datasets(kind: str) -> tuple[str, ...]:
    """The datasets a block of ``kind`` writes: psf, kept, illumination, valid, chief."""
    if kind in ("grid", "noise"):
        return tuple(f"{kind}/{x}" for x in ("psf", "kept", "illumination", "valid", "chief"))
    half = kind[-1]
    return tuple(f"heldout/{x}_{half}" for x in ("psf", "kept", "illumination", "valid", "chief"))


# Datasets fixed when the run starts, identical in every shard of a run.
FIXED = (
    "depths",
    "focus",
    "wvln",
    "grid/coords",
    "grid/neighbors",
    "noise/index",
    "heldout/coords",
    "heldout/depth",
    "heldout/at_grid_depth",
    "heldout/focus",
    "heldout/at_grid_focus",
    "heldout/part",
    "blocks/table",
    "axis/fraction",
    "lens/file",
)
# Every dataset a block writes, of every kind: what a merge copies or maps block by block.
PER_BLOCK = tuple(name for kind in KINDS for name in block_datasets(kind))


def _where(block: Block):
    if block.kind in ("grid", "noise"):
        return (block.plane, slice(block.start, block.stop))
    return slice(block.start, block.stop)


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _early(f: h5py.File, name: str, shape, dtype, zero_fill: bool = False) -> h5py.Dataset:
    """A contiguous dataset whose storage is allocated right now.

    Without ``zero_fill`` nothing is written: the space is a hole of the (sparse) file,
    which reads as zeros and takes no disk until a block is written, so a shard file
    costs only the blocks it traces.
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC if zero_fill else h5py.h5d.FILL_TIME_NEVER)
    return f.create_dataset(name, shape=shape, dtype=dtype, dcpl=dcpl)


def _write_header(f: h5py.File, attrs: dict, arrays: dict) -> None:
    """The file's attributes and its fixed datasets (depths [m], focus [m], wvln [um], coords, ...)."""
    for key, value in attrs.items():
        f.attrs[key] = value
    f.attrs["format"] = FORMAT
    f.attrs["schema_version"] = SCHEMA_VERSION
    for name, value in arrays.items():
        f.create_dataset(name, data=value)
    f["depths"].attrs["units"] = "m"
    f["focus"].attrs["units"] = "m"
    f["wvln"].attrs["units"] = "um"


def create(path: Path, *, attrs: dict, arrays: dict, sizes: dict, blocks: list[Block], reserve: bool = True) -> None:
    """Write the file's skeleton to a temporary file, then rename it onto ``path``.

    attrs: the header (format and schema version are added here); arrays: fixed content known
    up front (FIXED less blocks/table); sizes: planes (F*D), P, S, M, k, the shapes of the PSF datasets.
    """
    D, P, S, M, k = (sizes[x] for x in ("planes", "P", "S", "M", "k"))  # D: planes
    tempfiles.remove_stale(path)
    tmp = tempfiles.temp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            _write_header(f, attrs, arrays)
            _early(f, "grid/psf", (D, P, 3, k, k), np.float32)
            _early(f, "grid/kept", (D, P, 3), np.float32)
            _early(f, "noise/psf", (D, S, 3, k, k), np.float32)
            _early(f, "noise/kept", (D, S, 3), np.float32)
            for kind, shape in (("grid", (D, P, 3)), ("noise", (D, S, 3))):
                _early(f, f"{kind}/illumination", shape, np.float32)
                _early(f, f"{kind}/valid", shape, np.uint8)
                _early(f, f"{kind}/chief", shape[:-1] + (2,), np.float64)
            for half in "ab":
                _early(f, f"heldout/psf_{half}", (M, 3, k, k), np.float32)
                _early(f, f"heldout/kept_{half}", (M, 3), np.float32)
                _early(f, f"heldout/illumination_{half}", (M, 3), np.float32)
                _early(f, f"heldout/valid_{half}", (M, 3), np.uint8)
                _early(f, f"heldout/chief_{half}", (M, 2), np.float64)
            f.create_dataset("blocks/table", data=np.array([b.row() for b in blocks], dtype=np.int64).reshape(-1, 4))
            _early(f, "blocks/done", (len(blocks),), np.uint8, zero_fill=True)
            _early(f, "blocks/seconds", (len(blocks),), np.float64, zero_fill=True)
            _early(f, "closing", (3,), np.float64, zero_fill=True)
        if reserve:  # the disk space of every block now: a full disk is said before tracing, never half-way
            with open(tmp, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        os.replace(tmp, path)
    except BaseException:
        tempfiles.discard(tmp)
        raise


def write_block(
    path: Path,
    index: int,
    block: Block,
    psf: np.ndarray,
    kept: np.ndarray,
    seconds: float,
    illumination: np.ndarray,
    valid: np.ndarray,
    chief: np.ndarray,
) -> None:
    """Store one traced block: psf [B, 3, k, k], kept, illumination, valid [B, 3], chief [B, 2] [mm]; then mark
    it done.

    The bytes go straight to the datasets' places in the file (contiguous, allocated when it was created): HDF5
    never opens the file for writing again, so a write that fails (a full disk, a size limit, a kill) leaves every
    finished block and the file's structure as they were, and a reader (psf info, a user's h5py) is never locked
    out. The data is synced before its done mark, so a mark never points at missing data."""
    names = (*block_datasets(block.kind), "blocks/seconds", "blocks/done")
    with h5py.File(path, "r", locking=False) as f:
        where = {name: (f[name].id.get_offset(), f[name].dtype, f[name].shape) for name in names}
    fd = os.open(path, os.O_WRONLY)
    try:
        for name, value in zip(names, (psf, kept, illumination, valid, chief, np.float64(seconds))):
            first = (block.plane, block.start) if block.kind in ("grid", "noise") else (block.start,)
            if name == "blocks/seconds":
                first = (index,)
            _pwrite(fd, where[name], first, value)
        os.fdatasync(fd)
        _pwrite(fd, where["blocks/done"], (index,), np.uint8(1))
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _pwrite(fd: int, where: tuple, first: tuple, value) -> None:
    """Write ``value`` into a contiguous dataset (offset, dtype, shape) from element ``first`` on (C order)."""
    offset, dtype, shape = where
    if offset is None:  # not allocated: not a file this module created
        raise OSError(0, "a dataset of the grid file has no storage to write to")
    data = np.ascontiguousarray(value, dtype=dtype)
    start = int(np.ravel_multi_index(first + (0,) * (len(shape) - len(first)), shape))
    os.pwrite(fd, data.tobytes(), offset + start * dtype.itemsize)


def finish(path: Path, *, finished_at: str, trace_seconds: float, wall_time_s: float = 0.0) -> None:
    """Stamp a written file's closing marks: finished_at (UTC ISO 8601), trace_seconds and wall_time_s [s].

    Written in place like a block (:func:`write_block`): HDF5 never opens the file for writing, nothing grows."""
    stamp = datetime.datetime.fromisoformat(finished_at).timestamp()
    with h5py.File(path, "r", locking=False) as f:
        where = (f["closing"].id.get_offset(), f["closing"].dtype, f["closing"].shape)
    fd = os.open(path, os.O_WRONLY)
    try:
        _pwrite(fd, where, (0,), np.array([stamp, wall_time_s, trace_seconds]))
        os.fdatasync(fd)
    finally:
        os.close(fd)


def header(grid: GridFile) -> dict:
    """The attributes of a checked file as stored (JSON as text), to write a file derived from it."""
    with h5py.File(grid.path, "r", locking=False) as f:
        return dict(f.attrs)


def merged_header(shards: list[GridFile], merged_at: str) -> dict:
    """The attributes of a file merged from ``shards``: the first shard's header less its shard and closing
    marks, the shards' earliest start and latest finish, their paths and devices."""
    attrs = header(shards[0])
    for key in ("shard_index", "shard_count", "format", "schema_version"):
        attrs.pop(key, None)
    attrs.update(
        started_at=min(s.started_at for s in shards),
        merged_from=json.dumps([s.path for s in shards]),
        merged_at=merged_at,
        devices=json.dumps(sorted({d for s in shards for d in s.devices})),
    )
    return attrs


def write_virtual(tmp: Path, attrs: dict, shards: list[GridFile], out_dir: Path) -> None:
    """A merged file at ``tmp`` whose PSF datasets map each block onto the shard that traced it (no copy).

    Sources are referenced by paths relative to the merged file, so the shards must stay
    beside it. done and seconds are copied: they are small.
    """
    n = len(shards)
    first = shards[0]
    blocks = first.blocks
    with h5py.File(first.path, "r", locking=False) as f:
        fixed = {name: f[name][:] for name in FIXED}
        shapes = {name: (f[name].shape, f[name].dtype) for name in PER_BLOCK}
    with h5py.File(tmp, "w") as f:
        _write_header(f, {**attrs, "virtual": True}, fixed)
        rel = [os.path.relpath(s.path, out_dir) for s in shards]
        for name, (shape, dtype) in shapes.items():
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            kind = name.split("/")[0]
            for i, block in enumerate(blocks):
                src = h5py.VirtualSource(rel[i % n], name, shape=shape)
                if kind in ("grid", "noise") and block.kind == kind:
                    sl = (block.plane, slice(block.start, block.stop))
                elif kind == "heldout" and block.kind == f"heldout_{name[-1]}":  # psf_a, valid_b, ...: the half
                    sl = slice(block.start, block.stop)
                else:
                    continue
                layout[sl] = src[sl]
            f.create_virtual_dataset(name, layout, fillvalue=0)
        done = np.zeros(len(blocks), np.uint8)
        seconds = np.zeros(len(blocks))
        for k, shard in enumerate(shards):
            done[k::n] = shard.done[k::n]
            seconds[k::n] = shard.seconds[k::n]
        f["blocks/done"] = done
        f["blocks/seconds"] = seconds
        f["closing"] = np.array([_last_finish(shards), 0.0, float(seconds.sum())])


def write_copy(tmp: Path, attrs: dict, shards: list[GridFile]) -> None:
    """A merged file at ``tmp`` with every block copied from the shard that traced it (shard i % N for block i)."""
    first = shards[0]
    with h5py.File(first.path, "r", locking=False) as f:
        arrays = {name: f[name][:] for name in FIXED if name != "blocks/table"}
    sizes = dict(
        planes=first.n_planes, P=first.grid_size**2, S=first.n_noise, M=first.n_heldout, k=first.kernel_size_small
    )
    create(tmp, attrs=attrs, arrays=arrays, sizes=sizes, blocks=first.blocks)
    n = len(shards)
    for i, block in enumerate(first.blocks):
        psf, kept, illumination, valid, chief = shards[i % n].read_block(block)
        write_block(tmp, i, block, psf, kept, float(shards[i % n].seconds[i]), illumination, valid, chief)
    finish(
        tmp,
        finished_at=datetime.datetime.fromtimestamp(_last_finish(shards), datetime.UTC).isoformat(),
        trace_seconds=float(sum(s.seconds[k::n].sum() for k, s in enumerate(shards))),
    )


def _last_finish(shards: list[GridFile]) -> float:
    """The latest finish of the shards [Unix s] (every shard is complete when merged)."""
    return max(datetime.datetime.fromisoformat(s.finished_at).timestamp() for s in shards if s.finished_at)


def with_heldout_of(grid: Path, ref: Path, out: Path) -> Path:
    """A copy of the grid file whose held-out group is the reference's: same lens, kernel and
    wavelengths; the grid's depths span the reference's (a grid with other depths is scored on the
    same points, and a held-out point counts as at a grid depth when it is at one of the grid's)."""
    if out.exists() and out.stat().st_mtime >= max(grid.stat().st_mtime, ref.stat().st_mtime):
        return out
    g, r = GridFile.open(grid), GridFile.open(ref)
    # All but the grid's own sampling must agree (lens, kernel, focus, wavelengths); depths may be added.
    own = {"grid_size", "spp", "heldout", "heldout_spp", "noise_points", "seed", "block_rays", "depths"}
    mine, theirs = ({k: v for k, v in x.params.items() if k not in own} for x in (g, r))
    same_lens = g.lens_sha256 == r.lens_sha256 and np.array_equal(g.wvln, r.wvln)
    spans = g.depths.min() <= r.depths.min() * (1 + 1e-9) and g.depths.max() >= r.depths.max() * (1 - 1e-9)
    if mine != theirs or not same_lens or not spans:
        raise InputError(
            f"{ref} and {grid} differ in lens, kernel or wavelengths, or the grid's depths do not span the "
            "reference's: no common reference"
        )
    tmp = out.with_suffix(".tmp")
    shutil.copyfile(grid, tmp)
    with h5py.File(tmp, "r+") as f, h5py.File(ref, "r", locking=False) as rf:
        del f["heldout"]
        rf.copy(rf["heldout"], f, "heldout")
        f["heldout/at_grid_depth"][...] = np.isclose(f["heldout/depth"][:][:, None], g.depths[None]).any(axis=1)
        for attr, values in (("config", g.config), ("run_params", g.params)):
            f.attrs[attr] = json.dumps({**values, "heldout": r.params["heldout"], "heldout_spp": r.heldout_spp},
                                       sort_keys=True)  # fmt: skip
        f.attrs["heldout_from"] = f"{ref.name} (run {r.run_id})"
        f.attrs["valid_min_rays_heldout"] = r.valid_min_rays_heldout
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reading


@contextlib.contextmanager
def _unreadable_is_damage(path: Path):
    """HDF5's errors while reading an opened file as one line: its metadata past the superblock is broken (a bit
    flip, a torn copy), where h5py raises OSError or RuntimeError ("ran off end of input buffer", "addr overflow")."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        raise DamagedFile(
            f"{path} is damaged: HDF5 cannot read it ({os_reason(exc)}); regenerate it with 'psf generate' (or restore "
            "the file)"
        ) from None


class _Damaged(Exception):
    """What is wrong with a file, raised inside the checks and turned into one DamagedFile line."""


def _json(attrs: dict, key: str, kind: type, optional: bool = False):
    """The attribute ``key`` parsed as JSON of type ``kind`` (None when optional and absent)."""
    if key not in attrs:
        if optional:
            return None
        raise _Damaged(f"attribute {key} is missing")
    try:
        value = json.loads(attrs[key])
    except (ValueError, TypeError, RecursionError):
        raise _Damaged(f"attribute {key} is not valid JSON") from None
    if not isinstance(value, kind):
        raise _Damaged(f"attribute {key} is not a JSON {kind.__name__}")
    return value


def _scalar(attrs: dict, key: str, kind: type, optional: bool = False, low=None, high=None):
    """The attribute ``key`` as a ``kind`` (str, int, float, bool) within [low, high]."""
    if key not in attrs:
        if optional:
            return None
        raise _Damaged(f"attribute {key} is missing")
    value = attrs[key]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    ok = {
        str: isinstance(value, str),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value),
        bool: isinstance(value, (bool, int)),
    }[kind]
    if not ok:
        raise _Damaged(f"attribute {key} is not a {'finite number' if kind is float else kind.__name__}: {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _Damaged(f"attribute {key} is {value}, outside {low}..{high}")
    return kind(value)


def _param(params: dict, key: str, kind: type = int, low=1):
    value = params.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or value < low:
        raise _Damaged(f"run_params.{key} is {value!r}, not a {kind.__name__} of at least {low}")
    return value


def _array(f: h5py.File, name: str, shape: tuple | None = None, ndim: int | None = None) -> np.ndarray:
    """A small dataset read whole, after checking its shape (or number of axes)."""
    try:
        dset = f[name]
    except KeyError:
        raise _Damaged(f"dataset {name} is missing") from None
    if not isinstance(dset, h5py.Dataset):
        raise _Damaged(f"{name} is not a dataset")
    if shape is not None and dset.shape != shape:
        raise _Damaged(f"{name} has shape {dset.shape}, expected {shape}")
    if ndim is not None and len(dset.shape) != ndim:
        raise _Damaged(f"{name} has shape {dset.shape}, expected {ndim} axes")
    try:
        return dset[()]
    except OSError as exc:  # a dangling external or virtual source, a truncated file
        raise _Damaged(f"{name} cannot be read ({str(exc).splitlines()[0]})") from None


def _check_shard_sources(f: h5py.File, path: Path) -> None:
    """A virtual file reads whatever sits at its shards' paths: each must still be a shard of this file's run."""
    run_id = f.attrs.get("run_id")
    for name in sorted({s.file_name for s in f["grid/psf"].virtual_sources()}):
        try:
            with h5py.File(path.parent / name, "r", locking=False) as shard:
                theirs = shard.attrs.get("run_id")
        except OSError:
            theirs = None
        if theirs != run_id:
            raise InputError(
                f"{path} maps {name}, which is no longer a shard of its run (run id {theirs!r}, the merged file's "
                f"{run_id!r}); put the run's own shard back or merge again"
            )


def _check_range(name: str, values: np.ndarray, low: float, high: float) -> None:
    if values.size and not (np.isfinite(values).all() and values.min() >= low and values.max() <= high):
        raise _Damaged(f"{name} holds values outside {low:g}..{high:g} (or NaN)")


def _iso(stamp: float) -> str:
    """A Unix time [s] as UTC ISO 8601, to the second (as psf generate stamps it)."""
    return datetime.datetime.fromtimestamp(round(stamp), datetime.UTC).isoformat()


def _check_index(name: str, values: np.ndarray, count: int) -> None:
    if values.size and (values.min() < 0 or values.max() >= count):
        bad = int(values.min() if values.min() < 0 else values.max())
        raise _Damaged(f"{name} holds {bad}, outside the {count} points it indexes")


@dataclass(frozen=True, eq=False)
class GridFile:
    """A checked grid file: its header, its small arrays, and readers of its PSFs.

    ``GridFile.open(path)`` reads and checks everything but the PSFs (which may exceed RAM); the
    PSF readers check the values they return (finite, non-negative, each channel summing to 1
    where valid and 0 where not). Picklable: a reader process opens its own handle.
    """

    path: str
    run_id: str
    config: dict  # the resolved GenerateConfig that wrote the file (JSON object)
    params: dict  # the parameters that decide the file's content (run_params)
    grid_size: int  # N: the grid is N x N
    kernel_size: int  # traced window side [px]
    kernel_size_small: int  # stored kernel side [px]
    spp: int  # rays per grid point and colour
    heldout_spp: int  # rays of the held-out reference, both halves together
    seed: int
    depths: np.ndarray  # [D] m, strictly ascending
    focus: np.ndarray  # [F] m, strictly ascending, inf allowed; [nan]: no focus_m, the lens file's sensor
    wvln: np.ndarray  # [3] µm, R, G, B
    coords: np.ndarray  # [P, 2] normalised (x, y)
    neighbors: np.ndarray  # [E, 2] flat indices
    noise_index: np.ndarray  # [S] flat indices of the re-traced grid points, ascending
    heldout_coords: np.ndarray  # [M, 2]
    heldout_depth: np.ndarray  # [M] m
    heldout_at_grid_depth: np.ndarray  # [M] bool
    heldout_focus: np.ndarray  # [M] m (inf allowed; the file's nan in a file without focus_m)
    heldout_at_grid_focus: np.ndarray  # [M] bool
    heldout_part: np.ndarray  # [M] uint8, VALIDATION (0) or TEST (1)
    axis_fraction: np.ndarray  # [F*D, 3]
    illumination: np.ndarray  # [F*D, P, 3] float32, relative illumination of the grid
    valid: np.ndarray  # [F*D, P, 3] bool, channels that hold a PSF
    kept: np.ndarray  # [F*D, P, 3] float32, share of the valid rays inside the traced window (0: no valid ray)
    blocks: tuple[Block, ...]
    done: np.ndarray  # [B] bool, blocks written
    seconds: np.ndarray  # [B] s, tracing time per block
    lens_path: str
    lens_json: str  # DeepLens's normalised JSON of the lens file, its sensor resolved: what everything parses
    lens_sha256: str  # of the lens file's bytes
    lens_format: str  # json, zmx or seq: the lens file's format
    lens_bytes: bytes  # the lens file as given
    sensor_from: dict  # {"size": ..., "res": ...}: where the sensor's size and resolution came from
    chief_mm: (
        np.ndarray
    )  # [F*D, P, 2] float64: where the grid points' chief rays land [mm], x right, y up (0: unwritten)
    versions: dict  # package versions that wrote it
    sensor_size_mm: tuple[float, float]  # (width, height)
    sensor_res: tuple[int, int]  # (columns, rows) DeepLens traced with
    foclen_mm: float
    devices: tuple[str, ...]  # the device that traced it, or those of a merged file's shards
    started_at: str
    finished_at: str | None
    trace_seconds: float | None
    valid_min_rays: int
    valid_min_rays_heldout: int
    depth_plan: dict | None  # num_depths auto: the pilot's figures and choice
    window_plan: dict | None  # kernel_size auto: the pilot's figures and choice
    focus_plan: dict | None  # num_focus auto: the pilot's figures and choice
    shard: tuple[int, int] | None  # (K, N) for a shard file: it owns blocks i with i % N == K
    merged_from: tuple[str, ...] | None
    virtual: bool  # a psf merge --virtual file: its PSFs live in the shard files beside it
    heldout_from: str | None

    # -- opening --------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> GridFile:
        """Open and check a grid file, or raise InputError (DamagedFile) in one line that names the problem."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"data file {path} does not exist; create it with 'psf generate --out {path}'")
        if not path.is_file():
            raise InputError(f"{path} is not a file; give a grid file written by 'psf generate'")
        try:
            f = h5py.File(path, "r", locking=False)  # never blocks, nor is blocked by, a run writing it
        except OSError:
            if h5py.is_hdf5(path):  # ours or not, its structure is broken (e.g. by a write that failed)
                raise DamagedFile(f"{path} is an HDF5 file that cannot be opened (damaged)") from None
            raise InputError(f"{path} is not a readable HDF5 file; give a file written by 'psf generate'") from None
        with f, _unreadable_is_damage(path):
            attrs = dict(f.attrs)
            fmt = attrs.get("format")
            if fmt != FORMAT:
                raise InputError(
                    f"{path} is not a psf-cvae grid file (format {fmt!r}); give a file written by 'psf generate'"
                )
            version = attrs.get("schema_version")
            version = version.item() if isinstance(version, np.generic) else version
            if not (isinstance(version, (int, np.integer)) and int(version) == SCHEMA_VERSION):
                raise InputError(
                    f"{path} has schema version {version!r}, this psf-cvae reads {SCHEMA_VERSION}; "
                    "regenerate it with 'psf generate'"
                )
            if attrs.get("virtual"):  # a `psf merge --virtual` file reads zeros where a shard is gone
                missing = sorted(
                    {s.file_name for s in f["grid/psf"].virtual_sources() if not (path.parent / s.file_name).exists()}
                )
                if missing:
                    raise InputError(
                        f"{path} maps shard files that are missing ({', '.join(missing)}); put them back beside it "
                        "or merge again without --virtual"
                    )
                _check_shard_sources(f, path)
            try:
                return cls._read(f, attrs, path)
            except _Damaged as exc:
                raise DamagedFile(
                    f"{path} is damaged: {exc}; regenerate it with 'psf generate' (or restore the file)"
                ) from None

    @classmethod
    def _read(cls, f: h5py.File, attrs: dict, path: Path) -> GridFile:
        params = _json(attrs, "run_params", dict)
        config = _json(attrs, "config", dict)
        n, k = _param(params, "grid_size", low=2), _param(params, "kernel_size_small")
        kernel_size = _param(params, "kernel_size", low=k)
        spp, heldout_spp, seed = (
            _param(params, "spp"),
            _param(params, "heldout_spp", low=2),
            _param(params, "seed", low=0),
        )
        P = n * n
        depths = _array(f, "depths", ndim=1).astype(np.float64)
        D = len(depths)
        if D == 0 or not (np.isfinite(depths).all() and (depths > 0).all() and (np.diff(depths) > 0).all()):
            raise _Damaged("depths must be positive metres, strictly ascending")
        focus = _array(f, "focus", ndim=1).astype(np.float64)
        F = len(focus)
        single = F == 1 and np.isnan(focus[0])  # no focus_m: the sensor where the lens file puts it
        if F == 0 or not (single or ((focus > 0).all() and (np.diff(focus) > 0).all())):
            raise _Damaged("focus must be positive metres (inf allowed), strictly ascending, or [nan] alone")
        D = F * D  # from here on every per-depth axis is a plane axis, p = f*D + d
        wvln = _array(f, "wvln", (3,)).astype(np.float64)
        _check_range("wvln", wvln, 1e-3, 1e3)
        coords = _array(f, "grid/coords", (P, 2)).astype(np.float64)
        _check_range("grid/coords", coords, -1.0, 1.0)
        neighbors = _array(f, "grid/neighbors", ndim=2)
        _check_index("grid/neighbors", neighbors, P)
        noise_index = _array(f, "noise/index", ndim=1)
        _check_index("noise/index", noise_index, P)
        if (np.diff(noise_index) <= 0).any():
            raise _Damaged("noise/index is not strictly ascending")
        S = len(noise_index)
        ho_coords = _array(f, "heldout/coords", ndim=2).astype(np.float64)
        M = ho_coords.shape[0]
        if ho_coords.shape != (M, 2):
            raise _Damaged(f"heldout/coords has shape {ho_coords.shape}, expected ({M}, 2)")
        _check_range("heldout/coords", ho_coords, -1.0, 1.0)
        ho_depth = _array(f, "heldout/depth", (M,)).astype(np.float64)
        _check_range("heldout/depth", ho_depth, np.finfo(np.float64).tiny, np.inf)
        if not np.isfinite(ho_depth).all():
            raise _Damaged("heldout/depth holds NaN or inf")
        ho_at = _array(f, "heldout/at_grid_depth", (M,)).astype(bool)
        ho_focus = _array(f, "heldout/focus", (M,)).astype(np.float64)
        ho_at_focus = _array(f, "heldout/at_grid_focus", (M,)).astype(bool)
        if F == 1:  # every held-out point at the one focus, nan included
            if not (np.array_equal(ho_focus, np.full(M, focus[0]), equal_nan=True) and ho_at_focus.all()):
                raise _Damaged("heldout/focus or heldout/at_grid_focus is not the file's one focus")
        elif M and not (
            (ho_focus >= focus[0]).all() and (ho_focus <= focus[-1]).all()
            and np.array_equal(ho_at_focus, np.isin(ho_focus, focus))
        ):  # fmt: skip
            raise _Damaged("heldout/focus holds values outside the file's focus range, or at_grid_focus disagrees")
        ho_part = _array(f, "heldout/part", (M,))
        if not np.isin(ho_part, (VALIDATION, TEST)).all():
            raise _Damaged("heldout/part holds values other than 0 (validation) and 1 (test)")
        axis = _array(f, "axis/fraction", (D, 3)).astype(np.float64)
        _check_range("axis/fraction", axis, 0.0, 1.0)
        illumination = _array(f, "grid/illumination", (D, P, 3)).astype(np.float32)
        _check_range("grid/illumination", illumination, 0.0, MAX_ILLUMINATION)
        valid = _array(f, "grid/valid", (D, P, 3))
        _check_range("grid/valid", valid, 0, 1)
        # Shares of counted rays, written within 0..1: anything else (or NaN) is damage, in every group.
        kept = _array(f, "grid/kept", (D, P, 3)).astype(np.float32)
        _check_range("grid/kept", kept, 0.0, 1.0)
        for name, shape in (("noise/kept", (D, S, 3)), ("heldout/kept_a", (M, 3)), ("heldout/kept_b", (M, 3))):
            _check_range(name, _array(f, name, shape), 0.0, 1.0)
        shapes = {"grid/psf": (D, P, 3, k, k), "noise/psf": (D, S, 3, k, k), "noise/valid": (D, S, 3)}
        for half in "ab":
            shapes |= {f"heldout/psf_{half}": (M, 3, k, k), f"heldout/valid_{half}": (M, 3)}
            shapes |= {f"heldout/illumination_{half}": (M, 3)}
        shapes |= {"noise/illumination": (D, S, 3), "noise/chief": (D, S, 2)}
        shapes |= {"heldout/chief_a": (M, 2), "heldout/chief_b": (M, 2)}
        for name, shape in shapes.items():
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise _Damaged(f"dataset {name} is missing")
            if f[name].shape != shape:
                raise _Damaged(f"{name} has shape {f[name].shape}, expected {shape}")
        table = _array(f, "blocks/table", ndim=2)
        done = _array(f, "blocks/done", (len(table),))
        _check_range("blocks/done", done, 0, 1)
        seconds = _array(f, "blocks/seconds", (len(table),)).astype(np.float64)
        _check_range("blocks/seconds", seconds, 0.0, np.inf)
        closing = _array(f, "closing", (3,)).astype(np.float64)
        _check_range("closing", closing, 0.0, np.inf)
        counts = {"grid": P, "noise": S, "heldout_a": M, "heldout_b": M}
        blocks = []
        for row in table:
            if row.shape != (4,) or not 0 <= row[0] < len(KINDS):
                raise _Damaged(f"blocks/table holds a row {row.tolist()} of no known kind")
            block = Block.from_row(row)
            depth_ok = (0 <= block.plane < D) if block.kind in ("grid", "noise") else block.plane == -1
            if not (depth_ok and 0 <= block.start < block.stop <= counts[block.kind]):
                raise _Damaged(f"blocks/table holds a {block.kind} block {row.tolist()} outside its points")
            blocks.append(block)
        shard = None
        if "shard_count" in attrs or "shard_index" in attrs:
            count = _scalar(attrs, "shard_count", int, low=1)
            shard = (_scalar(attrs, "shard_index", int, low=0, high=count - 1), count)
        devices = _json(attrs, "devices", list, optional=True)
        merged = _json(attrs, "merged_from", list, optional=True)
        plan = _json(attrs, "depth_plan", dict, optional=True)
        if plan is not None and not isinstance(plan.get("num_depths"), int):
            raise _Damaged("attribute depth_plan has no whole num_depths")
        window = _json(attrs, "window_plan", dict, optional=True)
        if window is not None and window.get("kernel_size") != kernel_size:
            raise _Damaged(f"attribute window_plan's kernel_size is not the file's {kernel_size} px")
        focus_plan = _json(attrs, "focus_plan", dict, optional=True)
        if focus_plan is not None and focus_plan.get("num_focus") != F:
            raise _Damaged(f"attribute focus_plan's num_focus is not the file's {F} focus settings")
        size = _json(attrs, "sensor_size_mm", list)
        res = _json(attrs, "sensor_res", list)
        if not (len(size) == 2 and all(isinstance(v, (int, float)) and np.isfinite(v) and v > 0 for v in size)):
            raise _Damaged(f"attribute sensor_size_mm is {size!r}, not two positive millimetres")
        if not (len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res)):
            raise _Damaged(f"attribute sensor_res is {res!r}, not two positive pixel counts")
        chief = _array(f, "grid/chief", (D, P, 2)).astype(np.float64)
        if not np.isfinite(chief).all():
            raise _Damaged("grid/chief holds NaN or inf")
        lens_json = _scalar(attrs, "lens_json", str)
        try:
            json.loads(lens_json)
        except (ValueError, RecursionError):
            raise _Damaged("attribute lens_json is not valid JSON") from None
        lens_bytes = _array(f, "lens/file", ndim=1)
        lens_sha256 = _scalar(attrs, "lens_sha256", str)
        if lens_bytes.dtype != np.uint8 or hashlib.sha256(lens_bytes.tobytes()).hexdigest() != lens_sha256:
            raise _Damaged("lens/file does not hold the lens file its lens_sha256 names")
        lens_format = _scalar(attrs, "lens_format", str)
        if lens_format not in LENS_FORMATS:
            raise _Damaged(f"attribute lens_format is {lens_format!r}, not one of {', '.join(LENS_FORMATS)}")
        sensor_from = _json(attrs, "sensor_from", dict)
        return cls(
            path=str(path),
            run_id=_scalar(attrs, "run_id", str),
            config=config,
            params=params,
            grid_size=n,
            kernel_size=kernel_size,
            kernel_size_small=k,
            spp=spp,
            heldout_spp=heldout_spp,
            seed=seed,
            depths=depths,
            focus=focus,
            wvln=wvln,
            coords=coords,
            neighbors=neighbors.astype(np.int64),
            noise_index=noise_index.astype(np.int64),
            heldout_coords=ho_coords,
            heldout_depth=ho_depth,
            heldout_at_grid_depth=ho_at,
            heldout_focus=ho_focus,
            heldout_at_grid_focus=ho_at_focus,
            heldout_part=ho_part.astype(np.uint8),
            axis_fraction=axis,
            illumination=illumination,
            valid=valid.astype(bool),
            kept=kept,
            blocks=tuple(blocks),
            done=done.astype(bool),
            seconds=seconds,
            lens_path=_scalar(attrs, "lens_path", str),
            lens_json=lens_json,
            lens_sha256=lens_sha256,
            lens_format=lens_format,
            lens_bytes=lens_bytes.tobytes(),
            sensor_from=sensor_from,
            chief_mm=chief,
            versions=_json(attrs, "versions", dict),
            sensor_size_mm=(float(size[0]), float(size[1])),
            sensor_res=(int(res[0]), int(res[1])),
            foclen_mm=_scalar(attrs, "foclen_mm", float),
            devices=tuple(str(d) for d in devices) if devices is not None else (_scalar(attrs, "device", str),),
            started_at=_scalar(attrs, "started_at", str),
            finished_at=_iso(closing[0]) if closing[0] > 0 else None,
            trace_seconds=float(closing[2]) if closing[0] > 0 else None,
            valid_min_rays=_scalar(attrs, "valid_min_rays", int, low=1),
            valid_min_rays_heldout=_scalar(attrs, "valid_min_rays_heldout", int, low=1),
            depth_plan=plan,
            window_plan=window,
            focus_plan=focus_plan,
            shard=shard,
            merged_from=tuple(str(p) for p in merged) if merged is not None else None,
            virtual=bool(_scalar(attrs, "virtual", bool, optional=True)),
            heldout_from=_scalar(attrs, "heldout_from", str, optional=True),
        )

    # -- what the header says --------------------------------------------------------------------------------------

    @property
    def n_heldout(self) -> int:
        return len(self.heldout_depth)

    @property
    def n_focus(self) -> int:
        """F: the focus settings traced (1 without focus_m)."""
        return len(self.focus)

    @property
    def n_planes(self) -> int:
        """F*D: the leading axis of every grid, noise and axis array."""
        return len(self.focus) * len(self.depths)

    def plane(self, f: int, d: int) -> int:
        """The plane index of focus index f and depth index d: f*D + d."""
        return f * len(self.depths) + d

    @property
    def plane_focus(self) -> np.ndarray:
        """[F*D] m: each plane's focus (nan in a file without focus_m)."""
        return np.repeat(self.focus, len(self.depths))

    @property
    def plane_depth(self) -> np.ndarray:
        """[F*D] m: each plane's depth."""
        return np.tile(self.depths, len(self.focus))

    def plane_label(self, p: int) -> str:
        """'2 m', or '2 m at focus 0.5 m' (or 'at focus infinity') in a file of several focus settings."""
        depth = f"{self.plane_depth[p]:g} m"
        return depth if self.n_focus == 1 else f"{depth} at focus {focus_text(self.plane_focus[p])}"

    def n_part(self, part: str) -> int:
        """How many held-out points are validation points, test points, or both ("all")."""
        return self.n_heldout if part == "all" else int((self.heldout_part == PARTS[part]).sum())

    @property
    def n_noise(self) -> int:
        return len(self.noise_index)

    @property
    def lit(self) -> np.ndarray:
        """[F*D, P] bool: grid points with a PSF in every channel."""
        return self.valid.all(axis=-1)

    def _mine(self) -> np.ndarray:
        """[B] bool: the blocks this file traces (a shard owns every N-th)."""
        mine = np.ones(len(self.blocks), bool)
        if self.shard is not None:
            mine[:] = False
            mine[self.shard[0] :: self.shard[1]] = True
        return mine

    @property
    def blocks_done(self) -> int:
        return int(self.done[self._mine()].sum())

    @property
    def blocks_total(self) -> int:
        return int(self._mine().sum())

    @property
    def complete(self) -> bool:
        return self.blocks_done == self.blocks_total

    def require_complete(self) -> None:
        """A finished, whole run: what training and evaluation need."""
        if self.shard is not None:
            raise InputError(
                f"{self.path} is shard {self.shard[0]}/{self.shard[1]} of a run; merge all shards first "
                "with 'psf merge SHARD... --out grid.h5'"
            )
        if not self.complete:
            raise InputError(
                f"{self.path} is unfinished ({self.blocks_done}/{self.blocks_total} blocks traced); "
                "run the same 'psf generate' command again to resume it"
            )
        if not self.lit.any():
            raise InputError(
                f"{self.path} holds no lit grid PSF (every point dark): nothing to learn from or measure against; "
                "check the lens, its sensor size and the depths, and generate again"
            )

    def written(self, kind: str) -> np.ndarray:
        """bool, True where a finished block wrote the point: [F*D, P] (grid), [F*D, S] (noise), [M] (heldout_a|b)."""
        cache = self.__dict__.setdefault("_written", {})  # blocks and done marks are fixed once opened
        if kind not in cache:
            shape = {"grid": (self.n_planes, self.grid_size**2), "noise": (self.n_planes, self.n_noise)}
            out = np.zeros(shape.get(kind, (self.n_heldout,)), dtype=bool)
            for block, done in zip(self.blocks, self.done):
                if done and block.kind == kind:
                    out[_where(block)] = True
            cache[kind] = out
        return cache[kind]

    def traced_grid(self) -> np.ndarray:
        """[F*D, P] bool: grid PSFs whose block is written (all of them in a complete file)."""
        return self.written("grid")

    def grid_speed(self) -> tuple[float, int] | None:
        """(grid PSFs/s of ray tracing, PSFs counted) from the finished grid blocks' times."""
        grid = [i for i, b in enumerate(self.blocks) if b.kind == "grid" and self.done[i]]
        n = sum(self.blocks[i].stop - self.blocks[i].start for i in grid)
        secs = float(self.seconds[grid].sum()) if grid else 0.0
        return (n / secs, n) if n and secs > 0 else None

    @property
    def lights(self) -> np.ndarray:
        """[F*D, P] bool: grid points whose every channel gets at least valid_min_rays valid rays, wherever they land
        (lit, or stored as dark only because the traced window holds too few of them)."""
        # illumination = (valid rays / spp) / the axis's fraction, in float32: a whole count once rounded
        rays = np.rint(self.illumination * self.axis_fraction[:, None, :] * self.spp)  # [F*D, P, 3]
        return (rays >= self.valid_min_rays).all(axis=-1) | self.lit

    def light_kept(self) -> LightKept:
        """The share of their valid rays the lit grid PSFs (:attr:`lights`) keep inside the traced window, over the
        written blocks. A dark channel (no valid ray: kept 0) is never counted as truncated."""
        lit = self.traced_grid() & self.lights  # [F*D, P]
        if not lit.any():
            nan = float("nan")
            return LightKept(self.kernel_size, 0, 0, 0, nan, 1.0, -1, (nan, nan), nan, -1)
        masked = np.where(lit[..., None], self.kept, np.inf)  # [F*D, P, 3]
        d, p, c = np.unravel_index(int(np.argmin(masked)), masked.shape)
        cut = lit & (self.kept.min(axis=-1) < KEPT_LIMIT)  # [F*D, P]: a PSF is as truncated as its worst channel
        return LightKept(
            window_px=self.kernel_size,
            total=int(lit.sum()),
            below=int(cut.sum()),
            dark=int((cut & ~self.lit).sum()),
            mean=float(self.kept[lit].mean(dtype=np.float64)),
            worst=float(masked[d, p, c]),
            point=int(p),
            xy=(float(self.coords[p, 0]), float(self.coords[p, 1])),
            depth_m=float(self.plane_depth[d]),
            channel=int(c),
            focus_m=float(self.plane_focus[d]) if self.n_focus > 1 else None,
        )

    @property
    def kernel_pitch_mm(self) -> float:
        """One stored kernel pixel [mm]: kernel_size sensor pixels area-downsampled to kernel_size_small."""
        return self.kernel_size * (self.sensor_size_mm[0] / self.sensor_res[0]) / self.kernel_size_small

    # -- reading PSFs ----------------------------------------------------------------------------------------------

    def _dataset(self, name: str, where=()) -> np.ndarray:
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                return f[name][where]
        except OSError as exc:  # the file changed or went away since it was opened
            raise DamagedFile(f"{self.path} cannot be read ({str(exc).splitlines()[0]}); regenerate it") from None

    def _checked(self, name: str, psf: np.ndarray, valid: np.ndarray, where, written: np.ndarray) -> np.ndarray:
        """psf [..., 3, k, k] after checking it: finite, non-negative, each channel summing to 1 where
        valid [..., 3] and to 0 where not; only where a finished block wrote it (written [...]): a block
        interrupted half-way holds anything until it is traced again."""
        with np.errstate(all="ignore"):
            sums = psf.sum(axis=(-2, -1), dtype=np.float64)
            causes = (
                (~np.isfinite(psf).all(axis=(-2, -1)), "NaN or inf values"),
                ((psf < 0).any(axis=(-2, -1)), "negative values"),
                (valid & (sums == 0), "no energy in a lit channel"),
                (np.where(valid, np.abs(sums - 1.0) > SUM_TOLERANCE, sums != 0.0), "a sum other than 1 (0 if dark)"),
            )
        for bad, what in causes:
            bad &= written[..., None]
            if bad.any():
                hit = np.argwhere(bad)[0]
                raise DamagedFile(
                    f"{self.path} is damaged: {name} at {where(hit[:-1])}, channel {'RGB'[hit[-1]]}, holds {what} "
                    f"({int(bad.sum())} channel PSFs); regenerate it with 'psf generate'"
                )
        return psf

    def _grid_where(self, p: int):
        return lambda idx: f"point {int(idx[0])}, depth {self.plane_label(p)}"

    def grid_psf(self, p: int) -> np.ndarray:
        """The grid PSFs of plane p (f*D + d; with one focus the depth index): [P, 3, k, k], checked."""
        psf = self._dataset("grid/psf", p)
        return self._checked("grid/psf", psf, self.valid[p], self._grid_where(p), self.written("grid")[p])

    def grid_psfs(self) -> np.ndarray:
        """Every grid PSF: [F*D, P, 3, k, k], checked (the whole grid in RAM: check its size first)."""
        psf = self._dataset("grid/psf")
        where = lambda i: f"point {int(i[1])}, depth {self.plane_label(int(i[0]))}"
        return self._checked("grid/psf", psf, self.valid, where, self.written("grid"))

    def check_grid(self) -> None:
        """Read and check every grid PSF, one plane at a time (files may exceed RAM)."""
        for p in range(self.n_planes):
            self.grid_psf(p)

    def grid_psf_flat(self, lo: int, hi: int, handle: h5py.File | None = None) -> np.ndarray:
        """Grid PSFs with flat indices [lo, hi) in [plane, point] order: [hi - lo, 3, k, k], checked.

        handle: an open h5py handle from :meth:`reader` (a training loader reads many small runs)."""
        P = self.grid_size**2
        parts = []
        with h5py.File(self.path, "r", locking=False) if handle is None else _Borrowed(handle) as f:
            dset = f["grid/psf"]
            i = lo
            while i < hi:
                d, p = divmod(i, P)
                stop = min(hi, (d + 1) * P)
                parts.append(dset[d, p : p + stop - i])
                i = stop
        psf = parts[0] if len(parts) == 1 else np.concatenate(parts)
        valid = self.valid.reshape(-1, 3)[lo:hi]
        written = self.written("grid").reshape(-1)[lo:hi]
        return self._checked("grid/psf", psf, valid, lambda i: f"flat index {lo + int(i[0])}", written)

    def reader(self) -> h5py.File:
        """An open handle for :meth:`grid_psf_flat`, owned by the caller (one per reading process)."""
        return h5py.File(self.path, "r", locking=False)

    def noise(self) -> dict:
        """The noise floor's re-traces: psf [F*D, S, 3, k, k] (checked), valid [F*D, S, 3] bool, index [S]."""
        valid = self._dataset("noise/valid").astype(bool)
        psf = self._dataset("noise/psf")
        where = lambda i: f"noise point {int(i[1])}, depth {self.plane_label(int(i[0]))}"
        psf = self._checked("noise/psf", psf, valid, where, self.written("noise"))
        return {"psf": psf, "valid": valid, "index": self.noise_index}

    def heldout(self, part: str = "all") -> dict:
        """The held-out points of ``part`` ("validation": what training chooses a checkpoint on, "test": what
        evaluation scores, "all"): index [n] (into the file's M points), coords [n, 2], depth [n] m,
        at_grid_depth [n], focus [n] m (inf allowed; nan in a file without focus_m), at_grid_focus [n],
        psf_a / psf_b [n, 3, k, k] (checked), ref (their mean), illumination [n, 3] (mean of
        the halves) and lit [n] (both halves valid in every channel)."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, not {part!r}")
        out = {
            "coords": self.heldout_coords,
            "depth": self.heldout_depth,
            "at_grid_depth": self.heldout_at_grid_depth,
            "focus": self.heldout_focus,
            "at_grid_focus": self.heldout_at_grid_focus,
        }
        valid = {}
        for half in "ab":
            valid[half] = self._dataset(f"heldout/valid_{half}").astype(bool)
            illum = self._dataset(f"heldout/illumination_{half}").astype(np.float32)
            _check_or_damaged(self.path, f"heldout/illumination_{half}", illum, 0.0, MAX_ILLUMINATION)
            out[f"illumination_{half}"] = illum
            psf = self._dataset(f"heldout/psf_{half}")
            where = lambda i: f"point {int(i[0])}"
            out[f"psf_{half}"] = self._checked(
                f"heldout/psf_{half}", psf, valid[half], where, self.written(f"heldout_{half}")
            )
        out["illumination"] = 0.5 * (out.pop("illumination_a") + out.pop("illumination_b"))
        out["lit"] = (valid["a"] & valid["b"]).all(axis=1)
        out["ref"] = 0.5 * (out["psf_a"] + out["psf_b"])
        out["index"] = np.arange(self.n_heldout)
        keep = self.heldout_part == PARTS[part] if part != "all" else slice(None)
        return {k: v[keep] for k, v in out.items()}

    def read_block(self, block: Block) -> tuple[np.ndarray, ...]:
        """The stored (psf [B, 3, k, k], kept, illumination, valid [B, 3], chief [B, 2]) of one block."""
        sl = _where(block)
        return tuple(self._dataset(name, sl) for name in block_datasets(block.kind))


def _check_or_damaged(path: str, name: str, values: np.ndarray, low: float, high: float) -> None:
    try:
        _check_range(name, values, low, high)
    except _Damaged as exc:
        raise DamagedFile(f"{path} is damaged: {exc}; regenerate it with 'psf generate'") from None


class _Borrowed:
    """A handle used as a context manager without closing it."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self.handle

    def __exit__(self, *exc):
        return False
