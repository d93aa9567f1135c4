"""The network blended with bicubic interpolation of its training grid, where the validation points say so.

The network's PSFs are smooth in the field but not exact: on a coarse grid its fit near the optical axis,
where the PSF is sharpest, is a few per cent, while the four grid PSFs around the axis are nearly the same
PSF and bicubic interpolation between them errs by less (docs/results.md, "The centre"). A model that
answers with the better of the two where each is better is never worse than either there. So::

    K(c) = w(r) K_net(c) + (1 - w(r)) K_bicubic(c), each channel renormalised to sum 1

r = √(x² + y²) in normalised field coordinates (√2 at the sensor's corner). w is piecewise linear in r
through one weight per radius band of RADIUS_BANDS ([0, 0.15), [0.15, 0.5), [0.5, 0.9), [0.9, √2]), placed at
the band's middle, and constant beyond the first and last middles: continuous, so a rendering shows no seam.
The weights, each one of 0, 0.05, ..., 1, minimise the sum over bands of the pooled noise-corrected error on
the file's lit validation points in the band, w(r) applied as it will be (``fit``, by coordinate descent:
psf train, at every checkpoint); never the test points, which psf eval scores. A band with fewer than
MIN_POINTS validation points keeps the network alone at its node (w = 1). K_bicubic is the evaluation's
bicubic baseline (psfcvae/evaluation/baselines.py): Catmull-Rom over the field, linear in 1/depth and in
1/focus between the grid's planes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from psfcvae.evaluation import baselines
from psfcvae.evaluation.metrics import rel_l2_corrected
from psfgen.plan.grid import RADIUS_BANDS, radius_band

STEPS = 21  # candidate weights 0, 0.05, ..., 1
MIN_POINTS = 2  # validation points a band needs before its weight is fitted
SWEEPS = 5  # coordinate-descent passes over the weights at most
BANDS = len(RADIUS_BANDS) - 1
# Where each band's weight holds: the middle of the band; w is linear in r between two middles.
NODES = tuple(0.5 * (lo + hi) for lo, hi in zip(RADIUS_BANDS[:-1], RADIUS_BANDS[1:]))


def profile(r: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The network's weight w [M] at radii r [M] from the bands' weights [BANDS]."""
    return np.interp(r, NODES, weights)


@dataclass
class Blend:
    """The training grid and the network's weight per radius band.

    grid [F*D, P, 3, k, k] float16: the file's grid PSFs on its planes p = f*D + d (zeros where dark);
    grid_size N (P = N²); depths [D] m; focus [F] m ([nan]: one focus); weights [bands] in [0, 1];
    points [bands]: the validation points that fitted each weight.
    """

    grid: torch.Tensor
    grid_size: int
    depths: np.ndarray
    focus: np.ndarray
    weights: np.ndarray
    points: np.ndarray
    _grid32: np.ndarray | None = field(default=None, repr=False)

    def weight(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The network's weight w [M] at field points x, y [M]."""
        return profile(np.hypot(x, y), self.weights)

    def interpolate(self, x, y, depth_m, focus_m=None) -> np.ndarray:
        """Bicubic interpolation of the grid at (x, y) [M], depth_m [M] m, focus_m [M] m (None: one focus):
        [M, 3, k, k] float32, each channel sums to 1 (0 where every neighbour is dark)."""
        if self._grid32 is None:  # converted once: the table and the API call this chunk by chunk
            self._grid32 = self.grid.float().numpy()
        return baselines.bicubic(self._grid32, self.depths, self.grid_size, x, y, depth_m, self.focus, focus_m)

    def apply(self, psf: torch.Tensor, x, y, depth_m, focus_m=None) -> torch.Tensor:
        """The network's psf [M, 3, k, k] (or [M, S, 3, k, k], S samples per point) at (x, y, depth_m [m],
        focus_m [m]) [M] blended with the grid's bicubic interpolation: same shape, each channel sums to 1."""
        w = self.weight(x, y)
        need = np.flatnonzero(w < 1.0)  # w = 1: the network alone, no interpolation to compute
        if not len(need):
            return psf
        pick = lambda v: None if v is None else np.broadcast_to(np.asarray(v, np.float64), w.shape)[need]  # noqa: E731
        bic = torch.as_tensor(self.interpolate(*(pick(v) for v in (x, y, depth_m, focus_m))), device=psf.device)
        if psf.dim() == 5:
            bic = bic[:, None]
        wt = torch.as_tensor(w[need], dtype=psf.dtype, device=psf.device).view(-1, *[1] * (psf.dim() - 1))
        mixed = wt * psf[need] + (1.0 - wt) * bic
        s = mixed.sum(dim=(-2, -1), keepdim=True)
        out = psf.clone()
        out[need] = torch.where(s > 0, mixed / s.clamp_min(1e-30), psf[need])
        return out

    def state(self) -> dict:
        """What a checkpoint stores (torch tensors and lists: loadable with weights_only=True)."""
        return {
            "grid": self.grid,
            "grid_size": self.grid_size,
            "depths": [float(d) for d in self.depths],
            "focus": [float(f) for f in self.focus],
            "weights": [float(v) for v in self.weights],
            "points": [int(v) for v in self.points],
        }

    @classmethod
    def from_state(cls, state: dict) -> Blend:
        return cls(
            grid=state["grid"],
            grid_size=int(state["grid_size"]),
            depths=np.asarray(state["depths"], dtype=np.float64),
            focus=np.asarray(state["focus"], dtype=np.float64),
            weights=np.asarray(state["weights"], dtype=np.float64),
            points=np.asarray(state["points"], dtype=np.int64),
        )

    def describe(self) -> str:
        """'network weight 0.00 / 0.75 / 0.80 / 0.95 by radius band (2 / 2 / 3 / 3 validation points)'."""
        w = " / ".join(f"{v:.2f}" for v in self.weights)
        n = " / ".join(str(int(v)) for v in self.points)
        return f"network weight {w} by radius band, the rest bicubic interpolation ({n} validation points)"


def fit(grid: np.ndarray, grid_size: int, depths, focus, net_psf: np.ndarray, validation: dict) -> Blend:
    """The blend of the network's PSFs net_psf [V, 3, k, k] at the lit validation points ``validation``
    (GridFile.heldout's entries: coords [V, 2], depth [V] m, focus [V] m, psf_a, psf_b [V, 3, k, k]) with the
    grid [F*D, P, 3, k, k] (depths [D] m, focus [F] m): the weights of the lowest sum over bands of the pooled
    noise-corrected error (the module's docstring)."""
    focus = np.asarray(focus, dtype=np.float64)
    blend = Blend(
        grid=torch.as_tensor(np.asarray(grid), dtype=torch.float16),
        grid_size=int(grid_size),
        depths=np.asarray(depths, dtype=np.float64),
        focus=focus,
        weights=np.ones(BANDS),
        points=np.zeros(BANDS, dtype=np.int64),
    )
    coords = validation["coords"]
    if not len(coords):
        return blend
    focus_m = None if len(focus) == 1 else validation["focus"]
    bic = blend.interpolate(coords[:, 0], coords[:, 1], validation["depth"], focus_m)
    band = radius_band(coords)
    blend.points[:] = np.bincount(band, minlength=BANDS)
    scored = [b for b in range(BANDS) if blend.points[b] >= MIN_POINTS]
    a, c = validation["psf_a"], validation["psf_b"]

    def loss(weights: np.ndarray) -> float:
        mixed = _mix(profile(np.hypot(coords[:, 0], coords[:, 1]), weights), net_psf, bic)
        return sum(rel_l2_corrected(mixed[band == b], a[band == b], c[band == b])[1] for b in scored)

    candidates = np.linspace(1.0, 0.0, STEPS)  # from the network alone down: a tie keeps the larger weight
    for _ in range(SWEEPS):
        before = blend.weights.copy()
        for b in scored:
            trials = [loss(np.where(np.arange(BANDS) == b, w, blend.weights)) for w in candidates]
            blend.weights[b] = candidates[int(np.argmin(trials))]
        if np.array_equal(before, blend.weights):
            break
    return blend


def _mix(w: np.ndarray, net: np.ndarray, bic: np.ndarray) -> np.ndarray:
    """w [M] · net + (1 - w) · bic, [M, 3, k, k] each, renormalised per channel (the network where both are 0)."""
    w = w[:, None, None, None]
    mixed = w * net + (1.0 - w) * bic
    s = mixed.sum(axis=(-2, -1), keepdims=True)
    return np.where(s > 0, mixed / np.where(s > 0, s, 1.0), net)
