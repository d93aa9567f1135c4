"""``psfgen.generate(config)``: ray-trace the PSF grid, held-out set and noise floor into HDF5.

The work is cut into blocks (one plane, a depth at a focus, x a range of points; held-out
blocks one focus each); each block is seeded from (seed, block, its focus) alone, traced as
DeepLens ``psf_rgb`` does (illumination.trace_counted),
area-downsampled and written with a completion mark. Running the same command again skips
finished blocks, so a killed run resumes and ends identical, PSF for PSF, to an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from psfgen import gridfile
from psfgen.analysis import litfield, spacing
from psfgen.config import GenerateConfig, resolve
from psfgen.gridfile import Block, GridFile
from psfgen.plan import budget, depthplan, focusplan, windowplan
from psfgen.plan.grid import (
    MIN_TEST_PER_BAND,
    band_test_counts,
    grid_coords,
    heldout_focus,
    heldout_points,
    neighbour_pairs,
    noise_indices,
)
from psfgen.shared import interrupts, locking, tempfiles
from psfgen.shared.configio import to_json
from psfgen.shared.devices import resolve_device
from psfgen.shared.errors import InputError, os_reason
from psfgen.shared.provenance import now, versions
from psfgen.trace import illumination
from psfgen.trace.lens import LensFile, build_lens, deeplens_notes, read_lens_file
from psfgen.trace.resample import METHOD, downsample

log = logging.getLogger(__name__)


def plan_blocks(
    cfg: GenerateConfig, n_planes: int, n_heldout: int, heldout_focus: np.ndarray | None = None
) -> list[Block]:
    """All blocks of a run, in tracing order: grid and noise floor plane by plane (p = f*D + d), held-out halves.

    heldout_focus: [n_heldout] m, grouped by focus (equal values together): a held-out block never spans two, so
    the tracer refocuses once per block. None: one focus."""
    P = cfg.grid_size**2

    def ranges(lo: int, hi: int, spp: int):
        step = max(1, cfg.block_rays // spp)
        return [(a, min(a + step, hi)) for a in range(lo, hi, step)]

    groups = [(0, n_heldout)]
    if heldout_focus is not None and n_heldout:
        pair = heldout_focus[1:] + heldout_focus[:-1]
        same = (heldout_focus[1:] == heldout_focus[:-1]) | np.isnan(pair)  # nan: F = 1, one group
        cuts = np.flatnonzero(~same) + 1
        edges = [0, *cuts.tolist(), n_heldout]
        groups = list(zip(edges[:-1], edges[1:]))
    blocks = [Block("grid", p, a, b) for p in range(n_planes) for a, b in ranges(0, P, cfg.spp)]
    blocks += [Block("noise", p, a, b) for p in range(n_planes) for a, b in ranges(0, cfg.noise_points, cfg.spp)]
    for kind in ("heldout_a", "heldout_b"):
        blocks += [Block(kind, -1, a, b) for lo, hi in groups for a, b in ranges(lo, hi, cfg.heldout_half_spp())]
    return blocks


def _focus_entropy(focus: float | None) -> list[int]:
    """A focus distance [m] as seed entropy: its float64 bits; nothing without one (nan or None)."""
    if focus is None or np.isnan(focus):
        return []
    return [int(np.float64(focus).view(np.uint64))]


def block_seed(seed: int, block: Block, focus: float | None = None, n_depths: int | None = None) -> int:
    """The torch seed of one block: a function of (seed, kind, depth index, start, focus) only. A grid or noise
    block of plane p = f*D + d (n_depths = D; None: p is the depth index) is seeded by its depth index d and its
    focus value [m], never by f: a run over several focus settings traces each one's PSFs as a run at that focus
    alone does, each focus independently of the others."""
    d = block.plane % n_depths if block.plane >= 0 and n_depths else block.plane  # held-out: -1
    entropy = [seed, gridfile.KINDS.index(block.kind), d + 1, block.start, *_focus_entropy(focus)]
    ss = np.random.SeedSequence(entropy)
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def trace_points(lens, xy: np.ndarray, depth_m: np.ndarray, spp: int, kernel_size: int) -> torch.Tensor:
    """Ray-trace RGB PSFs with DeepLens on a kernel_size x kernel_size window (DeepLens's ks).

    xy: [B, 2] normalised field coordinates; depth_m: [B] object depths [m].
    Returns [B, 3, kernel_size, kernel_size] on the lens's device, each channel summing to 1
    (DeepLens normalises over the rays that land inside the window).
    """
    points = np.concatenate([xy, -1000.0 * depth_m[:, None]], axis=1)  # DeepLens z [mm], negative
    points = torch.as_tensor(points, dtype=torch.float32, device=lens.device)
    with torch.no_grad(), deeplens_notes(log, logging.WARNING):
        return lens.psf_rgb(points=points, ks=kernel_size, spp=spp)


@dataclass(frozen=True)
class Points:
    """Where a run's points lie: depths [D] m; focus [F] m ([nan]: none); grid coords [P, 2]; the noise floor's grid
    indices [S]; held-out coords [M, 2], depths [M] m and focus [M] m (grouped by focus)."""

    depths: np.ndarray
    focus: np.ndarray
    coords: np.ndarray
    noise_idx: np.ndarray
    ho_coords: np.ndarray
    ho_depth: np.ndarray
    ho_focus: np.ndarray

    def of(self, block: Block) -> tuple[np.ndarray, np.ndarray, float]:
        """(xy [B, 2], depth [B] in metres, focus [m], nan for none) of the points a block traces."""
        sl = slice(block.start, block.stop)
        if block.kind == "grid":
            xy = self.coords[sl]
        elif block.kind == "noise":
            xy = self.coords[self.noise_idx[sl]]
        else:
            return self.ho_coords[sl], self.ho_depth[sl], self.focus_of(block)
        return xy, np.full(len(xy), self.depths[block.plane % len(self.depths)]), self.focus_of(block)

    def focus_of(self, block: Block) -> float:
        """The focus [m] a block traces at (nan: the lens file's)."""
        if block.kind in ("grid", "noise"):
            return float(self.focus[block.plane // len(self.depths)])
        return float(self.ho_focus[block.start])

    def seed(self, seed: int, block: Block) -> int:
        """block_seed of a block of this run."""
        return block_seed(seed, block, self.focus_of(block), len(self.depths))


@dataclass(frozen=True)
class Run:
    """One run of psf generate once its config is resolved: what each step of tracing needs."""

    cfg: GenerateConfig  # resolved (psfgen.config.resolve)
    out: Path  # the file written (a shard's own name under --shard)
    run_id: str  # hash of the parameters, lens and tracer: equal ids, equal files
    lens_file: LensFile
    shard: tuple[int, int] | None  # (K, N)
    device: torch.device
    plan: depthplan.DepthPlan | None  # num_depths auto's pilot, recorded in a new file
    window: windowplan.WindowPlan | None  # kernel_size auto's pilot, recorded in a new file
    focus_plan: focusplan.FocusPlan | None  # num_focus auto's pilot, recorded in a new file
    started: float  # time.time() at the start


def resolve_shard(spec: str | None) -> tuple[int, int] | None:
    """(K, N) from "K/N", or from torchrun / a SLURM job array for "auto"; None: no sharding."""
    if spec is None:
        return None
    if spec != "auto":
        k, n = map(int, spec.split("/"))
        return k, n
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        k = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return k, int(env["SLURM_ARRAY_TASK_COUNT"])
    raise InputError(
        "--shard auto needs torchrun (RANK, WORLD_SIZE) or a SLURM job array "
        "(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT); otherwise give --shard K/N"
    )


def shard_path(out: Path, k: int, n: int) -> Path:
    """grid.h5 -> grid.shard0001-of-0004.h5"""
    return out.with_name(f"{out.stem}.shard{k:04d}-of-{n:04d}{out.suffix}")


BYTES_PER_RAY = (
    400  # traced ray state on the device: 1.9 GiB peak at 4e6 rays (README), less the process's own ~0.5 GiB
)
BYTES_PER_GRID_POINT = 200  # coordinates, neighbour table and their intermediates in RAM


def memory_needed(cfg: GenerateConfig) -> tuple[int, int]:
    """(bytes of one traced block on the tracing device, bytes of the grid's tables in RAM)."""
    # As plan_blocks cuts them: block_rays // spp points per block (at least one), for both spps.
    block = max(
        max(1, cfg.block_rays // spp) * (spp * BYTES_PER_RAY + 3 * cfg.kernel_size**2 * 4 * 4)  # kernels: float32
        for spp in (cfg.spp, cfg.heldout_half_spp())
    )
    return block, cfg.grid_size**2 * BYTES_PER_GRID_POINT


def check_memory(cfg: GenerateConfig, device: torch.device) -> None:
    """Refuse, before anything is traced or written, a run whose blocks or tables cannot fit."""
    block, tables = memory_needed(cfg)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else ram
    gib = 2.0**30
    if tables > ram:
        raise InputError(
            f"grid_size {cfg.grid_size} needs about {tables / gib:.1f} GiB of memory for its tables, "
            f"this machine has {ram / gib:.1f} GiB; choose a smaller --grid-size"
        )
    if block > memory:
        raise InputError(
            f"one block of spp {cfg.spp} (held-out {cfg.heldout_half_spp()} per half) with a {cfg.kernel_size}-px "
            f"kernel needs about {block / gib:.1f} GiB on {device}, which has {memory / gib:.1f} GiB; lower --spp, "
            "--heldout-spp, --kernel-size or --block-rays"
        )


def _check_disk(out: Path, sizes: dict, share: float) -> None:
    """Refuse a new file whose PSFs would not fit on the disk (they are written block by block)."""
    D, P, S, M, k = (sizes[x] for x in ("planes", "P", "S", "M", "k"))  # D: planes
    need = share * (4 * (3 * k * k + 6) + 3) * (D * P + D * S + 2 * M)  # psf, kept, illumination, valid
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise InputError(
            f"{out} will need about {need / 2**30:.2f} GiB and {out.parent} has {free / 2**30:.2f} GiB "
            "free; free space or choose another --out"
        )


def _make_parent(out: Path) -> None:
    if out.is_dir():
        raise InputError(f"output {out} is a directory; give a file path for --out")
    tempfiles.make_parent(out, "--out")


def _check_output(cfg: GenerateConfig, out: Path, run_id: str) -> bool:
    """Decide what to do with ``out`` (under its lock). Returns True to resume an existing file."""
    info = _existing(cfg, out)
    if info is None:
        return False
    if info.run_id != run_id:
        raise InputError(
            f"{out} holds another run (different parameters or lens); choose another --out "
            "or pass --overwrite to replace it"
        )
    return True


def _existing(cfg: GenerateConfig, out: Path) -> GridFile | None:
    """The grid file a run would resume (None: nothing there, or --overwrite); a file that cannot
    be resumed (damaged, not a grid file, another schema version) raises InputError."""
    if not out.exists() or cfg.overwrite:
        return None
    try:
        return GridFile.open(out)
    except InputError as exc:
        raise InputError(
            f"{out} exists and is not a psf-cvae grid file this psf generate can resume ({exc}); choose another "
            "--out or pass --overwrite to replace it"
        ) from None


def generate(cfg: GenerateConfig) -> Path:
    """Trace everything ``cfg`` asks for into ``cfg.out`` and return its path."""
    t_start = time.time()
    lens_file = read_lens_file(cfg.lens, cfg.sensor_size_mm, cfg.sensor_res)
    shard = resolve_shard(cfg.shard)
    out = Path(cfg.out) if shard is None else shard_path(Path(cfg.out), *shard)
    local_rank = int(os.environ["LOCAL_RANK"]) if shard is not None and "LOCAL_RANK" in os.environ else None
    device = resolve_device(cfg.device, local_rank)
    plan, num_depths, window, kernel_size, focus_plan, num_focus = None, None, None, None, None, None
    if cfg.auto_window() or cfg.auto_depths() or cfg.auto_focus():  # GenerateConfig.validate refuses a shard with any
        _make_parent(out)  # what the file check would refuse, refused before the pilots' minute
        existing = _existing(cfg, out)
        pilot_lens = _PilotLens(cfg, lens_file, device)
        if cfg.auto_window():  # first: the depth and focus pilots trace in the chosen window
            window, kernel_size = _choose_window(cfg, existing, pilot_lens)
        if cfg.auto_depths():  # at the focus range's ends alone: before the focus settings are chosen
            plan, num_depths = _choose_depths(cfg, existing, pilot_lens, kernel_size or cfg.kernel_size)
        if cfg.auto_focus():  # at the depths the run traces
            focus_plan, num_focus = _choose_focus(cfg, existing, pilot_lens, kernel_size or cfg.kernel_size, num_depths)
    spent = cfg.budget(num_focus)  # before auto resolves the grid: its default budget is said too
    # Every auto and default value decided: the file records this config.
    cfg = resolve(cfg, num_depths, kernel_size, num_focus)
    if spent is not None:
        log.info("%s", budget.explain(spent, cfg.grid_size, cfg.spp, cfg.depth_count(), cfg.focus_count()))
    identity = {"params": cfg.run_params(), "lens_sha256": lens_file.sha256, "tracer": illumination.TRACER_VERSION}
    run_id = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    check_memory(cfg, device)
    _make_parent(out)
    with locking.exclusive(out, "psf generate"):  # from the check of the file to the last block
        return _trace_all(Run(cfg, out, run_id, lens_file, shard, device, plan, window, focus_plan, t_start))


def build_lenses(lens_file: LensFile, device: torch.device, seed: int, focus) -> dict:
    """{focus [m] or None: the lens refocused there} for each of ``focus`` (m, inf allowed; None or nan: the lens
    file's sensor), built once each, torch seeded with ``seed`` before each build (refocusing samples rays), so a
    lens is the same whatever else is built with it."""
    lenses = {}
    for f in focus:
        key = None if f is None else _key(f)
        if key not in lenses:
            torch.manual_seed(seed)
            lenses[key] = build_lens(lens_file, device, key)
    return lenses


def _pilot_focus(cfg: GenerateConfig) -> list[float | None]:
    """The focus settings the window and depth pilots trace at: the nearest and the farthest [m] (None: the lens
    file's sensor); with num_focus auto, the range's ends, which every choice of it has."""
    focus = cfg.focus_values(budget.FOCUS_CHOICES[0] if cfg.auto_focus() else None)
    return [None] if focus is None else sorted({float(focus[0]), float(focus[-1])})


class _PilotLens:
    """The lenses the pilots trace, each refocused as the run refocuses (build_lenses: at the range's ends for the
    window and depth pilots, across it for the focus pilot); each built once, when a pilot first needs it."""

    def __init__(self, cfg: GenerateConfig, lens_file: LensFile, device: torch.device):
        self.cfg, self.lens_file, self.device, self.lenses = cfg, lens_file, device, {}

    def get(self, focus: float | None):
        if focus not in self.lenses:
            self.lenses |= build_lenses(self.lens_file, self.device, self.cfg.seed, [focus])
        return self.lenses[focus]


def _choose_window(cfg: GenerateConfig, existing: GridFile | None, pilot_lens: _PilotLens):
    """kernel_size auto: (the pilot's WindowPlan or None, the side [px]). A resumed run keeps the side its file
    records (a second pilot could choose another, and the file would no longer be this run's). Over several focus
    settings the pilot runs at the nearest and the farthest, and the larger side wins."""
    if existing is not None and existing.window_plan is not None:
        log.info("kernel_size auto: %d px, as chosen when %s was started", existing.kernel_size, existing.path)
        return None, existing.kernel_size
    plans = []
    for focus in _pilot_focus(cfg):
        depths = windowplan.pilot_depths(*cfg.depth_range(), focus)
        plans.append(windowplan.pilot(pilot_lens.get(focus), depths, cfg.kernel_size_small, cfg.seed, focus))
        log.info("%s", plans[-1].describe())
    window = max(plans, key=lambda w: w.kernel_size)  # the first of equals: the nearest focus
    return window, window.kernel_size


def _choose_depths(cfg: GenerateConfig, existing: GridFile | None, pilot_lens: _PilotLens, kernel_size: int):
    """num_depths auto: (the pilot's DepthPlan or None, the number of depths). A resumed run keeps the number its
    file records (a second pilot could choose another, and the file would no longer be this run's). Over several
    focus settings the pilot runs at the nearest and the farthest, and the larger count wins.
    kernel_size: the traced window's side [px]."""
    if existing is not None and existing.depth_plan is not None:
        n = existing.depth_plan["num_depths"]
        log.info("num_depths auto: %d depths, as chosen when %s was started", n, existing.path)
        return None, n
    plans = []
    for focus in _pilot_focus(cfg):
        lens = pilot_lens.get(focus)
        plans.append(
            depthplan.pilot(lens, cfg.depth_min, cfg.depth_max, kernel_size, cfg.kernel_size_small, cfg.seed, focus)
        )
        log.info("%s", plans[-1].describe())
    plan = max(plans, key=lambda p: p.num_depths)  # the first of equals: the nearest focus
    # With num_focus auto too, at its fewest focus settings: the focus pilot then fits its count to these depths.
    focus = cfg.least_focus_count()
    n = _afforded(
        plan.num_depths,
        budget.DEPTH_CHOICES,
        "num_depths",
        "depths",
        lambda n: budget.affords(cfg.budget(focus), cfg.grid_size, cfg.spp, n, focus),
    )
    return (plan if n == plan.num_depths else dataclasses.replace(plan, num_depths=n)), n


def _choose_focus(cfg: GenerateConfig, existing: GridFile | None, pilot_lens: _PilotLens, kernel_size: int,
                  num_depths: int | None):  # fmt: skip
    """num_focus auto: (the pilot's FocusPlan or None, the number of focus settings). A resumed run keeps the number
    its file records, as _choose_depths does. kernel_size: the traced window's side [px]; num_depths: num_depths
    auto's choice (None: the config's depths)."""
    if existing is not None and existing.focus_plan is not None:
        n = existing.focus_plan["num_focus"]
        log.info("num_focus auto: %d focus settings, as chosen when %s was started", n, existing.path)
        return None, n
    depths = cfg.depth_values(num_depths)
    plan = focusplan.pilot(pilot_lens.get, cfg.focus_min, cfg.focus_max, depths, kernel_size, cfg.kernel_size_small,
                           cfg.seed)  # fmt: skip
    log.info("%s", plan.describe())
    n = _afforded(
        plan.num_focus,
        budget.FOCUS_CHOICES,
        "num_focus",
        "focus settings",
        lambda n: budget.affords(cfg.budget(n), cfg.grid_size, cfg.spp, len(depths), n),
    )
    return (plan if n == plan.num_focus else dataclasses.replace(plan, num_focus=n)), n


def _afforded(n: int, choices: tuple[int, ...], key: str, what: str, affords) -> int:
    """The most of ``choices`` up to a pilot's choice n that the ray budget affords (affords(count): bool), said
    when fewer than n. validate() checked the fewest fit."""
    chosen = n
    while n > choices[0] and not affords(n):
        n = choices[choices.index(n) - 1]
    if n != chosen:
        log.warning("%s auto: the ray budget affords %d %s, not the %d the pilot chose", key, n, what, chosen)
    return n


def _trace_all(run: Run) -> Path:
    """generate() once ``run.out`` is locked: check or create the file, trace what is missing."""
    cfg, out, shard, device = run.cfg, run.out, run.shard, run.device
    resume = _check_output(cfg, out, run.run_id)

    depths = cfg.depth_values()
    focus = cfg.focus_values()
    focus = np.array([np.nan]) if focus is None else focus  # [F] m; nan: the lens file's sensor
    N = cfg.grid_size
    coords = grid_coords(N)
    noise_idx = noise_indices(N, cfg.noise_points, cfg.seed)
    ho_coords, ho_depth, ho_at, ho_part = heldout_points(N, depths, cfg.heldout, cfg.seed)
    ho_focus, ho_at_focus = heldout_focus(ho_part, focus, cfg.seed)
    # Grouped by focus, each group in its band and radius order: a held-out block traces one focus.
    order = np.argsort(ho_focus, kind="stable") if len(focus) > 1 else np.arange(cfg.heldout)
    ho_coords, ho_depth, ho_at, ho_part = ho_coords.reshape(-1, 2)[order], ho_depth[order], ho_at[order], ho_part[order]
    ho_focus, ho_at_focus = ho_focus[order], ho_at_focus[order]
    points = Points(depths, focus, coords, noise_idx, ho_coords, ho_depth, ho_focus)
    blocks = plan_blocks(cfg, len(focus) * len(depths), cfg.heldout, ho_focus)

    # Build the lenses (each grid focus, each held-out one between them) before any file is written, so a bad lens
    # or focus leaves nothing behind.
    lenses = build_lenses(run.lens_file, device, cfg.seed, [*focus, *np.unique(ho_focus)])
    # A shard owns every N-th block: round-robin keeps the shards' work about equal.
    mine = np.array([shard is None or i % shard[1] == shard[0] for i in range(len(blocks))])

    if resume:
        existing = GridFile.open(out)
        axis, done = existing.axis_fraction, existing.done  # [F*D, 3]: traced when the file was created
        if done[mine].all() and existing.finished_at is not None:
            log.info("%s is already complete; nothing to trace", out)
            return out
        if existing.devices != (str(device),):
            log.warning(
                "resuming a run traced on %s on %s: PSFs stay statistically equal, not bitwise",
                ", ".join(existing.devices),
                device,
            )
        log.info("resuming %s: %d/%d blocks already traced", out, done[mine].sum(), mine.sum())
    else:
        # before the file exists: a lens that lights nothing leaves none
        axis = np.concatenate([_trace_axis(lenses[_key(f)], depths, cfg, f) for f in focus])  # [F*D, 3]
        _warn_few_test_points(cfg.heldout)
        lens = lenses[_key(focus[0])]
        arrays = {
            "depths": depths,
            "focus": focus,
            "wvln": np.asarray(lens.wvln_rgb, dtype=np.float64),
            "grid/coords": coords,
            "grid/neighbors": neighbour_pairs(N),
            "noise/index": noise_idx,
            "heldout/coords": points.ho_coords,
            "heldout/depth": ho_depth,
            "heldout/at_grid_depth": ho_at,
            "heldout/focus": ho_focus,
            "heldout/at_grid_focus": ho_at_focus,
            "heldout/part": ho_part,
            "axis/fraction": axis,
            "lens/file": np.frombuffer(run.lens_file.raw, dtype=np.uint8),
        }
        _create(run, _header(run, lens), arrays, blocks)
        done = np.zeros(len(blocks), dtype=bool)
        log.info("tracing %d blocks into %s on %s", mine.sum(), out, device)

    todo = [i for i in range(len(blocks)) if mine[i] and not done[i]]
    _trace_blocks(run, lenses, blocks, todo, points, axis, resume)

    written = GridFile.open(out)
    gridfile.finish(
        out, finished_at=now(), wall_time_s=time.time() - run.started, trace_seconds=float(written.seconds.sum())
    )
    _warn_truncation(written)
    if shard is None:
        # light reaching the sensor, wherever in the window
        litfield.report_dark(written.lights, [written.plane_label(p) for p in range(written.n_planes)], out)
        log.info("sampling: %s", spacing.check_file(written).describe())
    log.info("wrote %s", out)
    return out


def _warn_few_test_points(m: int) -> None:
    """psf eval's error per radius band stands on each band's test points: say so when a band has few."""
    test = band_test_counts(m)
    if m and test.min() < MIN_TEST_PER_BAND:
        log.warning(
            "%d held-out points leave %s test points in the 4 radius bands (fewer than %d): psf eval's per-band "
            "errors stand on few points; --heldout 40 or more gives each band at least %d",
            m, "/".join(map(str, test)), MIN_TEST_PER_BAND, MIN_TEST_PER_BAND,
        )  # fmt: skip


def _header(run: Run, lens) -> dict:
    """The new file's attributes: versions, the lens (path, format, normalised JSON, hash, sensor), config and
    provenance."""
    cfg, lens_file = run.cfg, run.lens_file
    attrs = {
        "versions": json.dumps(versions()),
        "lens_path": lens_file.path,
        "lens_json": lens_file.lens_json,
        "lens_sha256": lens_file.sha256,
        "lens_format": lens_file.format,
        "config": to_json(cfg),
        "run_params": json.dumps(cfg.run_params(), sort_keys=True),
        "run_id": run.run_id,
        "seed": cfg.seed,
        "device": str(run.device),
        "downsample_method": METHOD,
        "foclen_mm": float(lens.foclen),
        "sensor_size_mm": json.dumps([float(v) for v in lens.sensor_size]),  # the resolved sensor, as traced
        "sensor_res": json.dumps([int(v) for v in lens.sensor_res]),
        "sensor_from": json.dumps(lens_file.sensor_from),
        "started_at": now(),
        "valid_min_rays": illumination.min_rays(cfg.spp),
        "valid_min_rays_heldout": illumination.min_rays(cfg.heldout_half_spp()),
    }
    if run.shard is not None:
        attrs.update(shard_index=run.shard[0], shard_count=run.shard[1])
    if run.plan is not None:  # num_depths auto: what the pilot measured, and the count a resume keeps
        attrs["depth_plan"] = run.plan.to_json()
    if run.window is not None:  # kernel_size auto: what the pilot measured, and the side a resume keeps
        attrs["window_plan"] = run.window.to_json()
    if run.focus_plan is not None:  # num_focus auto: what the pilot measured, and the count a resume keeps
        attrs["focus_plan"] = run.focus_plan.to_json()
    return attrs


def _create(run: Run, attrs: dict, arrays: dict, blocks: list) -> None:
    """Create the file with every dataset at full size (after checking the disk has room for it)."""
    cfg = run.cfg
    planes = len(arrays["focus"]) * len(arrays["depths"])
    sizes = dict(planes=planes, P=cfg.grid_size**2, S=cfg.noise_points, M=cfg.heldout, k=cfg.kernel_size_small)
    _check_disk(run.out, sizes, 1.0 if run.shard is None else 1.0 / run.shard[1])
    try:
        # A shard's file reserves no space: it fills only the blocks it traces, the rest stays a hole.
        gridfile.create(run.out, attrs=attrs, arrays=arrays, sizes=sizes, blocks=blocks, reserve=run.shard is None)
    except OSError as exc:
        raise InputError(f"cannot write {run.out}: {os_reason(exc)}; choose a writable --out") from None


def _key(focus: float) -> float | None:
    """The key of build_lenses' dict for a focus [m]: None for nan (the lens file's sensor)."""
    return None if np.isnan(focus) else float(focus)


def _trace_blocks(run: Run, lenses: dict, blocks: list[Block], todo: list[int], points: Points, axis: np.ndarray,
                  resume: bool) -> None:  # fmt: skip
    """Trace the blocks ``todo`` (indices into ``blocks``) into the file in order, one seed each, behind a progress
    bar, each on the lens of its focus (lenses: build_lenses'). axis [F*D, 3]: the on-axis ray fraction per plane."""
    cfg = run.cfg
    quiet = not log.isEnabledFor(logging.INFO)
    total = sum(blocks[i].stop - blocks[i].start for i in todo)
    traced = 0
    bar = tqdm(total=total, unit="PSF", desc="tracing", disable=True if quiet else None, dynamic_ncols=True)
    with interrupts.recorded() as seen, bar:
        for i in todo:
            interrupts.raise_if_seen(seen)  # a Ctrl-C swallowed during the last block (psfgen/shared/interrupts.py)
            block = blocks[i]
            torch.manual_seed(points.seed(cfg.seed, block))
            # The bar counts whole PSFs and moves after each colour, as DeepLens traces a block per call:
            # after colour c of 3 it stands at floor(n (c + 1) / 3) of the block's n PSFs, never past them
            # (fractions of a PSF summed in floating point overshoot the total: a negative ETA, a TqdmWarning).
            n, colours = block.stop - block.start, iter(range(1, 4))

            def tick(n=n, colours=colours):
                c = next(colours)
                bar.update(n * c // 3 - n * (c - 1) // 3)

            try:
                _trace_block(run, lenses[_key(points.focus_of(block))], i, block, points, axis, tick)
            except InputError:
                if not resume and traced == 0:  # a file this run created holds nothing yet: leave no trace of it
                    tempfiles.discard(run.out)
                raise
            traced += 1
            log.debug("block %d/%d done (%s, plane %d, points %d:%d)", i + 1, len(blocks), block.kind, block.plane,
                      block.start, block.stop)  # fmt: skip


def _trace_block(run: Run, lens, index: int, block: Block, points: Points, axis: np.ndarray, tick=None) -> None:
    """Trace block ``index`` on ``lens`` (refocused to the block's focus), measure its illumination (axis [F*D, 3]:
    the on-axis ray fraction per plane), downsample it and write it with its done mark."""
    cfg = run.cfg
    t0 = time.perf_counter()
    xy, depth_m, focus = points.of(block)  # [B, 2], [B] m, m
    spp = cfg.spp if block.kind in ("grid", "noise") else cfg.heldout_half_spp()
    at_focus = "" if np.isnan(focus) else f", focus {gridfile.focus_text(focus)}"
    where = f"{block.kind} points {block.start}-{block.stop - 1} at {_depths_text(depth_m)}{at_focus}"
    try:
        psf, rays, window, chief = illumination.trace_with_chief(
            lens, xy, depth_m, spp, cfg.kernel_size, tick
        )  # [B, 3, kernel_size, kernel_size], [B, 3] x 2, [B, 2] mm
    except (RuntimeError, ValueError, AssertionError, MemoryError) as exc:  # DeepLens's and torch's
        raise InputError(
            f"tracing {where} failed: {str(exc).splitlines()[0][:200] or type(exc).__name__}; "
            "finished blocks are kept: fix the cause and run the same command again"
        ) from None
    at_axis = axis_at(points, axis, depth_m, focus)  # [B, 3]
    rays, window = rays.cpu().numpy(), window.cpu().numpy()  # [B, 3] valid rays, of them inside the window
    illum, valid = illumination.relative(rays, window, spp, at_axis)
    kept = illumination.kept(rays, window)  # [B, 3]
    # A channel with too few rays is stored as dark (zeros, valid 0), never as a PSF of noise.
    small = downsample(psf, cfg.kernel_size_small).cpu().numpy() * valid[..., None, None]  # [B, 3, k, k]
    if not np.isfinite(small).all():
        raise InputError(f"tracing {where} gave non-finite PSFs; check the lens file and --depths")
    seconds = time.perf_counter() - t0
    try:
        gridfile.write_block(
            run.out, index, block, small, kept, seconds, illum, valid.astype(np.uint8), chief.cpu().numpy()
        )
    except OSError as exc:
        raise InputError(
            f"cannot write {run.out} ({os_reason(exc)}, e.g. a full disk); the blocks "
            "finished before are kept: free space and run the same command again"
        ) from None


def axis_at(points: Points, axis: np.ndarray, depth_m: np.ndarray, focus: float) -> np.ndarray:
    """The on-axis fraction [B, 3] at depths depth_m [B] m and one focus [m] (nan: the file's only one), from the
    planes' axis [F*D, 3]: linear in 1/depth at each grid focus (illumination.axis_at), then linear in 1/focus
    between the two grid focus settings around it (held-out points between them)."""
    D, F = len(points.depths), len(points.focus)
    per = [illumination.axis_at(points.depths, axis[f * D : (f + 1) * D], depth_m) for f in range(F)]  # F x [B, 3]
    if F == 1:
        return per[0]
    inv = 1.0 / points.focus  # descending; 1/inf = 0
    q = 1.0 / focus
    j = int(np.clip(np.searchsorted(-inv, -q), 1, F - 1))  # inv[j - 1] >= q >= inv[j]
    w = (q - inv[j]) / (inv[j - 1] - inv[j])  # the weight of the nearer focus
    return w * per[j - 1] + (1 - w) * per[j]


def _trace_axis(lens, depths: np.ndarray, cfg: GenerateConfig, focus: float = float("nan")) -> np.ndarray:
    """The on-axis valid-ray fraction per depth [D, 3] at one focus [m] (nan: none), the reference of the relative
    illumination.

    Traced at the larger of the two spps, with its own seed (and the focus's, as blocks are). A depth whose axis
    gets (almost) no light means nothing is lit there: an input error, before any file is written.
    """
    spp = max(cfg.spp, cfg.heldout_half_spp())
    at_focus = "" if np.isnan(focus) else f" focused at {gridfile.focus_text(focus)}"
    entropy = [cfg.seed, 0x41584953, *_focus_entropy(focus)]  # "AXIS"
    torch.manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
    try:
        axis, window = illumination.axis_fraction(lens, depths, spp, cfg.kernel_size)
    except (RuntimeError, ValueError, AssertionError, MemoryError) as exc:
        raise InputError(
            f"tracing the on-axis point at {_depths_text(depths)}{at_focus} failed: "
            f"{str(exc).splitlines()[0][:200] or type(exc).__name__}; check the lens file and --depths"
        ) from None
    # Darkness is the light reaching the sensor (axis), wherever it lands; too little of it inside the window is
    # a window too small for the PSF, another remedy.
    need = illumination.min_rays(spp)
    dark = np.argwhere(~(np.rint(axis * spp) >= need))  # NaN counts as dark
    if len(dark):
        d, c = dark[0]
        n = int(np.nan_to_num(np.rint(axis[d, c] * spp)))
        raise InputError(
            f"{'no ray' if n == 0 else f'only {n} rays'} of channel {'RGB'[c]} reached the sensor from the axis "
            f"at {depths[d]:g} m{at_focus} (of {spp} launched, {need} needed; {len(dark)} dark axis channels): "
            "nothing is lit, the lens vignettes completely or the depth is outside its range; check the lens file's "
            "apertures and --depths"
        )
    cut = np.argwhere(~(np.rint(window * spp) >= need))
    if len(cut):
        d, c = cut[0]
        n, lit = int(np.rint(window[d, c] * spp)), int(np.rint(axis[d, c] * spp))
        raise InputError(
            f"the {cfg.kernel_size}-px window holds only {n} of the {lit} rays of channel {'RGB'[c]} that reach the "
            f"sensor from the axis at {depths[d]:g} m{at_focus} ({need} needed for a PSF): the PSF is larger than the "
            "window; give a larger --kernel-size, or a depth the lens images (--depths)"
        )
    return axis


def _depths_text(depth_m: np.ndarray) -> str:
    lo, hi = float(np.min(depth_m)), float(np.max(depth_m))
    return f"{lo:g} m" if lo == hi else f"{lo:g}-{hi:g} m"


def _warn_truncation(grid: GridFile) -> None:
    """Warn when lit grid PSFs keep less than KEPT_LIMIT of their valid rays in the traced window, naming the worst
    and the cost of the remedy (a larger window spreads each stored kernel pixel over more sensor pixels)."""
    kept = grid.light_kept()
    if not kept.below:
        return
    pixel_um = 1000.0 * grid.sensor_size_mm[0] / grid.sensor_res[0]
    larger = suggested_kernel_size(grid.kernel_size, kept.worst)
    log.warning(
        "%d of %d lit grid PSFs keep less than %.0f%% of their valid rays in the %d-px traced window%s (worst %.1f%%, "
        "%s): DeepLens drops the rays beyond the window, so these PSFs are truncated. Use a larger --kernel-size "
        "(e.g. %d or more, what a uniform blur disc keeping %.1f%% would need); a stored kernel pixel spans "
        "kernel_size x sensor pixel / kernel_size_small = %d x %.3g um / %d = %.3g um now, %.3g um at %d px.",
        kept.below,
        kept.total,
        100 * gridfile.KEPT_LIMIT,
        grid.kernel_size,
        f" ({kept.dark} of them stored as dark: too few of their rays in the window for a PSF)" if kept.dark else "",
        100 * kept.worst,
        kept.where(),
        larger,
        100 * kept.worst,
        grid.kernel_size,
        pixel_um,
        grid.kernel_size_small,
        1000.0 * grid.kernel_pitch_mm,
        larger * pixel_um / grid.kernel_size_small,
        larger,
    )


def suggested_kernel_size(kernel_size: int, kept: float) -> int:
    """A window side [px] that would hold a blur of which a kernel_size window keeps the share ``kept``, were it a
    uniform disc of radius R covering the window: kept = kernel_size² / (π R²), and the side 2R holds it all.
    Rounded up to a multiple of 8 and at least kernel_size + 8. A guess: coma and other tails need more."""
    side = 2.0 * kernel_size / np.sqrt(np.pi * max(kept, 1e-4))
    return max(kernel_size + 8, int(np.ceil(side / 8.0)) * 8)
