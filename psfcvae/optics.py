"""The physical scale of a model's kernels and field, from the grid file's provenance.

A stored kernel is the DeepLens PSF traced on ``kernel_size`` sensor pixels, area-downsampled
to ``kernel_size_small`` pixels (psfgen/trace/resample.py), so one kernel pixel is
``kernel_size / kernel_size_small`` sensor pixels wide: pitch [mm] = kernel_size * (sensor
width [mm] / sensor columns) / kernel_size_small. ``psf train`` stores this dict in every
checkpoint (key ``optics``); ``psf render`` and the API read it from there.

Physical coordinates (:class:`FieldMap`). The normalised field point (x, y) places the object as DeepLens's
``point_source_grid`` does: at depth z it lies at (x * w/2, y * h/2) * |z| / f, w x h the sensor [mm] and f the
focal length. So its field angle, the angle at the lens's origin between the axis and the object point, per
axis, is exactly ``atan(x * (w/2) / f)`` (and ``atan(y * (h/2) / f)``), at every depth, and DeepLens's pinhole
image of that point lands at (x * w/2, y * h/2). Its light does not: a real lens distorts. Refocusing (the sensor
moves) changes neither the object point nor its field angle, only where its light lands. The grid file records
where each grid point's chief ray lands, per plane (focus setting and depth: ``grid/chief``,
psfgen.trace.illumination.chief_landing); the image height of (x, y) at a depth and focus is that landing point,
interpolated between the grid points (a cubic spline of the distortion, the landing point less the pinhole image,
held at its edge value beyond the sensor's edges), between the grid's depths linearly in 1/depth and between its
focus settings linearly in 1/focus (both held beyond them), as the model interpolates. Image heights and angles:
x to the right, y up, in the orientation of the stored PSFs, 0 on the axis.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.interpolate import RectBivariateSpline

from psfgen.gridfile import GridFile
from psfgen.shared.errors import InputError

VERSION = 3  # 3: focus_m, chief_mm per plane


def grid_optics(grid: GridFile) -> dict:
    """{version, sensor_size_mm [w, h], sensor_res [w, h], kernel_size, kernel_size_small [px], kernel_pitch_mm,
    foclen_mm, depths_m [D], focus_m [F] (inf allowed; [nan]: the lens file's own), chief_mm [F*D, N, N, 2]
    (float64 tensor, plane f*D + d, row 0 at y = +1, column 0 at x = -1)} of a grid file: the resolved sensor it
    was traced with and where its grid points' chief rays land."""
    n = grid.grid_size
    return {
        "version": VERSION,
        "sensor_size_mm": list(grid.sensor_size_mm),
        "sensor_res": list(grid.sensor_res),
        "kernel_size": grid.kernel_size,
        "kernel_size_small": grid.kernel_size_small,
        "kernel_pitch_mm": grid.kernel_pitch_mm,
        "foclen_mm": grid.foclen_mm,
        "depths_m": [float(d) for d in grid.depths],
        "focus_m": [float(f) for f in grid.focus],
        "chief_mm": torch.as_tensor(grid.chief_mm.reshape(grid.n_planes, n, n, 2)),
    }


class FieldMap:
    """Normalised field coordinates <-> image height on the sensor [mm] and field angle [deg] (the module's
    docstring gives the conventions). All arrays [B]; depth_m and focus_m [B] or scalars, metres (focus_m: inf
    allowed; None, or anything, with one focus setting)."""

    def __init__(self, optics: dict):
        self.size = tuple(float(v) for v in optics["sensor_size_mm"])  # (w, h) [mm]
        self.foclen = float(optics["foclen_mm"])
        self.depths = np.asarray(optics["depths_m"], dtype=np.float64)  # [D], ascending
        self.focus = np.asarray(optics["focus_m"], dtype=np.float64)  # [F], ascending
        chief = torch.as_tensor(optics["chief_mm"]).double().numpy()  # [F*D, N, N, 2]
        n = chief.shape[1]
        lin = np.linspace(-1.0, 1.0, n)
        half = np.array(self.size) / 2
        pinhole = np.stack(np.meshgrid(lin, lin[::-1]), axis=-1) * half  # [N, N, 2], row 0 at y = +1
        distortion = chief - pinhole  # [F*D, N, N, 2]
        k = min(3, n - 1)
        # Splines on ascending x (columns) and y (rows, reversed), per plane and component; outside [-1, 1] they
        # hold the edge's distortion.
        self._splines = [
            [RectBivariateSpline(lin, lin, distortion[p, ::-1, :, c].T, kx=k, ky=k, s=0) for c in range(2)]
            for p in range(len(distortion))
        ]

    def _distortion(self, x: np.ndarray, y: np.ndarray, depth_m, focus_m=None) -> np.ndarray:
        """[B, 2] mm: the landing point less the pinhole image, linear in 1/depth between the grid's depths and in
        1/focus between its focus settings, held beyond them."""
        D = len(self.depths)
        out = np.zeros(x.shape + (2,))
        depth_ends = _brackets(self.depths, depth_m, x.shape)
        focus_ends = _brackets(self.focus, focus_m, x.shape) if len(self.focus) > 1 else [(np.zeros(x.shape, int), 1.0)]
        for f, wf in focus_ends:
            for d, wd in depth_ends:
                weight = wf * wd
                plane = f * D + d
                for p in np.unique(plane):
                    here = plane == p
                    for c in range(2):
                        out[here, c] += weight[here] * self._splines[p][c].ev(x[here], y[here])
        return out

    def height(self, x, y, depth_m, focus_m=None) -> np.ndarray:
        """Image height [B, 2] mm (x right, y up) of the normalised points (x, y) at depth_m and focus_m [m]."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        pinhole = np.stack([x * self.size[0] / 2, y * self.size[1] / 2], axis=-1)
        return pinhole + self._distortion(x, y, depth_m, focus_m)

    def coords_from_height(self, hx_mm, hy_mm, depth_m, focus_m=None) -> np.ndarray:
        """Normalised (x, y) [B, 2] whose chief ray lands at image height (hx, hy) [mm] at depth_m [m]: the
        inverse of :meth:`height`, by fixed-point iteration (the distortion changes slowly across the field)."""
        target = np.stack([np.asarray(hx_mm, dtype=np.float64), np.asarray(hy_mm, dtype=np.float64)], axis=-1)
        half = np.array(self.size) / 2
        xy = target / half
        for _ in range(100):
            step = (target - self.height(xy[:, 0], xy[:, 1], depth_m, focus_m)) / half
            xy = xy + step
            if np.abs(step).max(initial=0.0) < 1e-12:
                break
        return xy

    def angle(self, x, y) -> np.ndarray:
        """Field angle [B, 2] degrees of the normalised points (x, y), per axis: atan(x * (w/2) / f)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        w, h = self.size
        return np.degrees(np.stack([np.arctan(x * w / 2 / self.foclen), np.arctan(y * h / 2 / self.foclen)], -1))

    def coords_from_angle(self, ax_deg, ay_deg) -> np.ndarray:
        """Normalised (x, y) [B, 2] of the field angles (ax, ay) [deg], |angle| < 90."""
        w, h = self.size
        ax, ay = np.radians(np.asarray(ax_deg, dtype=np.float64)), np.radians(np.asarray(ay_deg, dtype=np.float64))
        return np.stack([np.tan(ax) * self.foclen / (w / 2), np.tan(ay) * self.foclen / (h / 2)], axis=-1)

    def edge_heights(self, depth_m: float, focus_m: float | None = None) -> tuple[float, float]:
        """Where the chief rays of the sensor's right and top edge centres land at depth_m and focus_m [m]: (x, y)
        [mm]."""
        h = self.height(np.array([1.0, 0.0]), np.array([0.0, 1.0]), depth_m, focus_m)
        return float(h[0, 0]), float(h[1, 1])


def _brackets(values: np.ndarray, at, shape) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two grid values around each of ``at`` (metres, broadcast to ``shape``) in 1/value, held beyond the
    ends: [(index into ``values`` [B], weight [B])] x 2. values [V] ascending (inf allowed: 1/inf = 0)."""
    inv = 1.0 / values[::-1]  # ascending
    q = np.clip(1.0 / np.broadcast_to(np.asarray(at, dtype=np.float64), shape), inv[0], inv[-1])
    hi = np.clip(np.searchsorted(inv, q), 1, len(inv) - 1) if len(inv) > 1 else np.zeros(shape, int)
    lo = np.maximum(hi - 1, 0)
    span = inv[hi] - inv[lo]
    t = np.divide(q - inv[lo], span, out=np.zeros_like(q), where=span > 0)
    last = len(inv) - 1  # back to indices into the ascending values
    return [(last - lo, 1.0 - t), (last - hi, t)]


def model_optics(model) -> dict:
    """The model's optics dict, from its checkpoint."""
    optics = model.info["optics"]
    if optics.get("version") != VERSION:
        raise InputError(
            f"checkpoint {model.info.get('path')} has optics version {optics.get('version')}, "
            f"this psf-cvae reads {VERSION}; retrain with 'psf train'"
        )
    return optics
