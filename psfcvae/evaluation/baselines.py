"""What a user would do instead of the CVAE: interpolate the grid PSFs of the same file.

All methods take the grid (coords on a regular N x N lattice, PSFs [F*D, P, 3, k, k] on the
file's planes p = f*D + d: focus settings focus [F] m (inf allowed) x depths [D] m) and query
points (x, y, depth [m], focus [m]) and return [M, 3, k, k], non-negative with each channel
summing to 1. Within each of the two focus settings bracketing a point they interpolate over
the field and linearly in 1/depth between the bracketing depths (defocus is linear in 1/depth),
then linearly in 1/focus between the two (as it is in 1/focus); beyond the first or last depth
or focus they use that one. A single-focus grid (F = 1, focus None or [nan]: the sensor where
the lens file puts it) ignores the query's focus and gives what a depth-only grid gives.
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


def _weights(values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """[M, V]: each query's weights over values [V] m (depths or focus distances, ascending, inf allowed):
    the two neighbours in 1/value, linear in 1/value; queries beyond the ends take the end. All on the one
    value when there is one (a single depth, or a single focus, nan included)."""
    m = len(query)
    if len(values) == 1:
        return np.ones((m, 1))
    inv = 1.0 / values  # ascending -> inverse descending (1/inf = 0)
    q = np.clip(1.0 / query, inv.min(), inv.max())
    order = np.argsort(inv)  # ascending inverse
    inv_sorted = inv[order]
    hi = np.clip(np.searchsorted(inv_sorted, q, side="right"), 1, len(inv) - 1)
    lo = hi - 1
    t = (q - inv_sorted[lo]) / (inv_sorted[hi] - inv_sorted[lo])
    w = np.zeros((m, len(values)))
    w[np.arange(m), order[lo]] = 1 - t
    w[np.arange(m), order[hi]] = t
    return w


def _focus_of(grid_psf, depths, focus, focus_m, m: int):
    """(focus [F], focus_m [M]) checked against the grid's planes; None means one focus."""
    focus = np.array([np.nan]) if focus is None else np.asarray(focus, dtype=np.float64)
    if grid_psf.shape[0] != len(focus) * len(depths):
        raise ValueError(f"grid has {grid_psf.shape[0]} planes, not {len(focus)} focus x {len(depths)} depths")
    focus_m = np.full(m, np.nan) if focus_m is None else np.broadcast_to(np.asarray(focus_m, np.float64), (m,))
    return focus, focus_m


def _plane_weights(depths, depth_m, focus, focus_m) -> np.ndarray:
    """[M, F*D]: each query's weight on each plane p = f*D + d, bilinear in (1/focus, 1/depth)."""
    wd, wf = _weights(depths, depth_m), _weights(focus, focus_m)  # [M, D], [M, F]
    return (wf[:, :, None] * wd[:, None, :]).reshape(len(depth_m), -1)


def nearest(grid_psf, depths, n, x, y, depth_m, focus=None, focus_m=None):
    """The lit grid PSF nearest in the field, on the plane nearest in (1/depth, 1/focus).

    The planes are every focus x every depth, so the nearest plane is the nearest focus in 1/focus and
    the nearest depth in 1/depth. A dark grid point (a channel with no light: stored as zeros) is never
    the answer: a lit query takes its nearest lit neighbour instead, as a user of the grid would.
    """
    focus, focus_m = _focus_of(grid_psf, depths, focus, focus_m, len(x))
    row, col = _lattice(n, x, y)
    inv = 1.0 / depths
    d = np.abs(inv[None, :] - 1.0 / depth_m[:, None]).argmin(axis=1)
    if len(focus) > 1:
        d = d + len(depths) * np.abs(1.0 / focus[None, :] - 1.0 / focus_m[:, None]).argmin(axis=1)
    lit = grid_psf.sum(axis=(-2, -1)).min(axis=-1) > 0  # [F*D, P]
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


def _in_planes(field_interp, grid_values, depths, depth_m, focus=None, focus_m=None):
    """Interpolate over the field on the bracketing planes, then linearly in 1/depth and in 1/focus.

    field_interp maps one plane's grid values [P, ...] to the queries' values [M, ...]; grid_values
    [F*D, P, ...]; only the planes some query weighs are interpolated.
    """
    focus, focus_m = _focus_of(grid_values, depths, focus, focus_m, len(depth_m))
    w = _plane_weights(depths, depth_m, focus, focus_m)  # [M, F*D]
    out = 0.0
    for p in np.flatnonzero(w.any(axis=0)):
        at = field_interp(grid_values[p])
        out = out + w[:, p].reshape((-1,) + (1,) * (at.ndim - 1)) * at
    return out


def bilinear(grid_psf, depths, n, x, y, depth_m, focus=None, focus_m=None):
    """Bilinear over the field, linear in 1/depth between the bracketing grid depths and in 1/focus."""
    row, col = _lattice(n, x, y)
    field = lambda v: _bilinear_field(v.astype(np.float64), n, row, col)  # noqa: E731
    return _normalise(_in_planes(field, grid_psf, depths, depth_m, focus, focus_m))


def bicubic(grid_psf, depths, n, x, y, depth_m, focus=None, focus_m=None):
    """Bicubic (Catmull-Rom) over the field, linear in 1/depth and in 1/focus; exact at grid points.

    The classical interpolant to beat: it follows curvature that bilinear cuts across,
    and may overshoot below 0, which the final clip-and-renormalise removes.
    """
    row, col = _lattice(n, x, y)
    k_shape = grid_psf.shape[2:]
    flat = grid_psf.reshape(grid_psf.shape[:2] + (-1,)).astype(np.float64)  # [F*D, P, 3*k*k]
    out = _in_planes(lambda v: _bicubic_field(v, n, row, col), flat, depths, depth_m, focus, focus_m)
    return _normalise(out.reshape((len(x),) + k_shape))


def mirror_averaged(grid_psf: np.ndarray, n: int, square: bool) -> np.ndarray:
    """The grid PSFs [F*D, n², 3, k, k] of a rotationally symmetric lens, each channel averaged over the lit
    images of its grid point under the lens's mirrors: x -> -x, y -> -y and both, and on a square sensor (the
    normalised grid then symmetric in x = y too) the diagonal mirror of each; each image is the mirrored point's
    PSF mirrored back. Rows of the grid and of each kernel run along -y, columns along +x (``_lattice``). A channel
    dark (0) in an image is left out of its mean, and stays 0 where it is dark in every one. float32, same shape.

    Every lit grid PSF is a ray-traced estimate with its own noise, and its images are estimates of the same PSF:
    the mean of 4 (8 on a square sensor) has about half (a third) the noise, less on the mirror lines, where a
    point is its own image. The blend (psfcvae/api/blend.py) starts from this grid, and psf eval scores
    bicubic interpolation of it as a baseline of its own for a rotationally symmetric model."""
    out = np.empty(grid_psf.shape, dtype=np.float32)
    flips = [(), (1, -1), (0, -2), (0, 1, -2, -1)]  # none, x (columns), y (rows), both: field and kernel together
    for p, plane in enumerate(grid_psf.reshape(len(grid_psf), n, n, *grid_psf.shape[2:])):  # [n, n, 3, k, k]
        total = np.zeros(plane.shape)
        count = np.zeros(plane.shape[:3] + (1, 1))
        for diagonal in (False, True) if square else (False,):
            base = _anti_transpose(_anti_transpose(plane), axes=(0, 1)) if diagonal else plane
            for axes in flips:
                image = np.flip(base, axes) if axes else base
                lit = image.sum(axis=(-2, -1), keepdims=True) > 0
                total += np.where(lit, image, 0.0)
                count += lit
        out[p] = (total / np.maximum(count, 1)).reshape(out.shape[1:])
    return out


def _anti_transpose(a: np.ndarray, axes=(-2, -1)) -> np.ndarray:
    """a mirrored in the diagonal x = y over two axes whose first runs along -y and second along +x:
    A'[i, j] = A[m-1-j, m-1-i] (the kernel's mirror of psfcvae/api/table.py's anti_transpose)."""
    return np.flip(np.swapaxes(a, *axes), axes)


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
    [F*D*P, 3*k*k] (every plane); coefficients are interpolated bicubically over the field and
    linearly in 1/depth and 1/focus; the PSF is mean + coefficients @ basis, clipped at 0 and
    renormalised. focus [F] m: the grid's focus settings (None: one).
    """

    def __init__(self, grid_psf: np.ndarray, depths: np.ndarray, n: int, components: int = 32, focus=None):
        planes, P = grid_psf.shape[:2]
        _focus_of(grid_psf, depths, focus, None, 0)  # the planes are focus x depths
        self.shape = grid_psf.shape[2:]
        flat = grid_psf.reshape(planes * P, -1).astype(np.float64)
        self.mean = flat.mean(axis=0)
        _, s, vt = np.linalg.svd(flat - self.mean, full_matrices=False)
        self.components = min(components, len(s))
        self.basis = vt[: self.components]  # [K, 3*k*k]
        self.explained = float((s[: self.components] ** 2).sum() / max((s**2).sum(), 1e-300))
        self.coef = ((flat - self.mean) @ self.basis.T).reshape(planes, P, self.components)  # [F*D, P, K]
        self.depths, self.n, self.focus = depths, n, focus

    def __call__(self, x, y, depth_m, focus_m=None):
        row, col = _lattice(self.n, x, y)
        field = lambda v: _bicubic_field(v, self.n, row, col)  # noqa: E731
        c = _in_planes(field, self.coef, self.depths, depth_m, self.focus, focus_m)
        return _normalise((self.mean + c @ self.basis).reshape((len(x),) + self.shape))
