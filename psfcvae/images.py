"""PSF mosaics for TensorBoard and PNG files."""

from __future__ import annotations

import numpy as np


def display_scale(psf: np.ndarray, log: bool = False) -> np.ndarray:
    """[..., 3, k, k] -> [..., 3, k, k] in [0, 1]: each PSF divided by its own maximum.

    PSFs sum to 1 over ~225 pixels, so raw values are tiny; per-PSF scaling shows shape.
    With ``log``, values are shown on a log scale spanning 3 decades.
    """
    peak = psf.max(axis=(-3, -2, -1), keepdims=True)
    x = psf / np.where(peak > 0, peak, 1.0)
    if log:
        x = np.clip(1.0 + np.log10(np.clip(x, 1e-3, None)) / 3.0, 0.0, 1.0)
    return x


def mosaic(psf: np.ndarray, n: int, gap: int = 1, log: bool = False) -> np.ndarray:
    """N x N mosaic of one depth: psf [n*n, 3, k, k] (row-major grid) -> [3, H, W] in [0, 1]."""
    k = psf.shape[-1]
    x = display_scale(psf, log).reshape(n, n, 3, k, k)  # [row, col, 3, k, k]
    size = n * (k + gap) - gap
    out = np.full((3, size, size), 0.25, dtype=np.float32)  # grey gaps between kernels
    for r in range(n):
        for c in range(n):
            out[:, r * (k + gap) : r * (k + gap) + k, c * (k + gap) : c * (k + gap) + k] = x[r, c]
    return out
