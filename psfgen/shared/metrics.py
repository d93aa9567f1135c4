"""The relative L2 error, the one error measure of both stages (docs/metrics.md)."""

from __future__ import annotations

import numpy as np


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """||a - b|| / ||b|| over the last three axes, in float64: [..., 3, k, k] -> [...]; NaN where b is 0 (dark)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = np.sqrt(((a - b) ** 2).sum(axis=(-3, -2, -1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return diff / np.sqrt((b**2).sum(axis=(-3, -2, -1)))
