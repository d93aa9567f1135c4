"""Image similarity: PSNR and SSIM (Wang et al. 2004, Gaussian window), for images [C, H, W]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    """10 log10(peak^2 / MSE) [dB] over all pixels and channels; inf for identical images."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0, sigma: float = 1.5) -> float:
    """Mean SSIM over channels and the pixels whose whole window lies inside the image.

    Window: a Gaussian of ``sigma`` pixels truncated at 3.5 sigma (11 taps at 1.5), population
    (co)variances, C1 = (0.01 peak)^2, C2 = (0.03 peak)^2: the settings of Wang et al. and of
    scikit-image's ``structural_similarity(gaussian_weights=True, use_sample_covariance=False)``.
    """
    radius = int(3.5 * sigma + 0.5)
    g = torch.exp(-((torch.arange(-radius, radius + 1, dtype=torch.float64)) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    c = a.shape[0]
    wy, wx = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(v):  # valid region: a separable Gaussian, per channel
        return F.conv2d(F.conv2d(v, wy, groups=c), wx, groups=c)

    x, y = a.double()[None], b.double()[None]
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())
