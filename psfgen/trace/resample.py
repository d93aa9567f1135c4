"""Energy-preserving area downsampling of PSF kernels: kernel_size -> kernel_size_small px (ks, ks_small here).

64/15 is not an integer ratio, so strided subsampling or pooling would drop or
double-count pixels. Each output pixel instead sums the input pixels it covers, weighted
by the covered fraction of their area: out = A @ psf @ A^T with A[i, j] the overlap of
output pixel i ([i r, (i+1) r), r = ks / ks_small, in input pixel units) with input pixel
j ([j, j+1)). Every column of A sums to 1, so the total energy is preserved exactly.
"""

from __future__ import annotations

import numpy as np
import torch

METHOD = "area: exact pixel-overlap weights, separable, then per-channel renormalisation"


def overlap_matrix(lo: np.ndarray, width: float, k: int) -> np.ndarray:
    """A: [m, k]; A[i, j] = length of [lo_i, lo_i + width) intersected with input pixel [j, j + 1):
    the exact-area rule of every resampling here (psf generate's 64 -> 15, psf render's kernel pitch)."""
    j = np.arange(k)[None, :]
    return np.clip(np.minimum(lo[:, None] + width, j + 1) - np.maximum(lo[:, None], j), 0.0, None)


def area_matrix(ks: int, ks_small: int) -> np.ndarray:
    """A: [ks_small, ks]; A[i, j] = length of [i r, (i+1) r) intersected with [j, j+1), r = ks / ks_small."""
    r = ks / ks_small
    return overlap_matrix(np.arange(ks_small) * r, r, ks)


def downsample(psf: torch.Tensor, kernel_size_small: int) -> torch.Tensor:
    """psf: [..., ks, ks] -> [..., kernel_size_small, kernel_size_small], each kernel renormalised to sum 1."""
    a = torch.as_tensor(area_matrix(psf.shape[-1], kernel_size_small), dtype=torch.float64, device=psf.device)
    out = a @ psf.to(torch.float64) @ a.T  # [..., kernel_size_small, kernel_size_small]
    total = out.sum(dim=(-2, -1), keepdim=True)
    out = out / torch.where(total > 0, total, torch.ones_like(total))
    return out.to(torch.float32)
