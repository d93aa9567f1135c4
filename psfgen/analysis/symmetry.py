"""Is the lens rotationally symmetric? From its prescription, then from its own traced PSFs.

A coaxial lens (every surface centred on the axis, untilted, with a round aperture and a
rotationally symmetric profile) images the field point (r cos θ, r sin θ) as it images
(r, 0), rotated by θ. The prescription can say so; the grid file can show it: the grid
maps onto itself under x -> -x, y -> -y and (on a square sensor) a quarter turn, and the
PSFs at the image points must be the mirrored or turned PSFs, as close as two independent
traces of one point are (the file's noise re-traces measure that).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from psfgen.gridfile import GridFile
from psfgen.shared.metrics import rel_l2

# DeepLens surface types whose profile is a function of the radius alone.
ROUND_TYPES = {"Aperture", "Stop", "Spheric", "Aspheric", "Plane", "ThinLens"}
# Symmetry errors up to this multiple of the noise floor count as noise: two traces of
# mirrored points are two independent traces, so their difference is the noise itself.
NOISE_TOLERANCE = 1.5


def lens_symmetry(lens_json: str) -> tuple[bool, str]:
    """(symmetric, why) from a DeepLens lens JSON text: which surface breaks the symmetry, if any."""
    data = json.loads(lens_json)
    for i, s in enumerate(data.get("surfaces", [])):
        kind = s.get("type", "?")
        if kind not in ROUND_TYPES:
            return False, f"surface {i} is of type {kind}, not rotationally symmetric"
        if any(abs(float(v)) > 0 for v in s.get("pos_xy", (0.0, 0.0))):
            return False, f"surface {i} is decentred (pos_xy {s['pos_xy']})"
        vec = s.get("vec_local", (0.0, 0.0, 1.0))
        if abs(float(vec[0])) > 0 or abs(float(vec[1])) > 0:
            return False, f"surface {i} is tilted (vec_local {vec})"
        if s.get("is_square"):
            return False, f"surface {i} has a square aperture"
    return True, "all surfaces coaxial, untilted and round"


def field_scale(size: tuple[float, float]) -> tuple[float, float]:
    """(sx, sy): the sensor's half-width and half-height over the longer one; size: (width, height) [mm]."""
    w, h = size
    return float(w / max(w, h)), float(h / max(w, h))


@dataclass(frozen=True)
class SymmetryCheck:
    lens_symmetric: bool
    lens_reason: str
    errors: dict  # {"mirror x": mean relative L2, ...} between mapped PSFs
    noise: float | None  # mean relative L2 of the file's noise pairs; None without noise points

    @property
    def holds(self) -> bool:
        if not self.lens_symmetric:
            return False
        if self.noise is None:  # nothing to compare with: the prescription decides
            return True
        return all(e <= NOISE_TOLERANCE * self.noise for e in self.errors.values())

    def describe(self) -> str:
        errs = ", ".join(f"{k} {100 * v:.1f}%" for k, v in self.errors.items())
        noise = "no noise re-traces to compare" if self.noise is None else f"noise floor {100 * self.noise:.1f}%"
        return f"lens: {self.lens_reason}; PSFs under the field's symmetries differ by {errs} ({noise})"


def grid_symmetry_errors(psf, n: int, square: bool) -> dict:
    """Mean relative L2 between grid PSFs mapped by the field's symmetries and the PSFs there.

    psf: [F*D, P, 3, k, k] on the N x N grid (row 0 at y = +1), an array or an HDF5 dataset,
    read one plane at a time. Mirror x: column c <-> N-1-c
    with the kernel's columns flipped; mirror y: rows likewise; quarter turn (square
    sensors): the point (x, y) -> (-y, x) is grid (r, c) -> (N-1-c, r), the kernel turned by
    rot90. Points that map onto themselves are left out.
    """
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    maps = {
        "mirror x": ((r, n - 1 - c), lambda k: k[..., ::-1]),
        "mirror y": ((n - 1 - r, c), lambda k: k[..., ::-1, :]),
    }
    if square:
        maps["quarter turn"] = ((n - 1 - c, r), lambda k: np.rot90(k, 1, axes=(-2, -1)))
    errors = {name: [] for name in maps}
    for d in range(psf.shape[0]):
        g = np.asarray(psf[d]).reshape(n, n, *psf.shape[2:])  # [row, col, 3, k, k]
        for name, ((r2, c2), turn) in maps.items():
            moved = (r2 != r) | (c2 != c)
            a, b = turn(g[r[moved], c[moved]]), g[r2[moved], c2[moved]]
            # Only pairs with a PSF in every channel at both ends: a dark point (stored as zeros) has none,
            # and which points near the image circle's edge pass the ray threshold is Monte Carlo noise.
            both = (a.sum(axis=(-2, -1)) > 0).all(axis=-1) & (b.sum(axis=(-2, -1)) > 0).all(axis=-1)
            errors[name].append(rel_l2(a[both], b[both]))
    return {name: float(np.concatenate(e).mean()) for name, e in errors.items()}


def check_file(grid: GridFile) -> SymmetryCheck:
    """Check a finished grid file for rotational symmetry: prescription and PSFs."""
    n = grid.grid_size
    sx, sy = field_scale(grid.sensor_size_mm)
    errors = grid_symmetry_errors(_Depths(grid), n, square=abs(sx - sy) < 1e-9)
    noise = grid.noise()["psf"]
    pairs = [rel_l2(noise[p], grid.grid_psf(p)[grid.noise_index]) for p in range(grid.n_planes)] if grid.n_noise else []
    ok, reason = lens_symmetry(grid.lens_json)
    pairs = np.concatenate(pairs) if pairs else np.zeros(0)
    pairs = pairs[np.isfinite(pairs)]  # a dark point (zeros) in either trace has no PSF to compare
    return SymmetryCheck(ok, reason, errors, float(pairs.mean()) if len(pairs) else None)


class _Depths:
    """The grid PSFs as grid_symmetry_errors indexes them, psf[p] -> [P, 3, k, k], one plane at a time: files may
    exceed RAM."""

    def __init__(self, grid: GridFile):
        self.grid = grid
        self.shape = (grid.n_planes, grid.grid_size**2, 3, grid.kernel_size_small, grid.kernel_size_small)

    def __getitem__(self, d: int) -> np.ndarray:
        return self.grid.grid_psf(d)
