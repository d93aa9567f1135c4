"""Streaming the grid file into training batches.

A training batch is ``batch_size`` grid PSFs gathered as ``batch_size / read_run`` runs of
``read_run`` consecutive PSFs (consecutive in the file's [plane, point] order, so mostly
neighbours along a grid row) from random places in the file: each run is one contiguous HDF5 read, and the order of the
runs is a fresh permutation every epoch, so every PSF is seen once per epoch. Batch ``g``
depends only on (seed, g), which is what lets ``--resume`` continue the same data order. A grid held in memory
needs no runs (read_run auto is 1 there: ``training.resolve``), and a batch is gathered in one indexing.

The HDF5 file is opened lazily inside whichever process reads it (each DataLoader
worker opens its own handle, never inherited through fork). With ``in_memory`` the
grid is read into RAM once, before workers fork, and shared with them.
"""

from __future__ import annotations

import itertools
import logging
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from psfgen.gridfile import GridFile

log = logging.getLogger(__name__)


def depth_codes(depths: np.ndarray) -> np.ndarray:
    """Depths [m] -> d in [-1, 1], linear in 1/depth, +1 at the nearest; [D]. One depth: 0."""
    inv = 1.0 / depths
    if len(depths) == 1 or inv.max() == inv.min():
        return np.zeros_like(depths)
    return 2.0 * (inv - inv.min()) / (inv.max() - inv.min()) - 1.0


def focus_codes(focus: np.ndarray) -> np.ndarray:
    """Focus distances [m] (inf allowed) -> φ in [-1, 1], linear in 1/focus, +1 at the nearest; [F].
    One focus (nan allowed: the lens file's own): 0."""
    if len(focus) == 1:
        return np.zeros_like(focus)
    return depth_codes(focus)  # the same map: 1/inf = 0 is the far end


class Conditions:
    """The conditioning vectors of grid points and their neighbour pairs, on one device.

    table: [F*D, P, C], one row per plane p = f*D + d (focus f, depth d; F = 1 without focus), with c = (x, y),
    (x, y, d), (x, y, φ) or (x, y, d, φ). Neighbours of a grid point are those of the file's neighbour table
    (both directions) in the same plane, plus, when conditioning on depth, the same point at the adjacent depths
    at the same focus and, when conditioning on focus, the same point at the adjacent focus settings at the same
    depth.
    """

    def __init__(
        self,
        coords: np.ndarray,
        depths: np.ndarray,
        neighbors: np.ndarray,
        use_depth: bool,
        device,
        lit: np.ndarray | None = None,
        focus: np.ndarray | None = None,
    ):
        """coords [P, 2]; depths [D] m; neighbors [E, 2]; lit [F*D, P] bool; focus [F] m (None: F = 1), conditioned
        on when F > 1."""
        D, P = len(depths), len(coords)
        focus = np.full(1, np.nan) if focus is None else np.asarray(focus, dtype=np.float64)
        F = len(focus)
        N = F * D
        # lit [F*D, P]: points with a PSF. Pairs touching a dark point are left out of the smoothness term.
        self.lit_np = np.ones((N, P), bool) if lit is None else np.asarray(lit, bool)
        self.lit = torch.as_tensor(self.lit_np, device=device)
        xy = np.broadcast_to(coords[None], (N, P, 2))
        parts = [xy]
        if use_depth:
            parts.append(np.broadcast_to(np.tile(depth_codes(depths), F)[:, None, None], (N, P, 1)))
        self.use_focus = F > 1
        if self.use_focus:
            parts.append(np.broadcast_to(np.repeat(focus_codes(focus), D)[:, None, None], (N, P, 1)))
        self.table = torch.as_tensor(np.concatenate(parts, axis=2), dtype=torch.float32, device=device)
        self.use_depth = use_depth
        self.D, self.F = D, F
        both = np.concatenate([neighbors, neighbors[:, ::-1]])  # [2E, 2]
        deg = np.bincount(both[:, 0], minlength=P)
        adj = np.full((P, max(int(deg.max()), 1)), -1, dtype=np.int64)
        fill = np.zeros(P, dtype=np.int64)
        for i, j in both:
            adj[i, fill[i]] = j
            fill[i] += 1
        self.adj = torch.as_tensor(adj, device=device)  # [P, 8], -1 padded

    def __call__(self, point: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """cond [B, C] of grid points ``point`` [B] in planes ``plane`` [B] (f*D + d)."""
        return self.table[plane, point]

    def _steps(self):
        """(plane step, whether a plane may take it [B] -> [B] bool) of the neighbours across planes: adjacent
        depths within a focus, adjacent focus settings at a depth."""
        if self.use_depth:
            for step in (-1, 1):
                yield step, lambda plane, s=step: ((plane % self.D) + s >= 0) & ((plane % self.D) + s < self.D)
        if self.use_focus:
            n = self.F * self.D
            for step in (-self.D, self.D):
                yield step, lambda plane, s=step: (plane + s >= 0) & (plane + s < n)

    def pairs(self, point: torch.Tensor, plane: torch.Tensor):
        """Neighbour pairs of a batch: (src [Q] index into the batch, neighbour cond [Q, C]); both ends lit."""
        nbr = self.adj[point]  # [B, 8]
        here = self.lit[plane, point]  # [B]
        both_lit = here[:, None] & self.lit[plane[:, None], nbr.clamp_min(0)]
        src, slot = torch.nonzero((nbr >= 0) & both_lit, as_tuple=True)
        srcs = [src]
        conds = [self.table[plane[src], nbr[src, slot]]]
        last = self.F * self.D - 1
        for step, allowed in self._steps():
            other = plane + step
            ok = torch.nonzero(allowed(plane) & here & self.lit[other.clamp(0, last), point], as_tuple=True)[0]
            srcs.append(ok)
            conds.append(self.table[other[ok], point[ok]])
        return torch.cat(srcs), torch.cat(conds)

    def dark_pairs(self, neighbors: np.ndarray) -> int:
        """Undirected neighbour pairs (in the field, across depths and focus) left out because one end is dark."""
        lit = self.lit_np
        n = int((~(lit[:, neighbors[:, 0]] & lit[:, neighbors[:, 1]])).sum())
        by_focus = lit.reshape(self.F, self.D, -1)
        if self.use_depth:
            n += int((~(by_focus[:, 1:] & by_focus[:, :-1])).sum())
        if self.use_focus:
            n += int((~(by_focus[1:] & by_focus[:-1])).sum())
        return n


class GridBatches(Dataset):
    """Map-style dataset whose item ``g`` is the whole training batch number ``g``.

    Returns dict(psf [B, 3, k, k] float32, point [B] int64, plane [B] int64 (f*D + d), lit [B] bool,
    illum [B, 3] float32, valid [B, 3] bool): dark points stay in the batch (the illumination
    head learns from them; the PSF terms weigh them 0). Under DDP,
    rank r of W keeps PSFs r, r+W, ... of global batch g: together the ranks see exactly
    the batch a single process would, which is how a DistributedSampler with its epoch
    set is realised here (the permutation is a function of the epoch).
    """

    def __init__(
        self, grid: GridFile, batch_size: int, read_run: int, seed: int, in_memory: bool, rank: int = 0, world: int = 1
    ):
        self.grid = grid
        self.planes = grid.n_planes  # F*D: every focus setting's depths
        self.P = grid.grid_size**2
        self.k = grid.kernel_size_small
        self.batch_size = batch_size
        self.runs_per_batch = batch_size // read_run  # the config checks that read_run divides batch_size
        self.read_run = read_run
        self.seed = seed
        self.rank, self.world = rank, world  # under DDP each rank takes every world-th PSF of a batch
        n = self.planes * self.P
        self.run_starts = np.arange(0, n, read_run)  # flat index of each run's first PSF
        # Runs that cannot fill a last batch wait for the next epoch's permutation (drop_last):
        # every batch then has batch_size PSFs, and every rank of a DDP run gets its share.
        self.batches_per_epoch = max(1, len(self.run_starts) // self.runs_per_batch)
        self._file = None
        self._epoch = None
        self._order = None
        self.memory = None
        self.illum = grid.illumination.reshape(n, 3)
        self.valid = grid.valid.reshape(n, 3)
        if in_memory:
            self.memory = grid.grid_psfs().reshape(n, 3, self.k, self.k)  # [F*D*P, 3, k, k]

    def __len__(self) -> int:
        return self.batches_per_epoch  # per epoch; the sampler runs on across epochs

    def _runs_of_epoch(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, 0x44415441, epoch]))  # "DATA"
            self._order = rng.permutation(self.run_starts)
            self._epoch = epoch
        return self._order

    def _read(self, lo: int, hi: int) -> np.ndarray:
        """PSFs with flat indices [lo, hi) from the file: [hi - lo, 3, k, k]; a run may cross a plane."""
        if self._file is None:
            self._file = self.grid.reader()  # opened here, in the reading process
        return self.grid.grid_psf_flat(lo, hi, self._file)

    def __getitem__(self, g: int) -> dict:
        epoch, b = divmod(int(g), self.batches_per_epoch)
        starts = self._runs_of_epoch(epoch)[b * self.runs_per_batch : (b + 1) * self.runs_per_batch]
        n = self.planes * self.P
        flat = np.concatenate([np.arange(s, min(s + self.read_run, n)) for s in starts])
        if self.memory is not None:
            psf = self.memory[flat]
        else:
            psf = np.concatenate([self._read(s, min(s + self.read_run, n)) for s in starts])
        if self.world > 1:  # every rank reads the global batch (a few small reads) and keeps its share
            flat, psf = flat[self.rank :: self.world], psf[self.rank :: self.world]
        plane, point = np.divmod(flat, self.P)
        return {
            "psf": torch.from_numpy(np.ascontiguousarray(psf)),
            "point": torch.from_numpy(point),
            "plane": torch.from_numpy(plane),  # into the file's planes; held-out sets carry depth and focus [m]
            "lit": torch.from_numpy(self.valid[flat].all(axis=1)),
            "illum": torch.from_numpy(self.illum[flat]),
            "valid": torch.from_numpy(self.valid[flat]),
        }

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None  # an h5py handle never crosses processes
        return state


def _ignore_stop_signals(_worker_id: int) -> None:
    """In a DataLoader worker: Ctrl-C and SIGTERM are the main process's to handle (save, then stop).
    A scheduler signals the whole process group; a worker dying on it would crash the step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: GridBatches, start: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches start, start+1, ... forever, in order, whatever num_workers."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=itertools.count(start),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_stop_signals,
        # Its own generator: creating the iterator would otherwise draw from the global RNG,
        # which training saves and restores for --resume.
        generator=torch.Generator().manual_seed(0),
    )


def lit_only(heldout: dict) -> tuple[dict, int]:
    """(the held-out set without its dark points, how many were dark): every [M, ...] entry filtered."""
    lit = heldout["lit"]
    return {k: v[lit] for k, v in heldout.items()}, int((~lit).sum())
