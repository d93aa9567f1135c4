"""What a user would do instead of the CVAE: interpolate the grid PSFs of the same file.

All methods take the grid (coords on a regular N x N lattice, PSFs [D, P, 3, k, k] at
depths [D]) and query points (x, y, depth [m]) and return [M, 3, k, k], non-negative with
each channel summing to 1. Between grid depths they are linear in 1/depth (defocus is);
beyond the first or last depth they use that depth.
"""

from __future__ import annotations

import numpy as np


def _normalise(psf: np.ndarray) -> np.ndarray:
    psf = np.clip(psf, 0.0, None)
    s = psf.sum(axis=(-2, -1), keepdims=True)
    return (psf / np.where(s > 0, s, 1.0)).astype(np.float32)


def _lattice(n: int, x: np.ndarray, y: np.ndarray):
    """Continuous (row, col) of points on the grid of docs/dataset.md: col from x, row from y."""
    col = (np.clip(x, -1, 1) + 1.0) * (n - 1) / 2.0
    row = (1.0 - np.clip(y, -1, 1)) * (n - 1) / 2.0
    return row, col


def _depth_weights(depths: np.ndarray, depth_m: np.ndarray):
    """For each query, two depth indices and weights, linear in 1/depth: ([M], [M], [M])."""
    inv = 1.0 / depths  # depths ascending -> inverse descending
    q = np.clip(1.0 / depth_m, inv.min(), inv.max())
    order = np.argsort(inv)  # ascending inverse depth
    inv_sorted = inv[order]
    hi = (
        np.clip(np.searchsorted(inv_sorted, q, side="right"), 1, len(inv) - 1)
        if len(inv) > 1
        else np.zeros(len(q), int)
    )
    if len(inv) == 1:
        return np.zeros(len(q), int), np.zeros(len(q), int), np.zeros(len(q))
    lo = hi - 1
    t = (q - inv_sorted[lo]) / (inv_sorted[hi] - inv_sorted[lo])
    return order[lo], order[hi], t


def nearest(grid_psf, depths, n, x, y, depth_m):
    """The lit grid PSF nearest in the field, at the grid depth nearest in 1/depth.

    A dark grid point (a channel with no light: stored as zeros) is never the answer: a lit
    query takes its nearest lit neighbour instead, as a user of the grid would.
    """
    row, col = _lattice(n, x, y)
    inv = 1.0 / depths
    d = np.abs(inv[None, :] - 1.0 / depth_m[:, None]).argmin(axis=1)
    lit = grid_psf.sum(axis=(-2, -1)).min(axis=-1) > 0  # [D, P]
    pr, pc = np.divmod(np.arange(n * n), n)  # each grid point's lattice row and column
    dist = (pr[None, :] - row[:, None]) ** 2 + (pc[None, :] - col[:, None]) ** 2  # [M, P]
    idx = np.where(lit[d], dist, np.inf).argmin(axis=1)
    return _normalise(grid_psf[d, idx])


def _bilinear_field(values: np.ndarray, n: int, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """values [P, ...] on the lattice -> [M, ...] bilinearly interpolated."""
    r0 = np.clip(np.floor(row).astype(int), 0, n - 2)
    c0 = np.clip(np.floor(col).astype(int), 0, n - 2)
    fr, fc = row - r0, col - c0
    expand = (slice(None),) + (None,) * (values.ndim - 1)
    v = lambda r, c: values[r * n + c]
    return (
        ((1 - fr) * (1 - fc))[expand] * v(r0, c0)
        + ((1 - fr) * fc)[expand] * v(r0, c0 + 1)
        + (fr * (1 - fc))[expand] * v(r0 + 1, c0)
        + (fr * fc)[expand] * v(r0 + 1, c0 + 1)
    )


def _in_depth(field_interp, grid_values, depths, depth_m):
    """Interpolate over the field at the bracketing grid depths, then linearly in 1/depth.

    field_interp maps one depth's grid values [P, ...] to the queries' values [M, ...].
    """
    lo, hi, t = _depth_weights(depths, depth_m)
    out = 0.0
    for d in np.unique(np.concatenate([lo, hi])):
        w = np.where(lo == d, 1 - t, 0.0) + np.where(hi == d, t, 0.0)  # lo == hi (one depth): 1
        at = field_interp(grid_values[d])
        out = out + w.reshape((-1,) + (1,) * (at.ndim - 1)) * at
    return out


def bilinear(grid_psf, depths, n, x, y, depth_m):
    """Bilinear over the field, linear in 1/depth between the bracketing grid depths."""
    row, col = _lattice(n, x, y)
    out = _in_depth(lambda v: _bilinear_field(v.astype(np.float64), n, row, col), grid_psf, depths, depth_m)
    return _normalise(out)


def bicubic(grid_psf, depths, n, x, y, depth_m):
    """Bicubic (Catmull-Rom) over the field, linear in 1/depth; exact at grid points.

    The classical interpolant to beat: it follows curvature that bilinear cuts across,
    and may overshoot below 0, which the final clip-and-renormalise removes.
    """
    row, col = _lattice(n, x, y)
    k_shape = grid_psf.shape[2:]
    flat = grid_psf.reshape(grid_psf.shape[:2] + (-1,)).astype(np.float64)  # [D, P, 3*k*k]
    out = _in_depth(lambda v: _bicubic_field(v, n, row, col), flat, depths, depth_m)
    return _normalise(out.reshape((len(x),) + k_shape))


def _cubic_weights(f: np.ndarray) -> np.ndarray:
    """Catmull-Rom (Keys, a = -0.5) weights of the 4 taps around each fraction f: [M] -> [M, 4]."""
    f2, f3 = f * f, f * f * f
    return np.stack(
        [-0.5 * f3 + f2 - 0.5 * f, 1.5 * f3 - 2.5 * f2 + 1, -1.5 * f3 + 2 * f2 + 0.5 * f, 0.5 * f3 - 0.5 * f2], 1
    )


def _bicubic_field(values: np.ndarray, n: int, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """values [P, K] on the lattice -> [M, K], Catmull-Rom in both directions.

    Beyond the edge the lattice is extended linearly (ghost = 2*edge - inner), so the
    interpolant stays exact at grid points and smooth up to the border.
    """
    v = values.reshape(n, n, -1)
    ext = np.empty((n + 2, n + 2, v.shape[-1]))
    ext[1:-1, 1:-1] = v
    ext[0, 1:-1], ext[-1, 1:-1] = 2 * v[0] - v[1], 2 * v[-1] - v[-2]
    ext[:, 0], ext[:, -1] = 2 * ext[:, 1] - ext[:, 2], 2 * ext[:, -2] - ext[:, -3]
    r0 = np.clip(np.floor(row).astype(int), 0, n - 2)
    c0 = np.clip(np.floor(col).astype(int), 0, n - 2)
    wr, wc = _cubic_weights(row - r0), _cubic_weights(col - c0)  # [M, 4]
    out = np.zeros((len(row), v.shape[-1]))
    for i in range(4):
        for j in range(4):
            out += (wr[:, i] * wc[:, j])[:, None] * ext[r0 + i, c0 + j]  # taps r0-1..r0+2 -> ext r0..r0+3
    return out


class EigenPSF:
    """Eigen-PSF interpolation: a truncated SVD of all grid PSFs, coefficients interpolated.

    basis: the top ``components`` right singular vectors of the mean-subtracted grid PSFs
    [D*P, 3*k*k]; coefficients are interpolated bicubically over the field and linearly in
    1/depth; the PSF is mean + coefficients @ basis, clipped at 0 and renormalised.
    """

    def __init__(self, grid_psf: np.ndarray, depths: np.ndarray, n: int, components: int = 32):
        D, P = grid_psf.shape[:2]
        self.shape = grid_psf.shape[2:]
        flat = grid_psf.reshape(D * P, -1).astype(np.float64)
        self.mean = flat.mean(axis=0)
        _, s, vt = np.linalg.svd(flat - self.mean, full_matrices=False)
        self.components = min(components, len(s))
        self.basis = vt[: self.components]  # [K, 3*k*k]
        self.explained = float((s[: self.components] ** 2).sum() / max((s**2).sum(), 1e-300))
        self.coef = ((flat - self.mean) @ self.basis.T).reshape(D, P, self.components)  # [D, P, K]
        self.depths, self.n = depths, n

    def __call__(self, x, y, depth_m):
        row, col = _lattice(self.n, x, y)
        c = _in_depth(lambda v: _bicubic_field(v, self.n, row, col), self.coef, self.depths, depth_m)
        return _normalise((self.mean + c @ self.basis).reshape((len(x),) + self.shape))
