"""Accuracy metrics against a noisy ray-traced reference (see docs/metrics.md).

The held-out reference R = (A + B) / 2 is the mean of two independent traces A, B of the
same point. With T the noise-free PSF and P a prediction independent of A and B:

    E ||P - R||^2 = ||P - T||^2 + E ||R - T||^2,     E ||R - T||^2 = E ||A - B||^2 / 4,
    E ||R||^2     = ||T||^2     + E ||R - T||^2,

so ||P - T||^2 ≈ ||P - R||^2 - ||A - B||^2 / 4 and ||T||^2 ≈ ||R||^2 - ||A - B||^2 / 4.
"""

from __future__ import annotations

import numpy as np

from psfgen.shared.metrics import rel_l2  # noqa: F401  (||pred - ref|| / ||ref|| per PSF: one definition for both stages)


def _sq(x: np.ndarray) -> np.ndarray:
    """Squared L2 norm over [3, k, k]: [M, 3, k, k] -> [M] (float64)."""
    return (x.astype(np.float64) ** 2).reshape(len(x), -1).sum(axis=1)


def rel_l2_corrected(pred: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """Noise-corrected relative L2 against the reference (a + b) / 2.

    Returns (per-point estimates [M], clipped at 0, and the pooled estimate
    sqrt(sum(||P-R||^2 - ||A-B||^2/4) / sum(||R||^2 - ||A-B||^2/4)), which is unbiased in
    numerator and denominator and is the figure to quote; per-point values are noisy).
    """
    ref = 0.5 * (a + b)
    noise = _sq(a - b) / 4.0  # estimate of ||R - T||^2 per point
    num = _sq(pred - ref) - noise
    den = _sq(ref) - noise
    per_point = np.sqrt(np.clip(num, 0.0, None) / den)
    pooled = float(np.sqrt(max(num.sum(), 0.0) / den.sum()))
    return per_point, pooled


def summarize(err: np.ndarray) -> dict:
    """mean, median, 95th percentile and count of per-point errors."""
    if len(err) == 0:
        return {"n": 0}
    return {
        "n": int(len(err)),
        "mean": float(err.mean()),
        "median": float(np.median(err)),
        "p95": float(np.percentile(err, 95)),
    }


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Rank correlation of x and y (average ranks for ties)."""

    def ranks(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # ties share their mean rank
            tie = v == val
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    if len(x) < 3:
        return float("nan")
    rx, ry = ranks(np.asarray(x)), ranks(np.asarray(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def measured_points(result: dict) -> str:
    """How many test points the PSF metrics stand on: "12 test points", or "8 lit of 12 test points"."""
    n, dark = result["data"]["n_test"], result.get("heldout_dark", 0)
    return f"{n - dark} lit of {n} test points" if dark else f"{n} test points"


def focus_label(focus_m: float) -> str:
    """'0.5 m', '∞' for focus at infinity: a focus distance [m] in group names, tables and figures."""
    return "∞" if np.isinf(focus_m) else f"{focus_m:g} m"


def focus_json(focus_m: float | None) -> str | float | None:
    """A focus distance [m] as metrics.json writes it: "inf" for infinity (JSON has no inf), null for none (nan:
    a single-focus file's lens-file sensor)."""
    if focus_m is None or np.isnan(focus_m):
        return None
    return "inf" if np.isinf(focus_m) else float(focus_m)


def focus_groups(focus) -> list[tuple[str, str, float, float]]:
    """The per-focus groups of a file's focus settings focus [F] m, nearest first: (name, tick, lo, hi) at each
    grid focus (lo == hi: 'at focus 0.5 m', tick '0.5') and between each two ('between focus 0.5 and 1 m',
    '0.5–1'; 'between focus 2 m and ∞', '2–∞')."""
    tick = lambda f: "∞" if np.isinf(f) else f"{f:g}"  # noqa: E731
    out = [(f"at focus {focus_label(focus[0])}", tick(focus[0]), focus[0], focus[0])]
    for lo, hi in zip(focus[:-1], focus[1:]):
        span = f"{lo:g} and {hi:g} m" if np.isfinite(hi) else f"{lo:g} m and ∞"
        out += [
            (f"between focus {span}", f"{tick(lo)}–{tick(hi)}", lo, hi),
            (f"at focus {focus_label(hi)}", tick(hi), hi, hi),
        ]
    return out
