"""The lit field of a grid file: dark points, the image circle they imply, the illumination fall-off.

Radii are physical distances from the axis on the sensor, r = ρ / (half of the longer
sensor side), so r = 1 at the middle of the longer edge (and at x = ±1 on a square
sensor). The image circle radius is halfway between the farthest lit grid point and the
nearest dark one; fall-off values are the illumination (mean of R, G, B) linearly
interpolated in r over the grid points, averaged at equal radii.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from psfgen.gridfile import GridFile
from psfgen.shared.errors import InputError

log = logging.getLogger(__name__)

FALLOFF_RADII = (0.5, 0.8, 1.0)


def radii(coords: np.ndarray, size_mm: tuple[float, float]) -> tuple[np.ndarray, float]:
    """(ρ [P] in mm from the axis, half of the longer side [mm]) of normalised coords [P, 2]; size_mm: (w, h)."""
    w, h = size_mm
    return np.hypot(coords[:, 0] * w / 2, coords[:, 1] * h / 2), max(w, h) / 2


def image_circle(rho: np.ndarray, lit: np.ndarray) -> tuple[float, float] | None:
    """(lower, upper) bounds of the image circle's radius from lit [P] at radii rho [P]; None if all lit."""
    if lit.all():
        return None
    inside = float(rho[lit].max()) if lit.any() else 0.0
    outside = float(rho[~lit & (rho > inside)].min()) if (~lit & (rho > inside)).any() else inside
    dark_inside = (~lit & (rho < inside)).any()  # not a circle: vignetting that is not round
    return (float(rho[~lit].min()) if dark_inside else inside), outside


def falloff(r: np.ndarray, illum: np.ndarray, at=FALLOFF_RADII) -> np.ndarray:
    """Illumination [P] at radii r [P], averaged at equal radii and interpolated at ``at``: [len(at)]."""
    key = np.round(r, 9)
    uniq = np.unique(key)
    mean = np.array([illum[key == u].mean() for u in uniq])
    return np.interp(at, uniq, mean, right=np.nan)


def summary_lines(grid: GridFile) -> list[str]:
    """The 'lit field' lines of ``psf info``."""
    traced = grid.traced_grid()  # [F*D, P]
    valid, illum = grid.valid, grid.illumination  # [F*D, P, 3] each
    rho, half = radii(grid.coords, grid.sensor_size_mm)
    lines = []
    for d in range(grid.n_planes):
        depth = grid.plane_label(d)
        if not traced[d].all():
            lines.append(f"lit field   {depth}: not fully traced yet")
            continue
        lit = valid[d].all(axis=-1)
        curve = falloff(rho / half, illum[d].mean(axis=-1))
        text = "/".join("-" if not np.isfinite(v) else f"{v:.2f}" for v in curve)
        circle = image_circle(rho, lit)
        where = (
            "all lit"
            if circle is None
            else (
                f"image circle radius {circle[0] / half:.2f}-{circle[1] / half:.2f} "
                f"({circle[0]:.2f}-{circle[1]:.2f} mm)"
            )
        )
        lines.append(
            f"lit field   {depth}: {int((~lit).sum())} of {len(lit)} grid points dark, {where}; "
            f"illumination at r = {'/'.join(f'{v:g}' for v in FALLOFF_RADII)}: {text}"
        )
    return lines


def report_dark(lit: np.ndarray, planes: list[str], out: Path) -> None:
    """One line on the lit field (lit [F*D, P] bool; planes: each plane's label, GridFile.plane_label); an input
    error when (almost) nothing is lit."""
    P = lit.shape[1]
    if lit.all():
        return
    per = ", ".join(f"{d}: {int(P - n)}" for d, n in zip(planes, lit.sum(axis=1)))
    log.warning(
        "dark grid points (outside the lit field, stored as dark, left out of training) of %d per plane: %s; "
        "'psf info %s' shows the image circle",
        P,
        per,
        out,
    )
    few = int(lit.sum(axis=1).min())
    if few < 4:
        raise InputError(
            f"only {few} of {P} grid points receive light at {planes[int(lit.sum(axis=1).argmin())]}: the lens's "
            f"image circle is much smaller than the sensor; {out} is kept, but use a smaller sensor_size in the lens "
            "file (or a lens that covers it)"
        )
