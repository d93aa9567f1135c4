"""The canonical frame of a rotationally symmetric lens.

Every coaxial lens images a point at field angle θ as it images the point at the same
radius on the +x axis, rotated by θ: the PSF field is a function of (radius, depth), not
(x, y, depth). This module holds the geometry of that statement:

- ``polar``: normalised field coordinates (x, y) -> physical radius and angle. x and y are
  normalised to the sensor's half-width and half-height, which differ on a non-square
  sensor, so both are first scaled to one physical unit (the longer half-side).
- ``rotate_sample``: a kernel image rotated by θ and integrated over the pixels of an
  output kernel, differentiably (bilinear sampling at q x q points per output pixel).

Kernel orientation is the file's: row 0 at y = +1, columns along +x, the kernel centred
on the chief ray. A rotation by +θ is counter-clockwise as displayed (row 0 on top), the
same sense as the field point's rotation: ``rotate_sample(k, +90°)`` of a kernel sampled
on pixel centres equals ``torch.rot90(k, 1, (-2, -1))`` (tested against DeepLens).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def polar(xy: torch.Tensor, scale: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """xy [B, 2] normalised field coordinates -> (r [B], θ [B] radians).

    scale: (sx, sy), the sensor's half-width and half-height over the longer of the two,
    so that (sx·x, sy·y) are physical coordinates in units of the longer half-side.
    """
    px, py = xy[:, 0] * scale[0], xy[:, 1] * scale[1]
    return torch.sqrt(px * px + py * py), torch.atan2(py, px)


def max_radius(scale: tuple[float, float] = (1.0, 1.0)) -> float:
    """Radius of the sensor corner (x, y) = (±1, ±1) in the units of ``polar``."""
    return math.hypot(scale[0], scale[1])


def canonical_side(ks: int) -> int:
    """Side [output px] of the canonical kernel: the k x k window rotated by any angle fits inside.

    Of the parity of ks, so that at θ = 0 the fine pixels tile the output pixels exactly.
    """
    return ks + 2 * int(math.ceil(ks * (math.sqrt(2.0) - 1.0) / 2.0))


def rotate_sample(
    img: torch.Tensor,
    theta: torch.Tensor,
    out_px: int,
    q: int,
    out_extent: float | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Rotate ``img`` by θ and integrate it over an ``out_px`` x ``out_px`` kernel.

    img: [B, C, H, W], H = W, an image spanning [-m/2, m/2]^2 in output-pixel units, with m
    = ``out_extent`` (default ``out_px``: the input covers the output window exactly) and
    its centre on the kernel centre. theta: [B] radians, counter-clockwise. Each output
    pixel is the mean of samples at q x q points spread evenly over it, interpolated by
    ``mode`` (bilinear | bicubic): [B, C, out_px, out_px]. Values beyond the input read as 0
    (cropping). With q equal to the input's pixels per output pixel, θ = 0 is an exact area
    average. Bicubic keeps a sharp kernel sharp where bilinear spreads each fine pixel over
    its neighbours (docs/symmetry.md); its negative lobes are cut to 0, so the output stays
    non-negative.
    """
    m = float(out_px if out_extent is None else out_extent)
    n = out_px * q
    t = (torch.arange(n, device=img.device, dtype=img.dtype) + 0.5) / q - out_px / 2.0  # sample offsets [output px]
    v, u = torch.meshgrid(t, t, indexing="ij")  # u along columns (+x), v along rows (down, -y)
    px, py = u[None], -v[None]  # physical, y up: [1, n, n]
    c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    # The output at p shows the input at R(-θ) p.
    qx = c * px + s * py
    qy = -s * px + c * py
    grid = torch.stack([qx, -qy], dim=-1) / (m / 2.0)  # grid_sample: x along columns, y down the rows
    out = F.grid_sample(img, grid, mode=mode, padding_mode="zeros", align_corners=False)
    out = F.avg_pool2d(out, q) if q > 1 else out
    return out.clamp_min(0.0) if mode == "bicubic" else out
