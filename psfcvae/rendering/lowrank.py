"""The fast path of ``psf render``: the low-rank expansion of shift-variant blur.

Each pixel's kernel at the image's pitch is written as a weighted sum of K basis kernels,
K_p ≈ Σ_k w_k(p) B_k, so that the gather out(p) = Σ_u K_p(u) img(p - u) becomes
out = Σ_k w_k ⊙ (img ⊛ B_k): K convolutions of the whole image, done with FFTs, each weighted
per pixel afterwards (the weights multiply the output, not the input, because the kernel
belongs to the output pixel: the gather's convention). Nagy and O'Leary 1998, Flicker and
Rigaut 2005, Denis et al. 2015. The cost is O(K·H·W·log) instead of O(H·W·m²), m the
kernel's width at the image's pitch.

The basis is found at the model's pitch, in the metric of the image's pitch: resampling is
linear, K = A_y P A_xᵀ (P the k x k model kernel, A the overlap matrices), and with
A = U S Vᵀ its energy is ‖(S_y V_yᵀ) P (V_x S_x)ᵀ‖, so a principal component analysis of
these small coordinates gives the basis that is best in the image's own L2. The first basis
kernel is the mean kernel, normalised, with weight the kernel's sum (its relative
illumination); the others are principal components of what is left, which sums to zero, so
the expansion keeps every kernel's energy exactly whatever K. With all components (K = the
coordinates' size, at most k² + 1) the expansion is exact.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_ERROR = 0.05  # the basis's relative L2 error on a tile's kernels (pooled); docs/render.md: >= 70 dB on noise


class Basis:
    """K kernels at the image's pitch and the projection of model-pitch kernels onto them.

    samples: [N, 3, k, k] model-pitch kernels over the image (times their illumination);
    ay [my, k], ax [mx, k]: the resampling matrices to the image's pitch. error: the largest
    relative L2 error allowed, pooled over the samples' channels; rank: a fixed K instead.
    """

    def __init__(self, samples: torch.Tensor, ay: np.ndarray, ax: np.ndarray, error: float = DEFAULT_ERROR, rank=None):
        p = samples.detach().cpu().double()
        uy, my_ = _factor(ay)
        ux, mx_ = _factor(ax)
        self._my = torch.from_numpy(my_).float()  # [ry, k]
        self._mx = torch.from_numpy(mx_).float()  # [rx, k]
        c = torch.from_numpy(my_) @ p @ torch.from_numpy(mx_).T  # [N, 3, ry, rx]: the image-pitch coordinates
        s = p.sum((-2, -1))  # [N, 3]: each kernel's sum (its illumination)
        total_sum = float(s.sum())
        mean = p.sum((0, 1)) / total_sum if total_sum > 0 else torch.zeros(p.shape[-2:], dtype=torch.float64)
        c0 = torch.from_numpy(my_) @ mean @ torch.from_numpy(mx_).T  # [ry, rx], sums to 1 at the image's pitch
        resid = (c - s[..., None, None] * c0).reshape(-1, c0.numel())  # [N*3, ry*rx], each sums to zero
        lam, vec = np.linalg.eigh((resid.T @ resid).numpy())  # LAPACK through numpy: torch's threads stall here
        lam, vec = torch.from_numpy(lam).flip(0).clamp(min=0), torch.from_numpy(vec).flip(1)  # descending
        energy = float((c**2).sum())
        # left[j]: the relative error with the first j components (the mean kernel always in)
        left = torch.cat([lam.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=lam.dtype)])
        errors = (left / energy).sqrt() if energy > 0 else torch.zeros_like(left)
        if rank is not None:
            j = max(0, min(int(rank) - 1, len(lam)))
        else:
            ok = torch.nonzero(errors <= error).flatten()
            j = int(ok[0]) if len(ok) else len(lam)
        self.rank = j + 1
        self.error = float(errors[j])  # achieved on the samples
        self.target = error
        comps = vec[:, :j].T.reshape(j, *c0.shape)  # [j, ry, rx]
        coords = torch.cat([c0[None], comps])  # [K, ry, rx]
        self._c0 = c0.float()
        self._comps = comps.reshape(j, c0.numel()).float()  # [j, ry*rx]
        self._c0_dot = (self._comps.double() @ c0.reshape(-1)).float()  # [j]: <c0, E_i>
        # The basis kernels at the image's pitch [K, my, mx].
        self.kernels = (torch.from_numpy(uy) @ coords @ torch.from_numpy(ux).T).float()

    def weights(self, psf: torch.Tensor) -> torch.Tensor:
        """psf [N, 3, k, k] (model pitch) -> w [N, 3, K]: w_0 the kernel's sum, w_i its residual's component i."""
        psf = psf.float().cpu()
        s = psf.sum((-2, -1))  # [N, 3]
        c = (self._my @ psf @ self._mx.T).flatten(-2)  # [N, 3, ry*rx]
        rest = c @ self._comps.T - s[..., None] * self._c0_dot  # [N, 3, j]
        return torch.cat([s[..., None], rest], dim=-1)


def _factor(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A [m, k] = U M with U [m, r] orthonormal columns and M = S Vᵀ [r, k] (r: A's numerical rank)."""
    u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    r = int((s > 1e-12 * s.max()).sum()) if s.size and s.max() > 0 else 0
    return u[:, :r], s[:r, None] * vt[:r]


def fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c 7^d >= n: FFT lengths with small factors only."""
    best = 1 << max(0, math.ceil(math.log2(max(n, 1))))
    p7 = 1
    while p7 < best:
        p5 = p7
        while p5 < best:
            p3 = p5
            while p3 < best:
                v = p3
                while v < n:
                    v *= 2
                best = min(best, v)
                p3 *= 3
            p5 *= 5
        p7 *= 7
    return best


def convolve_weighted(region: torch.Tensor, kernels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[k] ⊙ (region ⊛ kernels[k]), the part of the linear convolution that needs no padding: [3, th, tw].

    region: [3, th + my - 1, tw + mx - 1], the image (mirror-padded) around a tile of th x tw pixels;
    kernels: [K, my, mx] with their centre at (my // 2, mx // 2); weights: [K, 3, th, tw].
    Output pixel p gathers Σ_u B_k(u) region(p + c - u): the circular convolution of the FFT
    does not wrap on these pixels, so no zero padding is needed beyond the region itself.
    """
    _, my, mx = kernels.shape
    th, tw = weights.shape[-2:]
    ny, nx = fft_size(region.shape[1]), fft_size(region.shape[2])
    spectrum = torch.fft.rfft2(region, s=(ny, nx))  # [3, ny, nx/2+1]
    out = torch.zeros(region.shape[0], th, tw, dtype=region.dtype, device=region.device)
    for k in range(len(kernels)):
        bk = torch.fft.rfft2(kernels[k].to(region.device), s=(ny, nx))
        full = torch.fft.irfft2(spectrum * bk, s=(ny, nx))
        out.addcmul_(weights[k], full[:, my - 1 : my - 1 + th, mx - 1 : mx - 1 + tw])
    return out
