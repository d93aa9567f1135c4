"""The HDF5 grid file: layout, creation, block writes and the checked reader.

Layout (schema 3; see docs/dataset.md; schemas 1 and 2 are still read, see _upgrade_params):

    /depths             [D] float64, object depths [m], ascending
    /wvln               [3] float64, wavelengths [µm], order R, G, B
    /grid/coords        [P, 2] float64, (x, y) in [-1, 1], P = N*N, flat index = row*N + col
    /grid/neighbors     [E, 2] int32, undirected pairs, E = 2N(N-1) + 2(N-1)^2
    /grid/psf           [D, P, 3, k, k] float32, each channel sums to 1
    /grid/border        [D, P, 3] float32, energy fraction on the border of the traced kernel_size window
    /grid/illumination  [D, P, 3] float32, valid rays / launched, over the same on axis (1 on axis, 0 dark)
    /grid/valid         [D, P, 3] uint8, 1 where enough rays arrived for a PSF (else the PSF channel is 0)
    /axis/fraction      [D, 3] float64, valid-ray fraction of the on-axis point at each depth
    /noise/index        [S] int64, grid points traced a second time
    /noise/psf          [D, S, 3, k, k], /noise/border [D, S, 3]
    /heldout/coords     [M, 2], /heldout/depth [M] [m], /heldout/at_grid_depth [M] bool
    /heldout/psf_a, psf_b    [M, 3, k, k], two independent traces at heldout_spp/2 each
    /heldout/border_a, border_b  [M, 3]; /heldout/illumination_a|b, valid_a|b [M, 3]; noise/... likewise
    /blocks/table       [B, 4] int64 (kind, depth index or -1, start, stop)
    /blocks/done        [B] uint8, 1 once the block's PSFs are written
    /blocks/seconds     [B] float64, tracing time of each block [s]

Crash safety: every dataset is allocated in full when the file is created (contiguous
layout, early allocation), so writing a block only overwrites raw bytes and then flips
its done byte, without touching HDF5 metadata. A process killed at any moment leaves a
readable file whose done marks are true only for blocks fully written.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .config import OLD_KERNEL_NAMES
from .shared import tempfiles
from .shared.errors import DamagedFile, InputError

FORMAT = "psf-cvae.grid"
# A PSF with more than this fraction of a channel's energy on the traced window's border is truncated
# (DeepLens drops the rays beyond it): generate warns, info and the eval report count them.
TRUNCATION_LIMIT = 0.01
SCHEMA_VERSION = 3
# The attribute saying a file's config ray_budget counts every depth's rays (files without it, from before, asked
# for one depth's rays: psf info and a resume read them so).
RAY_BUDGET_SCOPE = "all depths"
# Schema 1 files have no illumination: every point lit, illumination unmeasured (docs/dataset.md).
# Schemas 1 and 2 name the kernel sizes ks and ks_small in run_params and config (_upgrade_params).
READS = (1, 2, 3)
# The parameter names of schemas 1 and 2 -> this version's (3 renamed them, nothing else).
OLD_NAMES = OLD_KERNEL_NAMES
KINDS = ("grid", "noise", "heldout_a", "heldout_b")


@dataclass(frozen=True)
class Block:
    kind: str  # one of KINDS
    depth: int  # depth index for grid/noise blocks, -1 for held-out blocks
    start: int  # first point (index into the kind's point list)
    stop: int  # one past the last point

    def row(self) -> list[int]:
        return [KINDS.index(self.kind), self.depth, self.start, self.stop]

    @staticmethod
    def from_row(row) -> Block:
        return Block(KINDS[int(row[0])], int(row[1]), int(row[2]), int(row[3]))


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


def write_header(f: h5py.File, attrs: dict, arrays: dict) -> None:
    """The file's attributes and its fixed datasets (depths [m], wvln [um], coords, ...): written
    here alone, for a new file (create) and for a merged one (psf merge, copied or virtual)."""
    for key, value in attrs.items():
        f.attrs[key] = value
    for name, value in arrays.items():
        f.create_dataset(name, data=value)
    f["depths"].attrs["units"] = "m"
    f["wvln"].attrs["units"] = "um"


def create(path: Path, *, attrs: dict, arrays: dict, sizes: dict, blocks: list[Block]) -> None:
    """Write the file's skeleton to a temporary file, then rename it onto ``path``.

    arrays: fixed content known up front (coords, depths, ...).
    sizes: D, P, S, M, k: shapes of the PSF datasets to allocate.
    """
    D, P, S, M, k = (sizes[x] for x in ("D", "P", "S", "M", "k"))
    tempfiles.remove_stale(path)
    tmp = tempfiles.temp_path(path)
    try:
        with h5py.File(tmp, "w") as f:
            write_header(f, attrs, arrays)
            _early(f, "grid/psf", (D, P, 3, k, k), np.float32)
            _early(f, "grid/border", (D, P, 3), np.float32)
            _early(f, "noise/psf", (D, S, 3, k, k), np.float32)
            _early(f, "noise/border", (D, S, 3), np.float32)
            for kind, shape in (("grid", (D, P, 3)), ("noise", (D, S, 3))):
                _early(f, f"{kind}/illumination", shape, np.float32)
                _early(f, f"{kind}/valid", shape, np.uint8)
            for half in "ab":
                _early(f, f"heldout/psf_{half}", (M, 3, k, k), np.float32)
                _early(f, f"heldout/border_{half}", (M, 3), np.float32)
                _early(f, f"heldout/illumination_{half}", (M, 3), np.float32)
                _early(f, f"heldout/valid_{half}", (M, 3), np.uint8)
            f.create_dataset("blocks/table", data=np.array([b.row() for b in blocks], dtype=np.int64).reshape(-1, 4))
            _early(f, "blocks/done", (len(blocks),), np.uint8, zero_fill=True)
            _early(f, "blocks/seconds", (len(blocks),), np.float64, zero_fill=True)
        os.replace(tmp, path)
    except BaseException:
        tempfiles.discard(tmp)
        raise


def block_datasets(kind: str) -> tuple[str, ...]:
    """The datasets a block of ``kind`` writes: psf, border, illumination, valid."""
    if kind in ("grid", "noise"):
        return tuple(f"{kind}/{x}" for x in ("psf", "border", "illumination", "valid"))
    half = kind[-1]
    return tuple(f"heldout/{x}_{half}" for x in ("psf", "border", "illumination", "valid"))


def _where(block: Block):
    if block.kind in ("grid", "noise"):
        return (block.depth, slice(block.start, block.stop))
    return slice(block.start, block.stop)


def write_block(
    path: Path,
    index: int,
    block: Block,
    psf: np.ndarray,
    border: np.ndarray,
    seconds: float,
    illumination: np.ndarray,
    valid: np.ndarray,
) -> None:
    """Store one traced block: psf [B, 3, k, k], border, illumination, valid [B, 3]; then mark it done."""
    # No file lock: a reader (psf info, a user's h5py) must not make the run fail, and a
    # block write changes raw data only, never the metadata a reader depends on.
    with h5py.File(path, "r+", locking=False) as f:
        sl = _where(block)
        for name, value in zip(block_datasets(block.kind), (psf, border, illumination, valid)):
            f[name][sl] = value
        f["blocks/seconds"][index] = seconds
        f.flush()  # the data before the mark, so a mark never points at missing data
        f["blocks/done"][index] = 1


def read_block(f: h5py.File, block: Block) -> tuple[np.ndarray, ...]:
    """The stored (psf [B, 3, k, k], border, illumination, valid [B, 3]) of one block."""
    sl = _where(block)
    return tuple(f[name][sl] for name in block_datasets(block.kind))


def set_attrs(path: Path, **attrs) -> None:
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = value


@dataclass(frozen=True)
class GridInfo:
    """What a reader needs to know about a grid file, read and checked in one go."""

    path: str
    run_id: str
    grid_size: int
    kernel_size_small: int  # stored kernel side [px]
    depths: np.ndarray  # [D] metres
    spp: int
    heldout_spp: int
    n_heldout: int
    n_noise: int
    blocks_done: int
    blocks_total: int
    config: dict  # the GenerateConfig that wrote the file, in this version's key names
    attrs: dict  # the file's attributes; run_params and config as JSON in this version's key names
    shard: tuple[int, int] | None = None  # (K, N) for a shard file: it owns blocks i with i % N == K
    schema: int = SCHEMA_VERSION

    @property
    def has_illumination(self) -> bool:
        """Schema 2 and later: illumination and valid masks measured at generation."""
        return self.schema >= 2

    @property
    def complete(self) -> bool:
        return self.blocks_done == self.blocks_total


def open_info(path: str | Path) -> GridInfo:
    """Open and check a grid file: exists, is HDF5, has our format and schema version."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data file {path} does not exist; create it with 'psf generate --out {path}'")
    try:
        f = h5py.File(path, "r", locking=False)  # never blocks, nor is blocked by, a run writing it
    except OSError:
        if h5py.is_hdf5(path):  # ours or not, its structure is broken (e.g. by a write that failed)
            raise DamagedFile(f"{path} is an HDF5 file that cannot be opened (damaged)") from None
        raise InputError(f"{path} is not a readable HDF5 file; give a file written by 'psf generate'") from None
    with f:
        fmt = f.attrs.get("format")
        if fmt != FORMAT:
            raise InputError(
                f"{path} is not a psf-cvae grid file (format {fmt!r}); give a file written by 'psf generate'"
            )
        version = int(f.attrs.get("schema_version", -1))
        if version not in READS:
            raise InputError(
                f"{path} has schema version {version}, this psf-cvae reads {', '.join(map(str, READS))}; "
                "regenerate it with this version of 'psf generate'"
            )
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        if attrs.get("virtual"):  # a `psf merge --virtual` file reads zeros where a shard is gone
            missing = sorted(
                {vs.file_name for vs in f["grid/psf"].virtual_sources() if not (path.parent / vs.file_name).exists()}
            )
            if missing:
                raise InputError(
                    f"{path} maps shard files that are missing ({', '.join(missing)}); put them back beside it "
                    "or merge again without --virtual"
                )
        params = _checked_structure(f, attrs, path, version)  # this version's names from here on
        attrs["run_params"] = json.dumps(params, sort_keys=True)
        attrs["config"] = json.dumps(_upgrade_params(json.loads(attrs["config"]), version), sort_keys=True)
        done = f["blocks/done"][:]
        shard = None
        if "shard_count" in attrs:
            shard = (int(attrs["shard_index"]), int(attrs["shard_count"]))
            done = done[shard[0] :: shard[1]]  # the blocks this shard owns
        return GridInfo(
            path=str(path),
            run_id=attrs["run_id"],
            grid_size=int(params["grid_size"]),
            kernel_size_small=int(params["kernel_size_small"]),
            depths=f["depths"][:],
            spp=int(params["spp"]),
            heldout_spp=int(params["heldout_spp"]),
            n_heldout=int(f["heldout/coords"].shape[0]),
            n_noise=int(f["noise/index"].shape[0]),
            blocks_done=int(done.sum()),
            blocks_total=int(done.size),
            config=json.loads(attrs["config"]),
            attrs=attrs,
            shard=shard,
            schema=version,
        )


REQUIRED = (
    "depths",
    "wvln",
    "grid/coords",
    "grid/neighbors",
    "grid/psf",
    "grid/border",
    "noise/index",
    "noise/psf",
    "heldout/coords",
    "heldout/depth",
    "heldout/at_grid_depth",
    "heldout/psf_a",
    "heldout/psf_b",
    "blocks/table",
    "blocks/done",
    "blocks/seconds",
)


ILLUMINATION = (
    "axis/fraction",
    "grid/illumination",
    "grid/valid",
    "noise/illumination",
    "noise/valid",
    "heldout/illumination_a",
    "heldout/illumination_b",
    "heldout/valid_a",
    "heldout/valid_b",
)


def _upgrade_params(params: dict, version: int) -> dict:
    """A file's run_params or config (a JSON object) with this version's key names.

    The one place that knows the old names: every reader of a file goes through open_info,
    which applies this, so no other code meets ``ks`` or ``ks_small``.
    """
    if version >= 3:
        return params
    return {OLD_NAMES.get(key, key): value for key, value in params.items()}


def _checked_structure(f: h5py.File, attrs: dict, path: Path, version: int = SCHEMA_VERSION) -> dict:
    """The file's run parameters, after checking every dataset and index a reader relies on.

    One place, so that a damaged or hand-edited file is one clear line, not a traceback
    deep inside training or evaluation.
    """

    def damaged(what: str) -> DamagedFile:
        return DamagedFile(f"{path} is damaged: {what}; regenerate it with 'psf generate' (or restore the file)")

    missing = [name for name in REQUIRED + (ILLUMINATION if version >= 2 else ()) if name not in f]
    if missing:
        raise damaged(f"dataset {missing[0]} is missing")
    for key in ("run_params", "config", "run_id", "lens_json", "lens_sha256", "versions"):
        if key not in attrs:
            raise damaged(f"attribute {key} is missing")
    try:
        params = _upgrade_params(json.loads(attrs["run_params"]), version)
        _upgrade_params(json.loads(attrs["config"]), version)
        n, k = int(params["grid_size"]), int(params["kernel_size_small"])
        int(params["spp"]), int(params["heldout_spp"])
    except (ValueError, TypeError, KeyError, AttributeError):
        raise damaged("its run_params or config attribute is not the JSON psf generate writes") from None
    depths = f["depths"][:]
    P = n * n
    D = len(depths)
    if D == 0 or not (np.isfinite(depths).all() and (depths > 0).all()):
        raise damaged("depths must be positive metres")
    shapes = {"grid/coords": (P, 2), "grid/psf": (D, P, 3, k, k), "grid/border": (D, P, 3)}
    for name, shape in shapes.items():
        if f[name].shape != shape:
            raise damaged(f"{name} has shape {f[name].shape}, expected {shape}")
    coords = f["grid/coords"][:]
    if not np.isfinite(coords).all():
        raise damaged("grid/coords holds NaN or inf")
    for name in ("noise/index", "grid/neighbors"):
        idx = f[name][:]
        if idx.size and (idx.min() < 0 or idx.max() >= P):
            raise damaged(f"{name} holds {int(idx.min() if idx.min() < 0 else idx.max())}, outside the {P} grid points")
    S = f["noise/index"].shape[0]
    if f["noise/psf"].shape != (D, S, 3, k, k):
        raise damaged(f"noise/psf has shape {f['noise/psf'].shape}, expected {(D, S, 3, k, k)}")
    M = f["heldout/coords"].shape[0]
    for name, shape in (("heldout/psf_a", (M, 3, k, k)), ("heldout/psf_b", (M, 3, k, k)), ("heldout/depth", (M,))):
        if f[name].shape != shape:
            raise damaged(f"{name} has shape {f[name].shape}, expected {shape}")
    if version >= 2:
        for name, shape in (
            ("axis/fraction", (D, 3)),
            ("grid/illumination", (D, P, 3)),
            ("grid/valid", (D, P, 3)),
            ("heldout/illumination_a", (M, 3)),
            ("heldout/illumination_b", (M, 3)),
            ("heldout/valid_a", (M, 3)),
            ("heldout/valid_b", (M, 3)),
        ):
            if f[name].shape != shape:
                raise damaged(f"{name} has shape {f[name].shape}, expected {shape}")
    if f["blocks/done"].shape[0] != f["blocks/table"].shape[0]:
        raise damaged("blocks/done and blocks/table differ in length")
    return params


def require_complete(info: GridInfo) -> None:
    """A finished, whole run: what training and evaluation need."""
    if info.shard is not None:
        raise InputError(
            f"{info.path} is shard {info.shard[0]}/{info.shard[1]} of a run; merge all shards first "
            "with 'psf merge SHARD... --out grid.h5'"
        )
    if not info.complete:
        raise InputError(
            f"{info.path} is unfinished ({info.blocks_done}/{info.blocks_total} blocks traced); "
            "run the same 'psf generate' command again to resume it"
        )


def read_lit(src) -> dict:
    """The grid's illumination [D, P, 3] float32 and valid [D, P, 3] bool. Schema 1 files (no
    illumination; their generation refused dark points): every channel valid, illumination 1.
    src: a path, or a file the caller holds open (HDF5 refuses a second handle on a file with
    other locking flags in one process)."""
    with _opened(src) as f:
        if "grid/valid" in f:
            return {"illumination": f["grid/illumination"][:], "valid": f["grid/valid"][:].astype(bool)}
        shape = f["grid/psf"].shape[:3]
    return {"illumination": np.ones(shape, np.float32), "valid": np.ones(shape, bool)}


def traced_grid(src) -> np.ndarray:
    """[D, P] bool: grid PSFs whose block is written (all of them in a complete file). src: as read_lit's."""
    with _opened(src) as f:
        done, table = f["blocks/done"][:].astype(bool), f["blocks/table"][:]
        traced = np.zeros(f["grid/border"].shape[:2], dtype=bool)
    for _, d, lo, hi in table[done & (table[:, 0] == KINDS.index("grid"))]:
        traced[d, lo:hi] = True
    return traced


@contextlib.contextmanager
def _opened(src):
    """``src`` itself when it is an open file (left open), else the file at path ``src`` opened for reading."""
    if isinstance(src, h5py.File):
        yield src
    else:
        with h5py.File(src, "r") as f:
            yield f
