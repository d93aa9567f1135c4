"""Field grid, neighbour table and the held-out evaluation points.

Coordinates follow DeepLens's convention: x, y in [-1, 1] with +-1 at the sensor edges.
Grid points are stored row-major, flat index = row * N + col, with x growing along a row
and y falling from +1 (top row) to -1, the order of DeepLens's ``point_source_grid``.
"""

from __future__ import annotations

import math

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


# Radius bands of the held-out design: r = sqrt(x² + y²) in normalised coordinates (√2 at the corners). The
# worst errors sit near the axis, a sliver of the field's area that uniform points would seldom hit.
RADIUS_BANDS = (0.0, 0.15, 0.5, 0.9, float(np.sqrt(2.0)))
VALIDATION, TEST = 0, 1  # the values of heldout/part
MIN_TEST_PER_BAND = 8  # test points each band gets once M >= 4 * BAND_FLOOR
BAND_FLOOR = 10  # the fewest points of a band whose test part (all but a quarter) reaches MIN_TEST_PER_BAND


def radius_band(coords: np.ndarray) -> np.ndarray:
    """The radius band (index into RADIUS_BANDS' intervals) of field points coords [M, 2]: [M] int."""
    r = np.hypot(coords[:, 0], coords[:, 1])
    return np.clip(np.searchsorted(RADIUS_BANDS, r, side="right") - 1, 0, len(RADIUS_BANDS) - 2)


def band_label(b: int) -> str:
    """'r [0.15, 0.5)'; the last band is closed at the corner radius."""
    lo, hi = RADIUS_BANDS[b], RADIUS_BANDS[b + 1]
    return f"r [{lo:g}, {hi:g})" if b < len(RADIUS_BANDS) - 2 else f"r [{lo:g}, {hi:.2f}]"


def _field_area(r: np.ndarray) -> np.ndarray:
    """Area of the field [-1, 1]² within radius r [...]: πr² up to 1, then the disc less its four caps (4 at √2)."""
    r = np.minimum(np.asarray(r, dtype=np.float64), np.sqrt(2.0))
    out = np.pi * r**2
    big = r > 1
    rb = r[big]
    out[big] = 2 * rb**2 * (np.arcsin(1 / rb) - np.arccos(1 / rb)) + 4 * np.sqrt(rb**2 - 1)
    return out


def _radius_of_area(area: float) -> float:
    """The inverse of _field_area: sqrt(area / π) inside the unit disc, by bisection beyond (it is increasing)."""
    if area <= np.pi:
        return math.sqrt(area / np.pi)
    lo, hi = 1.0, math.sqrt(2.0)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if 2 * mid**2 * (math.asin(1 / mid) - math.acos(1 / mid)) + 4 * math.sqrt(mid**2 - 1) < area:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _off_grid(p: np.ndarray, n: int, clear: float) -> bool:
    """Whether point p [2] is at least ``clear`` (Chebyshev) from every point of the n x n grid: on a product grid
    that distance is the larger of the distances to the nearest grid value along x and along y."""
    step = 2.0 / (n - 1)
    return bool(np.abs(p - (np.round((p + 1.0) / step) * step - 1.0)).max() >= clear)


def band_counts(m: int) -> np.ndarray:
    """Held-out points per radius band [4]: in proportion to the band's share of the field's area, but at least
    BAND_FLOOR each (the axis band's share of 256 points would be 4); below 4 * BAND_FLOOR points, equal shares."""
    nb = len(RADIUS_BANDS) - 1
    if m < nb * BAND_FLOOR:
        counts = np.full(nb, m // nb)
        counts[nb - m % nb :] += 1  # the remainder to the outer bands, the larger ones
        return counts
    areas = np.diff(_field_area(np.array(RADIUS_BANDS)))
    fixed = np.zeros(nb, bool)
    while True:  # bands whose share falls below the floor get the floor; the rest share what is left
        share = np.where(fixed, BAND_FLOOR, (m - BAND_FLOOR * fixed.sum()) * areas / areas[~fixed].sum())
        low = ~fixed & (share < BAND_FLOOR)
        if not low.any():
            break
        fixed |= low
    counts = np.floor(share).astype(int)
    order = np.argsort(-(share - counts), kind="stable")  # largest remainders first
    counts[order[: m - counts.sum()]] += 1
    return counts


def band_test_counts(m: int) -> np.ndarray:
    """Test points per radius band [4] of m held-out points."""
    return np.array([c - len(validation_slots(c)) for c in band_counts(m)])


def validation_slots(c: int) -> np.ndarray:
    """Which of a band's c points (in radius order) are validation points: a quarter (rounded down; one of 2 or 3),
    spread over the band and never its innermost or, from 4 points, its outermost point (those are test points)."""
    v = max(1, c // 4) if c >= 2 else 0
    return np.floor((np.arange(v) + 0.5) * c / v).astype(int)


def heldout_points(n: int, depths: np.ndarray, m: int, seed: int):
    """Off-grid evaluation points, stratified by radius and split into validation and test points.

    Returns coords [m, 2], depth [m] in metres, at_grid_depth [m] bool and part [m] uint8 (VALIDATION or TEST),
    ordered by radius band, then by radius. Each band (band_counts) is cut into as many rings of equal area as it
    has points, one point uniform in each: from M = 40 on (9 points or more in the axis band) the innermost ring
    lies within r < 0.05, and the outermost ring of the corner band holds the field's corners. Every point is at
    least a tenth of a grid step (Chebyshev) from every grid point (a point whose ring lies wholly within those
    keep-out squares, as the axis's may on a small grid of odd size, is drawn anywhere in its band). A quarter of
    each band validates (validation_slots), the rest is test.
    Within each band and part, points alternate between a grid depth and a depth strictly between two
    neighbouring grid depths (uniform in 1/depth, 5-95 % of the interval), each cycling through the depths
    (intervals) from a random start; with a single grid depth all sit at it.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x48454C44]))  # "HELD"
    clear = 0.1 * 2.0 / (n - 1)  # the distance kept from every grid point
    edges = _field_area(np.array(RADIUS_BANDS))
    D = len(depths)
    inv = 1.0 / np.sort(depths)[::-1]  # ascending inverse depth
    counts = band_counts(m)
    coords = []  # all positions first: they depend on (n, m, seed) alone, not on the depths
    for b, c in enumerate(counts):
        width = (edges[b + 1] - edges[b]) / max(c, 1)
        for i in range(c):  # ring i of the band; after 200 draws on the grid's keep-out squares, anywhere in the band
            for tries in range(10_000):
                lo, span = (edges[b] + i * width, width) if tries < 200 else (edges[b], edges[b + 1] - edges[b])
                r = _radius_of_area(lo + rng.uniform() * span)
                half = np.pi / 4 if r <= 1 else np.arcsin(1 / r) - np.pi / 4  # the angles inside the square
                theta = np.pi / 4 + rng.integers(4) * np.pi / 2 + rng.uniform(-half, half)
                p = np.clip(r * np.array([np.cos(theta), np.sin(theta)]), -1.0, 1.0)
                if _off_grid(p, n, clear):
                    break
            else:
                raise RuntimeError(f"no held-out point off the {n}x{n} grid in radius band {band_label(b)}")
            coords.append(p)
    depth, at_grid, part = np.empty(m), np.ones(m, bool), np.full(m, TEST, np.uint8)
    for b, c in enumerate(counts):
        band = np.arange(counts[:b].sum(), counts[: b + 1].sum())
        part[band[validation_slots(c)]] = VALIDATION
        for which in (VALIDATION, TEST):
            idx = band[part[band] == which]
            at = (np.arange(len(idx)) + b) % 2 == 0 if D > 1 else np.ones(len(idx), bool)
            at_grid[idx] = at
            start_at, start_between = rng.integers(D), rng.integers(max(D - 1, 1))
            depth[idx[at]] = np.sort(depths)[(start_at + np.arange(at.sum())) % D]
            for j, k in enumerate(idx[~at]):
                g = (start_between + j) % (D - 1)
                u = rng.uniform(0.05, 0.95)  # strictly inside, away from the grid depths
                depth[k] = 1.0 / (inv[g] + u * (inv[g + 1] - inv[g]))
    return np.array(coords).reshape(m, 2), depth, at_grid, part


def focus_midpoints(focus: np.ndarray) -> np.ndarray:
    """The midpoints in 1/focus of adjacent focus settings focus [F] m (ascending, inf allowed): [F - 1] m."""
    inv = 1.0 / np.asarray(focus, dtype=np.float64)  # 1/inf = 0
    with np.errstate(divide="ignore"):
        return 1.0 / (0.5 * (inv[:-1] + inv[1:]))


def heldout_focus(part: np.ndarray, focus: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The focus [m] of each held-out point of heldout_points (part [m], in its order: by radius band, then radius)
    and whether it is a grid focus: ([m] float64, [m] bool).

    focus: the grid's focus settings [F] m, ascending (inf allowed), or [nan] for a run without one. With one focus
    every point is at it. With several, within each band and part, points go in pairs between a grid focus and the
    midpoint in 1/focus of two adjacent grid focus settings (focus_midpoints), so the pairs cross the depths'
    alternation: about a quarter of the points in each of at/between grid depth x at/between grid focus. Each kind
    cycles through its values from a random start. Drawn from their own stream: the depths stay as without focus.
    """
    m, F = len(part), len(focus)
    if F == 1:
        return np.full(m, focus[0], dtype=np.float64), np.ones(m, bool)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x464F4355]))  # "FOCU"
    mids = focus_midpoints(focus)
    out, at_grid = np.empty(m), np.ones(m, bool)
    counts = band_counts(m)
    for b in range(len(counts)):
        band = np.arange(counts[:b].sum(), counts[: b + 1].sum())
        for which in (VALIDATION, TEST):
            idx = band[part[band] == which]
            at = (np.arange(len(idx)) // 2 + b // 2) % 2 == 0
            at_grid[idx] = at
            start_at, start_between = rng.integers(F), rng.integers(F - 1)
            out[idx[at]] = focus[(start_at + np.arange(at.sum())) % F]
            out[idx[~at]] = mids[(start_between + np.arange((~at).sum())) % (F - 1)]
    return out, at_grid


def noise_indices(n: int, count: int, seed: int) -> np.ndarray:
    """Indices of the grid points traced a second time (the noise floor), sorted."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4E4F4953]))  # "NOIS"
    return np.sort(rng.choice(n * n, size=count, replace=False)).astype(np.int64)
