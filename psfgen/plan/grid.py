"""Field grid, neighbour table and the held-out evaluation points.

Coordinates follow DeepLens's convention: x, y in [-1, 1] with +-1 at the sensor edges.
Grid points are stored row-major, flat index = row * N + col, with x growing along a row
and y falling from +1 (top row) to -1, the order of DeepLens's ``point_source_grid``.
"""

from __future__ import annotations

import numpy as np


def grid_coords(n: int) -> np.ndarray:
    """coords: [n*n, 2] (x, y), exact linspace values, flat index = row * n + col."""
    lin = np.linspace(-1.0, 1.0, n)
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    x = lin[cols.ravel()]
    y = lin[::-1][rows.ravel()]
    return np.stack([x, y], axis=1)


def neighbour_pairs(n: int) -> np.ndarray:
    """Undirected neighbour pairs [E, 2] (i < j not required; each pair once).

    Each point is linked forward to its right, bottom, bottom-right and bottom-left
    neighbours, which together give 8-connectivity: E = 2n(n-1) + 2(n-1)^2.
    """
    pairs = []
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        r2, c2 = r + dr, c + dc
        ok = (r2 < n) & (c2 >= 0) & (c2 < n)
        pairs.append(np.stack([(r * n + c)[ok], (r2 * n + c2)[ok]], axis=1))
    return np.concatenate(pairs).astype(np.int32)


def heldout_points(n: int, depths: np.ndarray, m: int, seed: int):
    """Off-grid evaluation points.

    Returns coords [m, 2], depth [m] in metres and at_grid_depth [m] bool. Positions are
    uniform over the field and at least a tenth of a grid step from every grid point.
    The first half sits at grid depths, the second half strictly between neighbouring
    grid depths (uniform in 1/depth); with a single grid depth all sit at that depth.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x48454C44]))  # "HELD"
    step = 2.0 / (n - 1)
    grid = grid_coords(n)
    coords = np.empty((m, 2))
    k = 0
    while k < m:
        p = rng.uniform(-1.0, 1.0, size=2)
        if np.min(np.abs(grid - p).max(axis=1)) >= 0.1 * step:
            coords[k] = p
            k += 1
    n_between = m // 2 if len(depths) > 1 else 0
    n_at = m - n_between
    depth = np.empty(m)
    depth[:n_at] = rng.choice(depths, size=n_at)
    inv = 1.0 / np.sort(depths)[::-1]  # ascending inverse depth
    for i in range(n_at, m):
        k = rng.integers(len(inv) - 1)
        lo, hi = inv[k], inv[k + 1]
        u = rng.uniform(0.05, 0.95)  # strictly inside, away from the grid depths
        depth[i] = 1.0 / (lo + u * (hi - lo))
    at_grid = np.zeros(m, dtype=bool)
    at_grid[:n_at] = True
    return coords, depth, at_grid


def noise_indices(n: int, count: int, seed: int) -> np.ndarray:
    """Indices of the grid points traced a second time (the noise floor), sorted."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E4F4953]))  # "NOIS"
    return np.sort(rng.choice(n * n, size=count, replace=False)).astype(np.int64)
