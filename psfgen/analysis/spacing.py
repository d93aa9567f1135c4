"""Which sampling limits interpolation, the field grid's, the depths' or the focus settings': read from a grid file.

Each interior grid PSF is predicted from its two neighbours, as if it were missing: along the
grid's rows and columns (their mean), along depth (linear in 1/depth) and, in a file over three
focus settings or more, along focus (linear in 1/focus, at the same depth). The relative L2 of
those predictions, pooled, with the Monte Carlo noise of the three traced PSFs taken out
(the file's re-traced points give one trace's noise), measures how fast the PSF changes at
twice the file's spacing, on each axis. Interpolation error grows about as the square of the
spacing, so points between grid points see roughly a quarter of these figures; what the two
figures say together is where rays pay: measured at the same rays in all (docs/ray_budget.md),
the Cooke triplet, whose depth figure is 30 times its field figure, went from 11.4% to 2.5%
held-out error (bicubic) with 17 depths instead of 5, while the condenser, whose two figures
are alike, gained nothing from more depths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from psfgen.gridfile import GridFile

# The ratio of one axis's figure to the other's above which that axis is said to limit.
LIMITING_RATIO = 3.0


@dataclass(frozen=True)
class Spacing:
    """Leave-one-out interpolation errors (relative L2, pooled, noise removed) at twice the spacing."""

    field: float  # from the two neighbours along a grid row or column; NaN on a grid under 3 x 3
    depth: float  # from the neighbouring depths, linear in 1/depth; NaN with under 3 depths
    noise: float  # one trace's relative noise (pooled), taken out of both; 0 without re-traced points
    focus: float = float("nan")  # from the neighbouring focus settings, linear in 1/focus; NaN with under 3

    def describe(self) -> str:
        def pct(v):
            return "n/a" if np.isnan(v) else f"{100 * v:.1f}%"

        text = (
            f"a grid PSF predicted from its neighbours (twice the spacing, noise {pct(self.noise)} removed) is off by "
            f"{pct(self.focus) + ' across focus, ' if not np.isnan(self.focus) else ''}"
            f"{pct(self.field)} across the field, {pct(self.depth)} across depth"
        )
        more = {"depth": "more depths", "focus": "more focus settings"}
        limiting = [axis for axis in more if getattr(self, axis) > LIMITING_RATIO * self.field]  # NaN: never
        if limiting:
            verb = "limits" if len(limiting) == 1 else "limit"
            return (
                text + f": {' and '.join(limiting)} {verb}; {' and '.join(more[a] for a in limiting)} (fewer field "
                "points for the same rays) pay more"
            )
        others = [v for v in (self.depth, self.focus) if not np.isnan(v)]
        if others and self.field > LIMITING_RATIO * max(others):
            return text + ": the field grid limits; a denser grid (fewer depths for the same rays) pays more"
        return text


def pooled(pred: np.ndarray, truth: np.ndarray, ok: np.ndarray) -> tuple[float, float]:
    """(Σ|pred - truth|², Σ|truth|²) over the items where ok; arrays [..., 3, k, k], ok [...]."""
    diff = ((pred - truth) ** 2).sum(axis=(-3, -2, -1))
    norm = (truth**2).sum(axis=(-3, -2, -1))
    return float(diff[ok].sum()), float(norm[ok].sum())


def noise_removed(pair: tuple[float, float], noise2: float, weight: float) -> tuple[float, float]:
    """(Σ|pred - truth|² less what the traces' noise adds to it, Σ|truth|²) for a prediction weight·near +
    (1 - weight)·far of the truth: the truth's noise plus weight² of one neighbour's and (1 - weight)² of the
    other's, each noise2 in relative terms."""
    diff, norm = pair
    return diff - (1 + weight**2 + (1 - weight) ** 2) * noise2 * norm, norm


def corrected(pair: tuple[float, float]) -> float:
    """sqrt(pooled squared error, noise removed), 0 where the noise explains it all."""
    diff, norm = pair
    return float(np.sqrt(max(diff / norm, 0.0))) if norm > 0 else float("nan")


def _field_sums(psf: np.ndarray, lit: np.ndarray, noise2: float) -> tuple[float, float]:
    """Pooled sums (noise removed) of the mid-point predictions along rows and columns: psf [N, N, 3, k, k],
    lit [N, N]."""
    total = (0.0, 0.0)
    for axis in (0, 1):
        n = psf.shape[axis]
        if n < 3:
            continue
        lo, mid, hi = (np.take(psf, range(a, n - 2 + a), axis=axis) for a in (0, 1, 2))
        ok = np.ones(mid.shape[:2], bool)
        for a in (0, 1, 2):
            ok &= np.take(lit, range(a, n - 2 + a), axis=axis)
        pair = noise_removed(pooled(0.5 * (lo + hi), mid, ok), noise2, 0.5)
        total = tuple(t + v for t, v in zip(total, pair))
    return total


def _depth_sums(near, mid, far, inv: tuple[float, float, float], lit, noise2: float) -> tuple[float, float]:
    """Pooled sums (noise removed) of the prediction of ``mid`` linear in 1/depth (or 1/focus) from its neighbours
    (inverse distances ``inv`` [1/m] of near, mid, far); PSFs [N, N, 3, k, k], lit a triple of [N, N] bool."""
    w = (inv[1] - inv[2]) / (inv[0] - inv[2])  # the weight of the nearer neighbour
    return noise_removed(pooled(w * near + (1 - w) * far, mid, lit[0] & lit[1] & lit[2]), noise2, w)


def spacing_errors(read, depths: np.ndarray, lit: np.ndarray, noise2: float = 0.0, focus=None) -> Spacing:
    """read(p) -> the grid PSFs of plane p = f*D + d [N, N, 3, k, k] (float64); depths [D] m; lit [F*D, N, N] bool
    (PSFs to use; F focus settings, each at every depth); noise2: one trace's pooled squared relative noise; focus
    [F] m (inf allowed), read with three or more. Depth is predicted within each focus, focus at each depth. Holds
    three planes at a time."""
    inv = 1.0 / np.asarray(depths, dtype=np.float64)
    D = len(inv)
    field, depth, window = (0.0, 0.0), (0.0, 0.0), []
    for p in range(lit.shape[0]):
        d = p % D
        window = [*window[-2:], read(p)] if d else [read(p)]
        field = tuple(t + v for t, v in zip(field, _field_sums(window[-1], lit[p], noise2)))
        if d >= 2:
            pair = _depth_sums(*window, tuple(inv[d - 2 : d + 1]), lit[p - 2 : p + 1], noise2)
            depth = tuple(t + v for t, v in zip(depth, pair))
    across_focus = float("nan")
    if focus is not None and len(focus) >= 3:
        inv_f = 1.0 / np.asarray(focus, dtype=np.float64)  # 1/inf = 0
        sums = (0.0, 0.0)
        for f in range(1, len(inv_f) - 1):
            for d in range(D):
                planes = [(f + step) * D + d for step in (-1, 0, 1)]
                pair = _depth_sums(*map(read, planes), tuple(inv_f[f - 1 : f + 2]), lit[planes], noise2)
                sums = tuple(t + v for t, v in zip(sums, pair))
        across_focus = corrected(sums)
    return Spacing(
        field=corrected(field) if lit.shape[1] >= 3 else float("nan"),
        depth=corrected(depth) if len(inv) >= 3 else float("nan"),
        noise=float(np.sqrt(noise2)),
        focus=across_focus,
    )


def check_file(grid: GridFile) -> Spacing:
    """spacing_errors of a grid file's traced, lit PSFs, the noise taken from its re-traced points."""
    n, d = grid.grid_size, grid.n_planes
    lit = grid.traced_grid() & grid.lit  # [F*D, P]
    idx = grid.noise_index
    noise2 = 0.0
    if idx.size:
        again = grid.noise()["psf"]  # [F*D, S, 3, k, k]
        ok = lit[:, idx] & (again.sum(axis=(-3, -2, -1)) > 0)
        diff, norm = pooled(again, np.stack([grid.grid_psf(i)[idx] for i in range(d)]), ok)
        noise2 = diff / norm / 2 if norm > 0 else 0.0  # two traces differ by twice one trace's variance

    def read(i):
        return grid.grid_psf(i).astype(np.float64).reshape(n, n, 3, grid.kernel_size_small, grid.kernel_size_small)

    return spacing_errors(read, np.asarray(grid.depths), lit.reshape(d, n, n), noise2, grid.focus)
